"""Training configuration: one YAML file per stage, read into nested dataclasses.

Unknown keys are errors (a typo in a YAML file should not silently fall back to a default).
Relative paths are taken from the current directory (run from the repository root).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xnemo_core.config import XNeMoConfig

# stage name -> what it trains (see training/stages.py for the exact parameter sets)
STAGES = {
    "vae": "the small VAE of a from-scratch size (encoder + temporal decoder)",
    "vae_decoder": "the VAE's temporal decoder alone (encoder frozen, so the latent space stays put)",
    "image": "stage 1: spatial denoising UNet + reference UNet on image pairs",
    "motion_init": "the motion encoder alone, regressing MediaPipe blendshapes + head pose (from-scratch sizes)",
    "motion": "stage 2: motion encoder + motion attention modules + GAN head, end to end",
    "joint": "stage 2b (small models): stage 1's and stage 2's diffusion parameters trained together on image pairs",
    "temporal": "stage 3: temporal attention modules on clips",
}
STAGE_ALIASES = {"0": "vae", "1": "image", "2": "motion", "3": "temporal", "stage1": "image", "stage2": "motion",
                 "stage3": "temporal"}


class ConfigError(ValueError):
    """A training config is malformed (unknown key, wrong type, impossible value)."""


@dataclass
class ModelSpec:
    """Which model size to build and where its starting weights come from."""

    preset: str = "tiny"  # official | tiny | demo (XNeMoConfig presets)
    config: dict | None = None  # a full XNeMoConfig dict; wins over preset
    # scratch: seeded random init (inserted modules' proj_out zeroed);
    # bundle: an xnemo bundle (e.g. the previous stage's final.safetensors);
    # official: the official release folder (path = folder with xnemo_*.pth);
    # sd_image_variations: path = lambdalabs/sd-image-variations-diffusers folder (unet/, image_encoder/)
    init: str = "scratch"
    path: str | None = None
    base_dir: str | None = None  # official: sd-image-variations folder (default: path/sd-image-variations-diffusers)
    vae_dir: str | None = None  # official / sd_image_variations: SVD vae/ folder
    gan_head: str | None = None  # optional gan_head.safetensors of an earlier run to continue from
    # start the reference UNet as a copy of the denoiser's spatial weights, as starting both from SD does at
    # full size: the two UNets then see one feature space, and reference attention can match from step 0
    reference_from_denoiser: bool = False
    # set the denoiser's prediction type (epsilon | v_prediction) of a stack that has not been trained yet
    # (e.g. the VAE stage's bundle); None keeps the starting weights' own
    prediction_type: str | None = None
    # take the motion encoder from this bundle instead (e.g. a motion_init run's final.safetensors)
    motion_encoder_from: str | None = None

    def xnemo_config(self) -> XNeMoConfig:
        if self.config is not None:
            return XNeMoConfig.from_dict(self.config)
        presets = {"official": XNeMoConfig.official, "tiny": XNeMoConfig.tiny, "demo": XNeMoConfig.demo}
        if self.preset not in presets:
            raise ConfigError(f"model.preset must be one of {sorted(presets)}, got {self.preset!r}")
        return presets[self.preset]()


@dataclass
class DataSpec:
    """Face videos (mp4/mov/... files or folders of frames) and still images, cropped around the face."""

    roots: list = field(default_factory=list)  # files or folders, searched recursively
    resolution: int = 512  # appearance crop (VAE input) side in pixels
    fps: float = 25.0  # videos are resampled to this rate
    frame_folder_fps: float = 25.0  # rate of folders of frames
    clip_frames: int = 1  # frames per sample: 1 for image stages, 24 for stage 3
    frame_stride: int = 1  # spacing of clip frames (at `fps`)
    max_gap: int = 0  # max |reference - driving| in frames for pairs (0 = anywhere in the video)
    # Copy pairs (not in the paper; off by default): this fraction of pairs drives the reference frame with
    # itself, so the denoiser is taught outright to take appearance from the reference, not from memory.
    same_frame_prob: float = 0.0
    holdout_fraction: float = 0.0  # the last fraction of every video is kept out of training
    holdout_sources: list = field(default_factory=list)  # file/folder names kept out entirely
    stills: bool = True  # use still images as one-frame videos
    detector: str = "mediapipe"  # mediapipe | full_frame (already-cropped faces)
    cache_dir: str | None = None  # face-box cache (default ~/.cache/xnemo/face_boxes)
    work_scale: float = 2.0  # frames are kept downscaled so the appearance crop is ~work_scale x resolution
    max_frames_per_video: int = 0  # 0 = all
    video_weighting: str = "frames"  # frames | uniform: how often each video is drawn
    num_workers: int = 0


@dataclass
class AugmentSpec:
    """Driving-image augmentation (§3.3): colour jitter, random scale, piecewise affine warp, face crop."""

    enabled: bool = True
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05  # fraction of a full turn
    scale: float = 0.3  # crop side scaled by U[1 - scale, 1 + scale]
    warp_grid: int = 4  # control points per side of the piecewise affine mesh (+1)
    warp_strength: float = 0.03  # control-point displacement std, fraction of the crop side
    crop_scale: float = 1.1  # face-centred crop side = crop_scale * max(face w, h)
    # Paired appearance augmentation (not in the paper; off by default): one draw applied alike to the
    # reference and its targets (mirror, colour, a shift/zoom of the shared appearance crop), so the
    # denoiser cannot recall a trained frame from its motion and must take appearance and placement from
    # the reference. Mirroring also mirrors the driving frames and face boxes, keeping motion consistent.
    pair_flip: float = 0.0  # probability of mirroring the whole sample
    pair_colour: float = 0.0  # brightness / contrast / saturation in U[1 - a, 1 + a]; hue U[-a/6, a/6]
    pair_shift: float = 0.0  # appearance crop centre moved by U[-a, a] of its side, x and y
    pair_zoom: float = 0.0  # appearance crop side scaled by U[1 - a, 1 + a]


@dataclass
class LossSpec:
    """Loss weights. GAN-head weights follow the paper's appendix A (1.0 / 3e-2 / 6e-3 / 1 / 10)."""

    diffusion: float = 1.0
    reference_mask_ratio: float = 0.3  # reference feature masking while training
    uncond_prob: float = 0.1  # drop reference, CLIP and driving motion together (trains the CFG negative)
    f_rts_mode: str = "paper"  # paper: from face boxes | constant: (0, 0, 1) as the release feeds
    # per-sample weight of the ε-MSE: 1 (plain ε-loss), or clamp(1/SNR(t), 1, max_x0_weight), which scores
    # high-noise steps by their x0 error (what sampling from noise needs first; speeds up short trainings).
    # Only for ε-prediction models: a v-prediction loss already scores high-noise steps by their x0 error.
    x0_weighting: bool = False
    max_x0_weight: float = 100.0
    # Reference-start training (not in the paper; off by default). Sampling with init 'reference' and
    # denoise d starts from the reference latent noised at t0 ≈ 1000·d: that is the target noised at t0
    # with the noise ε' = ε + √SNR(t0)·(z_ref − z_target), which DDIM carries down the schedule. A
    # fraction `reference_start_prob` of samples is noised that way (t uniform in [0, reference_start_t]),
    # so the denoiser learns to move from the reference to the driven frame instead of keeping its pose.
    reference_start_prob: float = 0.0
    reference_start_t: int = 300
    # GAN head (stage 2)
    gan: bool = False
    gan_weight: float = 1.0  # multiplies the whole generator loss below
    l1: float = 1.0
    vgg: float = 3e-2
    vggface: float = 6e-3
    adversarial: float = 1.0
    feature_matching: float = 10.0
    r1: float = 0.0  # R1 penalty weight on real images (0 = off)
    r1_every: int = 16
    vgg19_weights: str | None = None  # torchvision-layout VGG-19 state dict (features.N.*)
    vggface_weights: str | None = None  # VGG-16-layout VGGFace state dict (features.N.*)
    random_perceptual_ok: bool = False  # allow random-init perceptual nets (tests / no weights offline)
    perceptual_width_divisor: int = 1  # >1 narrows the perceptual nets (only meaningful with random init)
    # VAE stage
    vae_l1: float = 1.0
    vae_kl: float = 1e-6
    vae_perceptual: float = 0.0


@dataclass
class GanSpec:
    """The GAN head: ResNet-50 appearance encoder -> f_app; StyleGAN2 generator styled by [f_app, f_mot]."""

    resolution: int = 256  # generator output side (targets are resized to it)
    appearance_dim: int = 512
    appearance_width: int = 64  # ResNet stem width (64 = ResNet-50)
    appearance_layers: list = field(default_factory=lambda: [3, 4, 6, 3])  # ResNet-50
    appearance_weights: str | None = None  # optional torchvision-layout ResNet-50 state dict
    style_dim: int = 512
    mapping_layers: int = 4
    channel_base: int = 8192  # StyleGAN2: channels at resolution r = min(channel_max, channel_base / r)
    channel_max: int = 512
    disc_channel_base: int = 8192
    disc_channel_max: int = 512


@dataclass
class OptimSpec:
    lr: float = 1e-5
    gan_lr: float = 2e-4  # generator + appearance encoder
    # stage 2: the motion encoder's own rate (None = lr). A from-scratch FAN (BatchNorm, and a ReLU
    # right before its fc) collapses at UNet rates: its features stop depending on the driving frame.
    motion_encoder_lr: float | None = None
    disc_lr: float = 2e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    lr_decay: str = "constant"  # constant | cosine (to min_lr_ratio x lr at max_steps)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 4  # per process
    grad_accum: int = 1
    max_steps: int = 1000
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 = no EMA; the final bundle uses EMA weights when on
    seed: int = 42


@dataclass
class LogSpec:
    log_every: int = 10
    sample_every: int = 500  # sample grid PNGs (0 = never)
    sample_steps: int = 20  # DDIM steps for sample grids
    sample_guidance: float = 2.5  # CFG scale for sample grids
    sample_count: int = 2  # preview items per grid
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    save_dtype: str = "fp32"  # dtype of the final bundle: fp32 | fp16 | bf16


@dataclass
class TrainConfig:
    stage: str = "image"
    name: str = "run"
    output: str = "runs/run"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    gan: GanSpec = field(default_factory=GanSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    log: LogSpec = field(default_factory=LogSpec)

    def __post_init__(self):
        stage = STAGE_ALIASES.get(str(self.stage), str(self.stage))
        if stage not in STAGES:
            raise ConfigError(f"stage must be one of {list(STAGES)} (or 0-3), got {self.stage!r}")
        self.stage = stage
        if stage == "temporal" and self.data.clip_frames < 2:
            raise ConfigError("the temporal stage needs data.clip_frames >= 2")
        if stage in ("image", "motion", "joint", "motion_init") and self.data.clip_frames != 1:
            raise ConfigError(f"stage {stage!r} trains on image pairs: set data.clip_frames to 1")
        if not 0.0 <= self.loss.reference_mask_ratio < 1.0:
            raise ConfigError("loss.reference_mask_ratio must be in [0, 1)")
        if not 0.0 <= self.data.same_frame_prob <= 1.0:
            raise ConfigError("data.same_frame_prob must be in [0, 1]")
        if not 0.0 <= self.loss.reference_start_prob <= 1.0:
            raise ConfigError("loss.reference_start_prob must be in [0, 1]")
        if not 1 <= self.loss.reference_start_t <= 999:
            raise ConfigError("loss.reference_start_t must be a timestep in [1, 999] (≈ 1000 × the sampling denoise)")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS = {"model": ModelSpec, "data": DataSpec, "augment": AugmentSpec, "loss": LossSpec, "gan": GanSpec,
             "optim": OptimSpec, "log": LogSpec}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        section = _SECTIONS.get(key) if cls is TrainConfig else None
        kwargs[key] = _build(section, value or {}, f"{where}.{key}") if section else value
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "config") -> TrainConfig:
    return _build(TrainConfig, data, source)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a stage YAML; `overrides` is a nested dict merged on top (e.g. {'optim': {'max_steps': 5}})."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return config_from_dict(data, str(path))
