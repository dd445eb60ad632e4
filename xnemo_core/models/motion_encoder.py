"""X-NeMo motion encoder: a face crop (plus its box parameters) -> 32 motion tokens of width 16.

Why this module exists: the denoising UNet's motion cross-attention consumes a compact,
identity-agnostic motion descriptor per driving frame. The official release computes it with a
FAN landmark network extended by three patch self-attention blocks ("FAN_SA"), a small MLP on
the crop's box parameters, and a linear head. This file rebuilds that network with the official
state-dict names (``model.*``, ``bbox_proj.*``, ``final_proj.*``, buffer ``pe``), so
``xnemo_motion_encoder.pth`` loads with ``strict=True``, while every width is taken from
:class:`xnemo_core.config.MotionEncoderConfig` so a small model can be built for tests and demos.

The network is meant to run in eval mode: BatchNorm uses its running statistics and the
hourglass Dropout(0.5) is inactive. The constructor therefore returns the module in eval mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from xnemo_core.config import MotionEncoderConfig

__all__ = ["MotionEncoder", "sincos_1d_table", "sincos_2d_table"]


# ----------------------------------------------------------------------------- sincos tables
def sincos_1d_table(num_positions: int, dim: int) -> torch.Tensor:
    """[num_positions, dim] table laid out as [sin | cos] with omega_k = 10000^(-k/(dim/2)).

    This is the diffusers 1-D sincos layout (not the interleaved transformer one); the official
    motion encoder stores it (positions 0..31, dim 16) as the ``pe`` buffer added to the tokens.
    Computed in float64 and rounded once, as the reference implementation does.
    """
    if dim % 2:
        raise ValueError(f"sincos dim must be even, got {dim}")
    return _sincos_1d(torch.arange(num_positions, dtype=torch.float64), dim).float()


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = pos.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_table(grid_size: int, dim: int) -> torch.Tensor:
    """[grid_size**2, dim] 2-D sincos table of a square patch grid, tokens in row-major order.

    Matches diffusers' ``get_2d_sincos_pos_embed`` at base size == grid size: the first half
    of the channels encodes the column (x) index and the second half the row (y) index. The
    official PatchEmbed keeps it as a non-persistent buffer, so it never appears in checkpoints.
    """
    if dim % 4:
        raise ValueError(f"2-D sincos dim must be divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb_x = _sincos_1d(cols.reshape(-1), dim // 2)
    emb_y = _sincos_1d(rows.reshape(-1), dim // 2)
    return torch.cat([emb_x, emb_y], dim=1).float()


# ----------------------------------------------------------------------------- FAN pieces
class ConvBlock(nn.Module):
    """FAN's pre-activation residual block: three 3x3 convs (out/2, out/4, out/4) concatenated.

    The names (bn1..3, conv1..3, downsample.{0,2}) are the checkpoint's; the shortcut projection
    (BN-ReLU-1x1 conv) exists only when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half, quarter = out_channels // 2, out_channels // 4
        if half + 2 * quarter != out_channels:
            raise ValueError(f"ConvBlock out_channels must be divisible by 4, got {out_channels}")
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, quarter, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(F.relu(self.bn1(x)))
        b = self.conv2(F.relu(self.bn2(a)))
        c = self.conv3(F.relu(self.bn3(b)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.cat([a, b, c], dim=1) + shortcut


class HourGlass(nn.Module):
    """Recursive encoder-decoder of ConvBlocks (FAN's single stack, here depth 4: 56->3 px).

    Level L: upper branch b1_L at full size (Dropout 0.5, off in eval); lower branch = 2x2
    max-pool -> b2_L -> (level L-1, or b2_plus_1 at the bottom) -> b3_L, bilinearly resized
    (align_corners=False) back to the upper branch's size, which also handles odd sizes (7->3->7).
    """

    def __init__(self, depth: int, channels: int):
        super().__init__()
        self.depth = depth
        self.dropout = nn.Dropout(0.5)
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(channels, channels))
            self.add_module(f"b2_{level}", ConvBlock(channels, channels))
            self.add_module(f"b3_{level}", ConvBlock(channels, channels))
        self.add_module("b2_plus_1", ConvBlock(channels, channels))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self.dropout(self._modules[f"b1_{level}"](x))
        lower = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        lower = self._level(level - 1, lower) if level > 1 else self.b2_plus_1(lower)
        lower = self._modules[f"b3_{level}"](lower)
        return upper + F.interpolate(lower, size=upper.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


# ----------------------------------------------------------------------------- patch attention
class PatchEmbed(nn.Module):
    """Strided-conv patchify + fixed 2-D sincos positions (the diffusers PatchEmbed layout).

    Kept local so the positional table is always the non-persistent float64-derived one the
    official run used, independent of the installed diffusers version.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, grid_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d_table(grid_size, embed_dim)[None], persistent=False)

    @torch.no_grad()
    def reset_pos_embed(self) -> None:
        """Refill the table in place (needed after building on 'meta' and materialising)."""
        table = sincos_2d_table(self.grid_size, self.pos_embed.shape[-1])
        self.pos_embed.copy_(table[None].to(self.pos_embed.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed.to(tokens.dtype)


class PatchAttentionBlock(nn.Module):
    """One pre-LN transformer block over patch tokens: self-attention then a GEGLU feed-forward.

    Names follow the official AnimateDiff-style block (``attention_blocks.0``, ``norms.0``,
    ``ff``, ``ff_norm``) with a single spatial self-attention and no positional encoding inside.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} not divisible by {heads} heads")
        self.attention_blocks = nn.ModuleList([Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class PatchSelfAttention(nn.Module):
    """FAN_SA's ``att_k``: global self-attention over a feature map, added back as a residual.

    GroupNorm -> PatchEmbed (p x p patches, sincos positions) -> transformer block -> each token
    viewed as a (p, p, dim/p^2) pixel patch -> ``proj_out`` to the input channels -> folded back
    to (C, H, W) -> + input. Gives the convolutional landmark network a global receptive field.
    """

    def __init__(self, channels: int, size: int, patch_size: int, dim: int, heads: int, norm_groups: int):
        super().__init__()
        if size % patch_size or dim % (patch_size * patch_size):
            raise ValueError(f"bad patch layout: size {size}, patch {patch_size}, dim {dim}")
        self.patch_size = patch_size
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.pos_embed = PatchEmbed(channels, dim, patch_size, size // patch_size)
        self.transformer_blocks = nn.ModuleList([PatchAttentionBlock(dim, heads)])
        self.proj_out = nn.Linear(dim // (patch_size * patch_size), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        tokens = self.pos_embed(self.norm(x))
        for block in self.transformer_blocks:
            tokens = block(tokens)
        pixels = self.proj_out(tokens.reshape(n, h // p, w // p, p, p, -1))  # n gh gw p p c
        pixels = pixels.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
        return pixels + x


class FANSA(nn.Module):
    """FAN landmark network (one hourglass) with three patch self-attention blocks -> 512-d.

    Stem 7x7/2 conv -> ConvBlock -> att_1 -> 2x2 max-pool -> two ConvBlocks -> att_2 ->
    hourglass -> top ConvBlock -> 1x1 conv + BN -> att_3 -> ReLU -> 1x1 to 68 landmark maps ->
    BN + ReLU -> 3x3/2 conv to one map -> flatten -> ReLU -> fc. Official widths are the defaults
    of MotionEncoderConfig; attribute names are the checkpoint's ``model.*`` names.
    """

    def __init__(self, cfg: MotionEncoderConfig):
        super().__init__()
        if cfg.image_size % 8:
            raise ValueError(f"image_size must be divisible by 8, got {cfg.image_size}")
        stem, mid, hg = cfg.stem_channels, 2 * cfg.stem_channels, cfg.hourglass_channels
        half, quarter = cfg.image_size // 2, cfg.image_size // 4
        grid = cfg.image_size // 8
        groups = cfg.attn_norm_groups
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(stem)
        self.conv2 = ConvBlock(stem, mid)
        self.conv3 = ConvBlock(mid, mid)
        self.conv4 = ConvBlock(mid, hg)
        self.m0 = HourGlass(cfg.hourglass_depth, hg)
        self.top_m_0 = ConvBlock(hg, hg)
        self.conv_last0 = nn.Conv2d(hg, hg, 1)
        self.bn_end0 = nn.BatchNorm2d(hg)
        self.l0 = nn.Conv2d(hg, cfg.num_landmarks, 1)
        self.bn5 = nn.BatchNorm2d(cfg.num_landmarks)
        self.conv6 = nn.Conv2d(cfg.num_landmarks, 1, 3, stride=2, padding=1)
        self.fc = nn.Linear(grid * grid, cfg.descriptor_dim)
        self.att_1 = PatchSelfAttention(mid, half, half // grid, cfg.attn_embed_dim, cfg.attn_heads, groups)
        self.att_2 = PatchSelfAttention(hg, quarter, quarter // grid, cfg.attn_embed_dim, cfg.attn_heads, groups)
        self.att_3 = PatchSelfAttention(hg, quarter, quarter // grid, cfg.attn_embed_dim, cfg.attn_heads, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.att_1(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.att_2(self.conv4(self.conv3(x)))
        x = self.top_m_0(self.m0(x))
        x = self.att_3(self.bn_end0(self.conv_last0(x)))
        x = F.relu(self.bn5(self.l0(F.relu(x))))
        x = self.conv6(x).flatten(1)
        return self.fc(F.relu(x))


# ----------------------------------------------------------------------------- full encoder
class MotionEncoder(nn.Module):
    """Face crop(s) in [-1, 1] + f_rts box parameters -> motion tokens [..., 32, 16].

    descriptor = final_proj([FAN_SA(image) | bbox_proj(f_rts)]); tokens = descriptor viewed as
    32 tokens x 16 channels (token l = channels 16l..16l+15) + the 1-D sincos buffer ``pe``.
    f_rts is (dy, dx, scale) in the official y-first order; the official script always passes
    (0, 0, 1).
    """

    def __init__(self, config: MotionEncoderConfig | None = None):
        super().__init__()
        cfg = config or MotionEncoderConfig()
        if cfg.motion_tokens * cfg.motion_token_dim != cfg.descriptor_dim:
            raise ValueError("motion_tokens * motion_token_dim must equal descriptor_dim")
        self.config = cfg
        self.model = FANSA(cfg)
        self.bbox_proj = nn.Sequential(
            nn.Linear(cfg.bbox_dim, cfg.bbox_hidden), nn.ReLU(), nn.Identity(), nn.Linear(cfg.bbox_hidden, cfg.bbox_hidden)
        )
        self.final_proj = nn.Linear(cfg.descriptor_dim + cfg.bbox_hidden, cfg.descriptor_dim)
        self.register_buffer("pe", sincos_1d_table(cfg.motion_tokens, cfg.motion_token_dim)[None])
        self.eval()

    @torch.no_grad()
    def reset_fixed_buffers(self) -> None:
        """Recompute the deterministic sincos buffers (``pe`` and the PatchEmbed tables) in place.

        A model built under ``torch.device('meta')`` and materialised with ``to_empty`` has
        garbage there; the non-persistent tables are never restored by ``load_state_dict``.
        """
        cfg = self.config
        self.pe.copy_(sincos_1d_table(cfg.motion_tokens, cfg.motion_token_dim)[None].to(self.pe.dtype))
        for module in self.modules():
            if isinstance(module, PatchEmbed):
                module.reset_pos_embed()

    def fan_features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] crops in [-1, 1] -> [N, descriptor_dim] FAN_SA features."""
        self._check_images(images)
        return self.model(images.to(self.final_proj.weight.dtype))

    def descriptor(self, images: torch.Tensor, f_rts: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] crops + [N, 3] f_rts -> [N, descriptor_dim] (final_proj output)."""
        return self.describe(images, f_rts)[0]

    def describe(self, images: torch.Tensor, f_rts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(descriptor, FAN_SA features): training watches the features to catch a collapsed encoder."""
        feats = self.fan_features(images)
        box = self.bbox_proj(f_rts.to(device=feats.device, dtype=feats.dtype).reshape(feats.shape[0], -1))
        return self.final_proj(torch.cat([feats, box], dim=1)), feats

    def tokens(self, descriptor: torch.Tensor) -> torch.Tensor:
        """[..., descriptor_dim] -> [..., motion_tokens, motion_token_dim] with ``pe`` added."""
        cfg = self.config
        tok = descriptor.reshape(*descriptor.shape[:-1], cfg.motion_tokens, cfg.motion_token_dim)
        return tok + self.pe.to(tok.dtype)

    def forward(self, images: torch.Tensor, f_rts: torch.Tensor) -> torch.Tensor:
        """Official call: [B,3,S,S] + [B,3] -> [B,32,16]; [B,3,F,S,S] + [B,F,3] -> [B,F,32,16]."""
        if images.ndim == 4:
            return self.tokens(self.descriptor(images, f_rts))
        if images.ndim != 5:
            raise ValueError(f"expected [B,3,H,W] or [B,3,F,H,W] images, got {tuple(images.shape)}")
        b, c, f, h, w = images.shape
        frames = images.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        desc = self.descriptor(frames, f_rts.reshape(b * f, -1))
        return self.tokens(desc.reshape(b, f, -1))

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"expected [N,3,{s},{s}] images in [-1,1], got {tuple(images.shape)}")

