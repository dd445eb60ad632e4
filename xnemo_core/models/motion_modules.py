"""The two module families X-NeMo inserts after every UNet layer: motion cross-attention and
temporal self-attention. They share one transformer body and differ only in what they attend to.

Parameter names follow the official checkpoints exactly
(`temporal_transformer.{norm,proj_in,transformer_blocks.0.{attention_blocks.i,norms.i,ff,ff_norm},proj_out}`),
so `xnemo_denoising_unet.pth` / `xnemo_temporal_module.pth` load without renaming.
"""
from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from .attention import multihead_attention


def interleaved_sincos_table(length: int, dim: int) -> torch.Tensor:
    """[1, length, dim] table: sin on even and cos on odd channels, frequency 10000^(-2i/dim)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, length, dim)
    table[0, :, 0::2] = torch.sin(position * div_term)
    table[0, :, 1::2] = torch.cos(position * div_term)
    return table


class FramePositionEncoding(nn.Module):
    """Adds the fixed per-frame sinusoid (buffer `pe`, stored in the official temporal checkpoint)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", interleaved_sincos_table(max_len, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(
                f"temporal attention sees {x.shape[1]} frames but its position table holds {self.pe.shape[1]}; "
                "use context windows of at most that many frames"
            )
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class ModuleAttention(nn.Module):
    """Multi-head attention without q/k/v bias, with an output bias (official naming: to_q/to_k/to_v/to_out.0)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, frame_positions: int = 0):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.pos_encoder = FramePositionEncoding(dim, frame_positions) if frame_positions else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        context = x if context is None else context
        out = multihead_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[1](self.to_out[0](out))


class ModuleBlock(nn.Module):
    """Two pre-norm attentions and a GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, frame_positions: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [ModuleAttention(dim, heads, context_dim, frame_positions) for _ in range(2)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim, dropout=0.0, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = x + attention(norm(x), context)
        return x + self.ff(self.ff_norm(x))


class ModuleTransformer(nn.Module):
    """GroupNorm (per frame) -> proj_in -> block -> proj_out, added to the input."""

    def __init__(self, dim: int, heads: int, groups: int, context_dim: int | None, frame_positions: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([ModuleBlock(dim, heads, context_dim, frame_positions)])
        self.proj_out = nn.Linear(dim, dim)

    def tokens_in(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c))

    def tokens_out(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        n, c, h, w = like.shape
        return like + self.proj_out(tokens).reshape(n, h, w, c).permute(0, 3, 1, 2)


class MotionModule(nn.Module):
    """Motion cross-attention: each frame's pixels attend to that frame's 32 motion tokens (dim 16)."""

    def __init__(self, dim: int, heads: int = 8, groups: int = 32, token_dim: int = 16):
        super().__init__()
        self.temporal_transformer = ModuleTransformer(dim, heads, groups, token_dim, frame_positions=0)

    def forward(self, x: torch.Tensor, motion_tokens: torch.Tensor) -> torch.Tensor:
        """x [B*F, C, H, W]; motion_tokens [B*F, T, token_dim]."""
        body = self.temporal_transformer
        tokens = body.tokens_in(x)
        tokens = body.transformer_blocks[0](tokens, motion_tokens.to(tokens.dtype))
        return body.tokens_out(tokens, x)


class TemporalModule(nn.Module):
    """Temporal self-attention: every pixel attends across the frames of its clip."""

    def __init__(self, dim: int, heads: int = 8, groups: int = 32, max_frames: int = 32):
        super().__init__()
        self.temporal_transformer = ModuleTransformer(dim, heads, groups, None, frame_positions=max_frames)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x [B*F, C, H, W] with frames contiguous per clip (row = b*F + f)."""
        body = self.temporal_transformer
        tokens = body.tokens_in(x)  # [B*F, HW, C]
        bf, hw, c = tokens.shape
        b = bf // frames
        tokens = tokens.reshape(b, frames, hw, c).transpose(1, 2).reshape(b * hw, frames, c)
        tokens = body.transformer_blocks[0](tokens, None)
        tokens = tokens.reshape(b, hw, frames, c).transpose(1, 2).reshape(bf, hw, c)
        return body.tokens_out(tokens, x)
