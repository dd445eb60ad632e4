"""The complete X-NeMo model stack as one object, built from one `XNeMoConfig`.

Why: loaders, the sampler, the nodes and training all pass the same five networks around together,
with one dtype/device policy; building them from a config (on the meta device for free) lets the
manifest check and bundle loading share one code path.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config import XNeMoConfig
from .motion_encoder import MotionEncoder
from .reference import ReferenceUNet
from .unet import DenoisingUNet3D

# module name in the stack -> what a user would recognise it as
COMPONENTS = {
    "denoising_unet": "denoising UNet3D (xnemo_denoising_unet.pth + xnemo_temporal_module.pth)",
    "reference_unet": "reference UNet (xnemo_reference_unet.pth)",
    "motion_encoder": "motion encoder (xnemo_motion_encoder.pth)",
    "vae": "temporal VAE (stable-video-diffusion vae/)",
    "image_encoder": "CLIP image encoder (sd-image-variations image_encoder/)",
}


def build_vae(config: XNeMoConfig) -> nn.Module:
    from diffusers import AutoencoderKLTemporalDecoder

    return AutoencoderKLTemporalDecoder(**config.vae.diffusers_config())


def build_image_encoder(config: XNeMoConfig) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(config.image_encoder.transformers_config())


@dataclass
class XNeMoModels:
    """The five networks of X-NeMo plus the config that rebuilds them."""

    config: XNeMoConfig
    denoising_unet: DenoisingUNet3D
    reference_unet: ReferenceUNet
    motion_encoder: MotionEncoder
    vae: nn.Module
    image_encoder: nn.Module

    def modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in COMPONENTS}

    def to(self, device=None, dtype: torch.dtype | None = None) -> "XNeMoModels":
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "XNeMoModels":
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return self.denoising_unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoising_unet.dtype

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.config.vae.block_out_channels) - 1)

    def parameter_count(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}


def build_models(config: XNeMoConfig, device: str | torch.device = "cpu") -> XNeMoModels:
    """Build a randomly initialised stack.

    device='meta' puts parameters on the meta device (no memory, no init time: for key checks and
    loading with assign) while buffers such as sinusoid tables are still computed for real.
    """
    if str(device) == "meta":
        from accelerate import init_empty_weights

        ctx = init_empty_weights(include_buffers=False)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        models = XNeMoModels(
            config=config,
            denoising_unet=DenoisingUNet3D(config.unet),
            reference_unet=ReferenceUNet(config.unet),
            motion_encoder=MotionEncoder(config.motion_encoder),
            vae=build_vae(config),
            image_encoder=build_image_encoder(config),
        )
    if str(device) != "meta":
        models.to(device)
    return models.eval()
