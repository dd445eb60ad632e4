"""Speed and memory benchmark: motion extraction, sampling per frame, VAE decode, UNet FLOPs.

Why a script and not a test: timings depend on the machine; the numbers are printed (and saved as
JSON) so runs can be compared across commits and devices.
"""
from __future__ import annotations

import resource
import time

import torch

from .config import SamplingConfig, XNeMoConfig


def _models(weights, device, precision):
    from .animate import load_models, resolve_device
    from .checkpoints import resolve_dtype
    from .models.stack import build_models

    if weights in ("official-random", "tiny-random"):
        config = XNeMoConfig.official() if weights == "official-random" else XNeMoConfig.tiny()
        dev = resolve_device(device)
        return build_models(config).to(device=dev, dtype=resolve_dtype(precision, dev))
    return load_models(weights, device, precision)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def unet_flops(models, size: int, frames: int, cfg: bool) -> float:
    """FLOPs of one denoiser call on one window (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .animate import native_resolution

    cfgm = models.config
    factor = native_resolution(models) // cfgm.unet.sample_size
    h = size // factor
    b = 2 if cfg else 1
    dev, dt = models.device, models.dtype
    x = torch.zeros(b, cfgm.unet.in_channels, frames, h, h, device=dev, dtype=dt)
    clip = torch.zeros(b, 1, cfgm.unet.cross_attention_dim, device=dev, dtype=dt)
    motion = torch.zeros(b, frames, cfgm.unet.motion_tokens, cfgm.unet.motion_token_dim, device=dev, dtype=dt)
    ref_lat = torch.zeros(1, cfgm.unet.in_channels, h, h, device=dev, dtype=dt)
    with torch.no_grad():
        kv = models.denoising_unet.project_reference(models.reference_unet(ref_lat, clip[-1:]))
        rows = torch.tensor([-1, 0]) if cfg else torch.tensor([0])
        with FlopCounterMode(display=False) as counter:
            models.denoising_unet(x, 500, clip, motion, kv, rows)
    return float(counter.get_total_flops())


@torch.no_grad()
def run_bench(weights=None, size=None, frames=24, steps=2, cfg=2.5, device="auto", precision="auto",
              extraction_frames=16) -> dict:
    from .animate import native_resolution
    from .motion import extract_motion
    from .pipeline import XNeMoPipeline

    models = _models(weights, device, precision)
    dev = models.device
    size = size or native_resolution(models)
    results = {"model": models.config.name, "device": str(dev), "dtype": str(models.dtype).replace("torch.", ""),
               "size_px": size, "frames": frames, "steps": steps, "cfg": cfg}
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    crop = models.config.motion_encoder.image_size
    crops = torch.randint(0, 255, (extraction_frames, crop, crop, 3), dtype=torch.uint8).numpy()
    f_rts = torch.tensor([[0.0, 0.0, 1.0]]).repeat(extraction_frames, 1)
    extract_motion(models.motion_encoder, crops[:2], f_rts[:2])  # warm-up
    sync()
    t = time.perf_counter()
    extract_motion(models.motion_encoder, crops, f_rts, batch_size=16)
    sync()
    results["motion_extraction_fps"] = round(extraction_frames / (time.perf_counter() - t), 2)

    pipe = XNeMoPipeline(models)
    ref = torch.rand(1, 3, size, size, device=dev) * 2 - 1
    clip_px = torch.zeros(1, 3, models.config.image_encoder.image_size, models.config.image_encoder.image_size)
    prepared = pipe.prepare_reference(ref, clip_px, torch.zeros(1, 3, crop, crop))
    tokens = torch.randn(frames, models.config.unet.motion_tokens, models.config.unet.motion_token_dim)
    settings = SamplingConfig(steps=steps, guidance_scale=cfg)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync()
    t = time.perf_counter()
    out = pipe.sample(prepared, tokens, settings, decode=False)
    sync()
    sample_s = time.perf_counter() - t
    results["sampling_s_per_frame_per_step"] = round(sample_s / frames / steps, 4)
    results["sampling_s_per_frame_35_steps"] = round(sample_s / frames / steps * 35, 3)
    t = time.perf_counter()
    pipe.decode(out.latents.to(dev))
    sync()
    results["vae_decode_s_per_frame"] = round((time.perf_counter() - t) / frames, 4)
    results["peak_memory_mb"] = round(_peak_memory_mb(dev), 1)

    window = min(frames, settings.context_frames)
    flops = unet_flops(models, size, window, cfg > 1)
    windows_per_step = len(out.windows[0])
    results["unet_gflop_per_window_call"] = round(flops / 1e9, 2)
    results["achieved_tflops"] = round(flops * windows_per_step * steps / sample_s / 1e12, 3)
    return results
