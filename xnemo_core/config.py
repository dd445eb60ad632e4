"""Model-size and sampling configuration as plain dataclasses with a JSON round trip.

Why: every model in the pack (official full size, the tiny test size, the bundled demo model,
and whatever the parity fixtures describe) is rebuilt from one of these objects, so a checkpoint
bundle can carry its own config and be rebuilt without guessing.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def _from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a dict, ignoring unknown keys and recursing into nested configs."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _NESTED.get((cls.__name__, f.name))
        if sub is not None and isinstance(value, dict):
            value = _from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class UNetConfig(_JsonMixin):
    """Shapes shared by the reference UNet and the denoising UNet3D (an SD-1.5 UNet)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int = 8  # SD-1.x quirk: this is the number of heads
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    # inserted modules (motion cross-attention and temporal self-attention)
    module_heads: int = 8  # motion cross-attention heads
    temporal_heads: int | None = None  # temporal self-attention heads (None: same as module_heads)
    module_norm_groups: int = 32
    motion_tokens: int = 32
    motion_token_dim: int = 16
    temporal_max_len: int = 32
    # what the denoiser predicts: the release's "epsilon", or "v_prediction" (v = √ᾱ·ε − √(1−ᾱ)·x0), which keeps
    # early, high-noise steps well-posed for small models trained briefly (the demo model)
    prediction_type: str = "epsilon"

    def diffusers_config(self) -> dict[str, Any]:
        """Arguments for diffusers' UNet2DConditionModel (sd-image-variations layout)."""
        return dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            flip_sin_to_cos=True,
            freq_shift=0,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            downsample_padding=1,
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=self.attention_head_dim,
            use_linear_projection=False,
        )

    @classmethod
    def from_official(cls, cfg: dict[str, Any]) -> "UNetConfig":
        """Read an official/diffusers UNet config dict (plus unet_additional_kwargs if merged)."""
        mm = cfg.get("motion_module_kwargs") or {}
        tm = cfg.get("temporal_module_kwargs") or {}
        return cls(
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=int(cfg.get("layers_per_block", 2)),
            attention_head_dim=int(cfg.get("attention_head_dim", 8)),
            cross_attention_dim=int(cfg.get("cross_attention_dim", 768)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            in_channels=int(cfg.get("in_channels", 4)),
            out_channels=int(cfg.get("out_channels", 4)),
            sample_size=int(cfg.get("sample_size", 64)),
            module_heads=int(mm.get("num_attention_heads", 8)),
            temporal_heads=int(tm.get("num_attention_heads", mm.get("num_attention_heads", 8))),
            motion_token_dim=int(mm.get("cross_attention_dim", 16)),
            temporal_max_len=int(tm.get("temporal_position_encoding_max_len", 32)),
        )


@dataclass(frozen=True)
class MotionEncoderConfig(_JsonMixin):
    """FAN_SA backbone + f_rts MLP + token head. Defaults are the official (fixed) architecture."""

    image_size: int = 224
    stem_channels: int = 64
    hourglass_channels: int = 256
    hourglass_depth: int = 4
    num_landmarks: int = 68
    attn_embed_dim: int = 1024
    attn_heads: int = 8
    attn_norm_groups: int = 32  # GroupNorm before each patch attention (eps 1e-6)
    descriptor_dim: int = 512
    bbox_dim: int = 3
    bbox_hidden: int = 64
    motion_tokens: int = 32
    motion_token_dim: int = 16


@dataclass(frozen=True)
class VAEConfig(_JsonMixin):
    """diffusers AutoencoderKLTemporalDecoder (the SVD VAE) shapes."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    scaling_factor: float = 0.18215

    def diffusers_config(self) -> dict[str, Any]:
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(self.block_out_channels),
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            scaling_factor=self.scaling_factor,
        )


@dataclass(frozen=True)
class ImageEncoderConfig(_JsonMixin):
    """transformers CLIPVisionModelWithProjection shapes (ViT-L/14 by default)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def transformers_config(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**dataclasses.asdict(self))


@dataclass(frozen=True)
class XNeMoConfig(_JsonMixin):
    """Everything needed to rebuild a complete model stack."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    motion_encoder: MotionEncoderConfig = field(default_factory=MotionEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    name: str = "official"

    @classmethod
    def official(cls) -> "XNeMoConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "XNeMoConfig":
        """Small enough for unit tests on CPU (seconds), same topology as the official model."""
        return cls(
            unet=UNetConfig(block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, sample_size=16),
            motion_encoder=MotionEncoderConfig(
                stem_channels=16, hourglass_channels=64, attn_embed_dim=128, attn_heads=4, descriptor_dim=512
            ),
            vae=VAEConfig(block_out_channels=(32, 64, 128, 128)),
            image_encoder=ImageEncoderConfig(
                hidden_size=64, intermediate_size=128, projection_dim=32, num_hidden_layers=2, num_attention_heads=4
            ),
            name="tiny",
        )

    @classmethod
    def demo(cls) -> "XNeMoConfig":
        """The bundled demo model: trained from scratch on CPU at 64x64 px (`python -m training.demo`).

        Same topology as the official model, narrower everywhere; its own 3-level VAE (latents at 1/4
        size: 16x16 for a 64 px frame), a motion encoder on 64 px crops and a one-layer CLIP stand-in,
        so the whole stack stays well under 25 MB in fp16.
        """
        return cls(
            unet=UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=4,
                            cross_attention_dim=32, norm_num_groups=8, sample_size=16, module_heads=4,
                            module_norm_groups=8, prediction_type="v_prediction"),
            motion_encoder=MotionEncoderConfig(image_size=64, stem_channels=16, hourglass_channels=32,
                                               hourglass_depth=3, attn_embed_dim=64, attn_heads=4, attn_norm_groups=8),
            vae=VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1),
            image_encoder=ImageEncoderConfig(hidden_size=32, intermediate_size=64, projection_dim=32,
                                             num_hidden_layers=1, num_attention_heads=2, patch_size=32),
            name="demo",
        )


_NESTED = {
    ("XNeMoConfig", "unet"): UNetConfig,
    ("XNeMoConfig", "motion_encoder"): MotionEncoderConfig,
    ("XNeMoConfig", "vae"): VAEConfig,
    ("XNeMoConfig", "image_encoder"): ImageEncoderConfig,
}


SCHEDULERS = ("ddim", "dpmpp_2m", "euler")  # SamplingConfig.scheduler
INITS = ("blurred_reference", "reference", "noise")  # SamplingConfig.init: start latents


@dataclass(frozen=True)
class SamplingConfig(_JsonMixin):
    """Sampler settings. Defaults reproduce the official release (35 steps, CFG 2.5)."""

    steps: int = 35
    guidance_scale: float = 2.5
    scheduler: str = "ddim"  # ddim | dpmpp_2m | euler
    context_frames: int = 24
    context_overlap: int = 4
    closed_loop: bool = True  # release: windows wrap from the clip's end to its start
    init: str = "blurred_reference"  # blurred_reference | reference | noise
    # ComfyUI's KSampler meaning: < 1 starts part-way down a schedule of round(steps / denoise) steps from the
    # noised init latent and runs its last `steps`; 1 is the release (start at the first timestep)
    denoise: float = 1.0
    seed: int = 0
