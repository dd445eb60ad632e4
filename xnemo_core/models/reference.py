"""The reference UNet and its attention bank.

Why a bank: X-NeMo reads the reference appearance through "mutual self-attention". The reference
UNet runs once (timestep 0, clean reference latent) and every BasicTransformerBlock records the
tokens its attn1 sees; each denoiser attn1 then attends to [own tokens || recorded tokens] of the
block with the same name. Blocks are paired by name (the official width-sorted zip gives the same
pairs). Training drops a random fraction of reference tokens (reference feature masking, 30%).
"""
from __future__ import annotations

import torch

from ..config import UNetConfig
from .attention import ReferenceRecorder, ReferenceWriteProcessor
from .unet import SpatialUNet, reference_block_names

ReferenceKV = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ReferenceUNet(SpatialUNet):
    """The reference UNet: an SD UNet without conv_norm_out / conv_out, run once to fill the bank."""

    def __init__(self, config: UNetConfig):
        super().__init__(config, with_output_head=False)
        self.recorder = ReferenceRecorder()
        self.block_names = reference_block_names(self)
        for name in self.block_names:
            self.get_submodule(name).attn1.set_processor(ReferenceWriteProcessor(self.recorder, name))

    def forward(self, reference_latents: torch.Tensor, clip_embeds: torch.Tensor, timestep=0) -> dict[str, torch.Tensor]:
        """reference_latents [R,4,h,w], clip_embeds [R,1,D] -> {block name: norm1 tokens [R, L, C]}."""
        temb = self.time_embedding_for(timestep, reference_latents.shape[0], self.dtype, reference_latents.device)
        self.recorder.tokens = {}
        self.recorder.recording = True
        try:
            self.walk(reference_latents.to(self.dtype), temb, clip_embeds.to(self.dtype), hook=None)
        finally:
            self.recorder.recording = False
        tokens, self.recorder.tokens = self.recorder.tokens, {}
        return tokens


def mask_reference_kv(kv: ReferenceKV, ratio: float, generator: torch.Generator | None = None) -> ReferenceKV:
    """Reference feature masking: keep a random (1-ratio) share of each reference row's tokens.

    The same tokens are dropped from K and V; every row keeps round((1-ratio)*L) tokens, so rows stay
    batchable. ratio 0 returns the input unchanged.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"reference masking ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return kv
    out: ReferenceKV = {}
    for name, (k, v) in kv.items():
        rows, length, _ = k.shape
        keep = max(1, int(round((1.0 - ratio) * length)))
        scores = torch.rand(rows, length, generator=generator, device="cpu")
        index = scores.argsort(dim=1)[:, :keep].sort(dim=1).values.to(k.device)
        gather = index.unsqueeze(-1).expand(-1, -1, k.shape[-1])
        out[name] = (k.gather(1, gather), v.gather(1, gather))
    return out
