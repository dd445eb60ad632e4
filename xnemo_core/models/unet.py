"""The SD-1.5 UNets of X-NeMo: the reference UNet and the denoising UNet3D.

Both are diffusers `UNet2DConditionModel` blocks (so SD / sd-image-variations / official keys load
unchanged) driven by one layer walker. Video frames are folded into the batch, which makes every
GroupNorm per-frame exactly as the official inflated 3-D layers do. The denoiser inserts a motion
cross-attention module and a temporal self-attention module after every layer of every block
(21 each), in the official order: resnet -> transformer -> motion -> temporal.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..config import UNetConfig
from .attention import ReferenceReadContext, ReferenceReadProcessor, SingleTokenCrossAttentionProcessor
from .motion_modules import MotionModule, TemporalModule

LayerHook = Callable[[nn.Module, int, torch.Tensor], torch.Tensor]


def reference_block_names(unet: nn.Module) -> list[str]:
    """Names of the 16 SD BasicTransformerBlocks (the ones reference attention connects)."""
    return [name for name, module in unet.named_modules() if type(module).__name__ == "BasicTransformerBlock"]


class SpatialUNet(nn.Module):
    """SD UNet blocks plus a forward that calls `hook(block, layer_index, h)` after every layer."""

    def __init__(self, config: UNetConfig, with_output_head: bool):
        super().__init__()
        self.config = config
        base = UNet2DConditionModel(**config.diffusers_config())
        self.conv_in = base.conv_in
        self.time_proj = base.time_proj
        self.time_embedding = base.time_embedding
        self.down_blocks = base.down_blocks
        self.mid_block = base.mid_block
        self.up_blocks = base.up_blocks
        if with_output_head:
            self.conv_norm_out = base.conv_norm_out
            self.conv_act = base.conv_act
            self.conv_out = base.conv_out
        self.gradient_checkpointing = False
        for name, module in self.named_modules():
            if type(module).__name__ == "BasicTransformerBlock":
                module.attn2.set_processor(SingleTokenCrossAttentionProcessor())

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def time_embedding_for(self, timestep, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(batch)
        return self.time_embedding(self.time_proj(t).to(dtype))

    def _run(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def walk(self, sample: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, hook: LayerHook | None,
             stop_after_last_attention: bool = False) -> torch.Tensor:
        """Run conv_in, down, mid and up blocks on [N, C, H, W] (frames already folded into N)."""

        def layer(block, index, h, res=None):
            if res is not None:
                h = torch.cat([h, res], dim=1)
            h = block.resnets[index](h, temb)
            if getattr(block, "attentions", None) is not None:
                h = block.attentions[index](h, encoder_hidden_states=context, return_dict=False)[0]
            return hook(block, index, h) if hook is not None else h

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                h = self._run(lambda x, b=block, j=i: layer(b, j, x), h)
                skips.append(h)
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    h = down(h)
                skips.append(h)

        mid = self.mid_block
        h = mid.resnets[0](h, temb)
        h = mid.attentions[0](h, encoder_hidden_states=context, return_dict=False)[0]
        if hook is not None:
            h = hook(mid, 0, h)
        h = mid.resnets[1](h, temb)

        for block in self.up_blocks:
            for i in range(len(block.resnets)):
                res = skips.pop()
                h = self._run(lambda x, r, b=block, j=i: layer(b, j, x, r), h, res)
            if block.upsamplers is not None:
                size = skips[-1].shape[-2:] if skips else None
                for up in block.upsamplers:
                    h = up(h, size)
        return h


class DenoisingUNet3D(SpatialUNet):
    """The denoising UNet: SD blocks per frame + 21 motion and 21 temporal modules, reading a reference."""

    def __init__(self, config: UNetConfig):
        super().__init__(config, with_output_head=True)
        c = config
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            dim = block.resnets[-1].out_channels
            layers = 1 if block is self.mid_block else len(block.resnets)
            block.motion_modules = nn.ModuleList(
                [MotionModule(dim, c.module_heads, c.module_norm_groups, c.motion_token_dim) for _ in range(layers)]
            )
            block.temporal_modules = nn.ModuleList(
                [TemporalModule(dim, c.temporal_heads or c.module_heads, c.module_norm_groups, c.temporal_max_len)
                 for _ in range(layers)]
            )
        self.reference_context = ReferenceReadContext()
        self.block_names = reference_block_names(self)
        for name in self.block_names:
            self.get_submodule(name).attn1.set_processor(ReferenceReadProcessor(self.reference_context, name))

    def project_reference(self, bank: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Project bank tokens to K/V once with this UNet's attn1 weights (reused every step and window)."""
        missing = [n for n in self.block_names if n not in bank]
        if missing:
            raise KeyError(f"reference bank lacks blocks {missing[:3]}... ({len(missing)} missing)")
        kv = {}
        for name in self.block_names:
            attn = self.get_submodule(name).attn1
            tokens = bank[name].to(self.dtype)
            kv[name] = (attn.to_k(tokens), attn.to_v(tokens))
        return kv

    def forward(self, sample: torch.Tensor, timestep, clip_embeds: torch.Tensor, motion_tokens: torch.Tensor,
                reference_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                reference_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Predict noise for a batch of clips.

        sample [B,4,F,h,w]; clip_embeds [B,1,D]; motion_tokens [B,F,T,16];
        reference_kv from `project_reference` (R rows); reference_rows [B]: which reference row each clip
        reads, -1 for none (the CFG-unconditional branch). Default: row b when R == B, row 0 when R == 1.
        Returns [B,4,F,h,w].
        """
        b, _, f, h, w = sample.shape
        if motion_tokens.shape[:2] != (b, f):
            raise ValueError(f"motion tokens {tuple(motion_tokens.shape)} do not match {b} clips x {f} frames")
        dtype = self.dtype
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w).to(dtype)
        temb = self.time_embedding_for(timestep, b, dtype, x.device).repeat_interleave(f, dim=0)
        context = clip_embeds.to(dtype).repeat_interleave(f, dim=0)
        motion = motion_tokens.reshape(b * f, *motion_tokens.shape[2:]).to(dtype)

        ctx = self.reference_context
        ctx.kv = reference_kv
        if reference_kv is not None:
            if reference_rows is None:
                r = next(iter(reference_kv.values()))[0].shape[0]
                reference_rows = torch.arange(b) if r == b else torch.zeros(b, dtype=torch.long)
            ctx.row_reference = torch.as_tensor(reference_rows, dtype=torch.long).repeat_interleave(f)
        else:
            ctx.row_reference = None

        def insert(block, index, hidden):
            hidden = block.motion_modules[index](hidden, motion)
            return block.temporal_modules[index](hidden, f)

        # The context stays set after the call (the next call overwrites it): gradient checkpointing
        # re-runs attention during backward and must see the same reference.
        out = self.walk(x, temb, context, insert)
        out = self.conv_out(self.conv_act(self.conv_norm_out(out)))
        return out.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)
