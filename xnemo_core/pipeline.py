"""The X-NeMo sampler: reference encoding, CFG over context windows, and chunked temporal decoding.

Release-faithful by default (DDIM 35 steps, CFG 2.5, blurred-and-noised reference start, closed-loop
windows of 24 with overlap 4, negative branch = no reference + zero CLIP + the reference's own motion)
but without the release's waste: motion tokens come in precomputed, the reference UNet runs once at
batch 1 and its K/V are projected once per layer, CFG-unconditional rows do no reference attention,
and every random draw comes from one seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import INITS, SCHEDULERS, SamplingConfig
from .errors import Cancelled, InvalidInputError
from .models.stack import XNeMoModels
from .windows import context_windows, window_weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SD latent -> RGB linear approximation for cheap step previews
LATENT_RGB_FACTORS = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)
RELEASE_SCHEDULER = dict(beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                         steps_offset=1, prediction_type="epsilon", set_alpha_to_one=True, timestep_spacing="leading")

ProgressFn = Callable[[int, int, "np.ndarray | None"], None]
CancelFn = Callable[[], bool]


PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_scheduler(name: str = "ddim", prediction_type: str = "epsilon"):
    """diffusers scheduler with the release's noise schedule (DDIM is the release's sampler) for a
    denoiser that predicts `prediction_type` (the model config's)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise InvalidInputError(f"unknown prediction type {prediction_type!r}; one of {', '.join(PREDICTION_TYPES)}")
    if name == "ddim":
        return DDIMScheduler(**{**RELEASE_SCHEDULER, "prediction_type": prediction_type})
    common = {k: RELEASE_SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule", "steps_offset",
                                                "timestep_spacing")}
    common["prediction_type"] = prediction_type
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    if name == "euler":
        return EulerDiscreteScheduler(**common)
    raise InvalidInputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def schedule_timesteps(scheduler, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The timesteps to run: all `steps` of the schedule, or (denoise < 1) the last `steps` of a
    schedule of round(steps / denoise) steps, as ComfyUI's KSampler does; sets the scheduler to match."""
    total = steps if denoise >= 1.0 else max(steps, int(round(steps / denoise)))
    scheduler.set_timesteps(total, device="cpu")
    if total == steps:
        return scheduler.timesteps
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[-steps * order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(len(scheduler.timesteps) - len(timesteps))
    return timesteps


def gaussian_blur(x: torch.Tensor, kernel_size: int = 9, sigma: float = 18.0) -> torch.Tensor:
    """Depthwise Gaussian blur with reflect padding on [N, C, H, W] (the release's latent degradation)."""
    half = (kernel_size - 1) / 2
    coords = torch.linspace(-half, half, kernel_size, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (coords / sigma) ** 2)
    k1 = (k1 / k1.sum()).to(x)
    kernel = torch.outer(k1, k1).expand(x.shape[1], 1, kernel_size, kernel_size)
    pad = int(half)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect" if min(x.shape[-2:]) > pad else "replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1])


def clip_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] reference crop -> CLIP pixel values [1,3,224,224] (PIL bicubic 224, OpenAI mean/std)."""
    from PIL import Image

    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1] (u/255*2-1, the release's normalisation)."""
    x = torch.as_tensor(np.array(images_uint8, copy=True)).float()
    return (x / 255.0 * 2.0 - 1.0).movedim(-1, -3)


@dataclass
class PreparedReference:
    """Everything derived from the reference image once per run (reusable across runs and windows)."""

    latents: torch.Tensor  # [1,4,h,w], scaled
    clip_embeds: torch.Tensor  # [1,1,D]
    reference_kv: dict  # per-block (K, V) for the denoiser's attn1
    negative_motion: torch.Tensor  # [1,T,16] tokens of the reference's own motion


@dataclass
class SampleResult:
    video: torch.Tensor  # [1,3,F,H,W] float in [0,1] on CPU
    latents: torch.Tensor  # final latents [1,4,F,h,w]
    windows: list  # per step, the frame windows used
    offsets: list  # per step, the window offset


class XNeMoPipeline:
    """Samples a portrait animation from a prepared reference and per-frame motion tokens."""

    def __init__(self, models: XNeMoModels):
        self.models = models

    @property
    def device(self):
        return self.models.device

    @property
    def dtype(self):
        return self.models.dtype

    # ------------------------------------------------------------------ reference side (once per run)
    @torch.no_grad()
    def encode_clip(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.models.image_encoder(pixel_values=pixel_values.to(self.device, self.dtype))
        return out.image_embeds[:, None]

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images [N,3,H,W] in [-1,1] -> posterior mean x scaling factor."""
        vae = self.models.vae
        dist = vae.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean * self.models.config.vae.scaling_factor

    @torch.no_grad()
    def prepare_reference(self, reference_image: torch.Tensor, clip_pixel_values: torch.Tensor,
                          motion_reference_image: torch.Tensor, motion_reference_f_rts=(0.0, 0.0, 1.0)) -> PreparedReference:
        """reference_image [1,3,H,W] in [-1,1]; clip_pixel_values [1,3,224,224]; motion_reference_image [1,3,224,224]."""
        latents = self.encode_latents(reference_image)
        clip = self.encode_clip(clip_pixel_values)
        bank = self.models.reference_unet(latents, clip, timestep=0)
        kv = self.models.denoising_unet.project_reference(bank)
        f_rts = torch.tensor([list(motion_reference_f_rts)], dtype=self.dtype, device=self.device)
        negative = self.models.motion_encoder(motion_reference_image.to(self.device, self.dtype), f_rts)
        return PreparedReference(latents=latents, clip_embeds=clip, reference_kv=kv, negative_motion=negative)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, reference: PreparedReference, motion_tokens: torch.Tensor, settings: SamplingConfig | None = None,
               *, noise: torch.Tensor | None = None, window_offsets: list[int] | None = None,
               progress: ProgressFn | None = None, cancel: CancelFn | None = None, decode: bool = True,
               decode_chunk: int = 25) -> SampleResult:
        """motion_tokens [F,T,16] (or [1,F,T,16]) -> video [1,3,F,H,W] in [0,1].

        `noise` [1,4,F,h,w] and `window_offsets` (one per step) override the seeded draws (parity tests).
        """
        s = settings or SamplingConfig()
        if motion_tokens.ndim == 3:
            motion_tokens = motion_tokens[None]
        frames = motion_tokens.shape[1]
        if frames < 1:
            raise InvalidInputError("no motion frames to animate")
        if s.steps < 1:
            raise InvalidInputError(f"steps must be >= 1, got {s.steps}")
        max_window = self.models.config.unet.temporal_max_len
        if min(s.context_frames, frames) > max_window:
            raise InvalidInputError(f"context_frames {s.context_frames} exceeds the temporal modules' {max_window}")
        device, dtype = self.device, self.dtype
        if not 0.0 < s.denoise <= 1.0:
            raise InvalidInputError(f"denoise must be in (0, 1], got {s.denoise}")
        scheduler = make_scheduler(s.scheduler, self.models.config.unet.prediction_type)
        timesteps = schedule_timesteps(scheduler, s.steps, s.denoise)

        generator = torch.Generator("cpu").manual_seed(int(s.seed))
        offset_rng = random.Random(int(s.seed))
        base = reference.latents.float()
        _, c, h, w = base.shape
        levels = len(self.models.config.unet.block_out_channels) - 1
        if h % 2**levels or w % 2**levels or min(h, w) < 2 ** (levels + 1):
            raise InvalidInputError(
                f"latents of {h}x{w} are too small or not divisible by {2**levels} for this UNet: use a frame size "
                f"that is a multiple of {2**levels * self.models.vae_factor} px and at least "
                f"{2 ** (levels + 1) * self.models.vae_factor} px")
        if noise is None:
            noise = torch.randn((1, c, frames, h, w), generator=generator)
        noise = noise.float().to(base.device)
        if s.init in ("blurred_reference", "reference"):
            start = gaussian_blur(base) if s.init == "blurred_reference" else base
            latents = scheduler.add_noise(start[:, :, None].expand(1, c, frames, h, w), noise, timesteps[:1])
        elif s.init == "noise":
            if s.denoise < 1.0:
                raise InvalidInputError("denoise < 1 needs an init latent: use init 'reference' or 'blurred_reference'")
            latents = noise * scheduler.init_noise_sigma
        else:
            raise InvalidInputError(f"unknown init {s.init!r}; use one of {', '.join(INITS)}")

        do_cfg = s.guidance_scale > 1.0
        cond_clip = reference.clip_embeds.to(device, dtype)
        motion = motion_tokens.to(device, dtype)
        if do_cfg:
            clip = torch.cat([torch.zeros_like(cond_clip), cond_clip])
            rows = torch.tensor([-1, 0])
        else:
            clip, rows = cond_clip, torch.tensor([0])

        used_windows, used_offsets = [], []
        for step, t in enumerate(timesteps):
            offset = window_offsets[step] if window_offsets is not None else offset_rng.randint(0, s.context_frames - 1)
            windows = context_windows(frames, s.context_frames, s.context_overlap, offset, s.closed_loop)
            counts = window_weights(windows, frames)
            used_windows.append(windows)
            used_offsets.append(int(offset))
            eps_sum = torch.zeros((2 if do_cfg else 1, c, frames, h, w), device=latents.device)
            for window in windows:
                if cancel is not None and cancel():
                    raise Cancelled(f"sampling cancelled at step {step + 1}/{len(timesteps)}")
                index = torch.tensor(window, device=latents.device)
                x = scheduler.scale_model_input(latents[:, :, index], t).to(device, dtype)
                window_motion = motion[:, index.to(motion.device)]
                if do_cfg:
                    x = x.expand(2, -1, -1, -1, -1)
                    negative = reference.negative_motion.to(device, dtype)[:, None].expand(1, len(window), -1, -1)
                    window_motion = torch.cat([negative, window_motion])
                eps = self.models.denoising_unet(x, t, clip, window_motion, reference.reference_kv, rows)
                eps_sum[:, :, index] += eps.float()
            eps = eps_sum / counts.to(eps_sum.device).view(1, 1, -1, 1, 1)
            if do_cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + s.guidance_scale * (cond - uncond)
            out = scheduler.step(eps, t, latents)  # fp32 scheduler math
            latents = out.prev_sample
            if progress is not None:
                x0 = getattr(out, "pred_original_sample", None)
                progress(step + 1, len(timesteps), latent_preview(x0 if x0 is not None else latents))

        video = self.decode(latents, decode_chunk, cancel) if decode else None
        return SampleResult(video=video, latents=latents.cpu(), windows=used_windows, offsets=used_offsets)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 25, cancel: CancelFn | None = None,
               clamp: bool = True) -> torch.Tensor:
        """[1,4,F,h,w] latents -> [1,3,F,H,W] in [0,1], decoding `chunk` frames at a time (bounded memory)."""
        vae = self.models.vae
        _, c, frames, h, w = latents.shape
        flat = (latents[0].permute(1, 0, 2, 3) / self.models.config.vae.scaling_factor)
        pieces = []
        for start in range(0, frames, chunk):
            if cancel is not None and cancel():
                raise Cancelled("decoding cancelled")
            z = flat[start:start + chunk].to(self.device, self.dtype)
            pieces.append(vae.decode(z, num_frames=z.shape[0]).sample.float().cpu())
        video = torch.cat(pieces).permute(1, 0, 2, 3)[None]
        return (video / 2 + 0.5).clamp(0, 1) if clamp else video


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """Cheap RGB preview (uint8 [h,w,3]) of the first frame of [1,4,F,h,w] latents."""
    frame = latents[0, :, 0].float().cpu()
    rgb = torch.einsum("chw,cr->hwr", frame, LATENT_RGB_FACTORS)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
