"""Pathway check: does the denoiser use the reference, and the motion? Its x0 error per noise level.

For (reference frame, driving frame) pairs, the driving frame's latent is noised at timestep t and
the denoiser predicts x0 under three conditions (same noise):

* `full`: the reference bank and the driving frame's motion (what sampling uses);
* `no_reference`: the CFG-negative row (no reference bank, zero CLIP embedding);
* `own_motion`: the reference bank with the reference's own motion in place of the driving motion.

`reference_latent` scores the reference latent itself as the x0 guess. A pathway the model uses
lowers the error: `no_reference` above `full` means the reference helps, and `own_motion` equal to
`full` means the motion is ignored (how the collapsed demo encoder showed). `full` above
`reference_latent` at high t means the model cannot yet copy the reference's appearance.

With `--reference-start T0` the driving latent is noised as a sample started from the reference at T0
sees it (ε' of `losses.reference_start_noise`, timesteps <= T0): the input keeps the reference's layout,
so only the motion can tell the denoiser where the head went. This is the regime sampling with
`init: reference` runs in; the default regime (noised target) already shows the target's layout.

Pairs: each segment's first frame with the frames 3, 10 and 30 later (`--gaps`), or `--random-pairs N`
drawn anywhere in the split at least `--min-gap` frames apart (larger head motion, a sharper test).

`python -m training.diagnose --bundle xnemo_core/assets/demo_model.safetensors --config training/configs/demo_stage1.yaml`
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from xnemo_core.models.stack import XNeMoModels

from .data import FaceVideo, make_sample
from .evaluate import split_segments
from .losses import reference_start_noise, release_alphas_cumprod

CONDITIONS = ("full", "no_reference", "own_motion", "reference_latent")


def x0_from_prediction(prediction: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor,
                       prediction_type: str) -> torch.Tensor:
    """The x0 a denoiser output implies (ε: (x_t − √(1−ᾱ)ε)/√ᾱ; v: √ᾱ·x_t − √(1−ᾱ)·v)."""
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
    return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()


def pair_list(videos: list[FaceVideo], split: str, gaps=(3, 10, 30)) -> list[tuple[FaceVideo, int, int]]:
    """(video, reference, driving) pairs: each segment's first frame and the frames `gaps` later."""
    return [(video, first, first + gap) for video, first, end in split_segments(videos, split)
            for gap in gaps if first + gap < end]


def random_pairs(videos: list[FaceVideo], split: str, count: int, min_gap: int = 20,
                 seed: int = 0) -> list[tuple[FaceVideo, int, int]]:
    """`count` (video, reference, driving) pairs drawn anywhere in the split, at least `min_gap` frames
    apart (videos in turn). Short fixed gaps barely move the head, so they hardly test the motion path."""
    rng = random.Random(seed)
    held_out = split == "held_out"
    usable = [v for v in videos if len(v.split_frames(held_out)) > min_gap]
    pairs = []
    for i in range(count if usable else 0):
        video = usable[i % len(usable)]
        frames = video.split_frames(held_out)
        while True:
            ref, drv = rng.choice(frames), rng.choice(frames)
            if abs(ref - drv) >= min_gap:
                break
        pairs.append((video, ref, drv))
    return pairs


@torch.no_grad()
def pathway_errors(models: XNeMoModels, pairs, timesteps=(200, 500, 800), resolution: int = 64,
                   seed: int = 0, draws: int = 1, reference_start: int | None = None) -> dict[int, dict[str, float]]:
    """Mean latent x0-MSE per timestep and condition over `pairs` (see the module docstring)."""
    if not pairs:
        raise ValueError("no (reference, driving) pairs to diagnose: the videos are too short for the gaps")
    if reference_start is not None and max(timesteps) > reference_start:
        raise ValueError(f"with a reference start at {reference_start} the timesteps must be <= it, got {max(timesteps)}")
    device, dtype = models.device, models.dtype
    alphas = release_alphas_cumprod().to(device, torch.float32)
    scale = models.config.vae.scaling_factor
    motion_size = models.config.motion_encoder.image_size
    prediction_type = models.config.unet.prediction_type
    generator = torch.Generator().manual_seed(seed)
    sums = {t: dict.fromkeys(CONDITIONS, 0.0) for t in timesteps}
    unet = models.denoising_unet

    def to(x: torch.Tensor) -> torch.Tensor:  # one sample -> a batch of one on the model's device
        return x[None].to(device, dtype)

    for video, ref, drv in pairs:
        sample = make_sample(video, ref, [drv], resolution, motion_size)
        own = make_sample(video, ref, [ref], resolution, motion_size)
        x0 = models.vae.encode(to(sample["target"][:, 0])).latent_dist.mean * scale
        ref_latent = models.vae.encode(to(sample["reference"])).latent_dist.mean * scale
        clip = models.image_encoder(pixel_values=to(sample["reference_clip"])).image_embeds[:, None]
        motion = {"full": models.motion_encoder(to(sample["driving"]), to(sample["f_rts"])),
                  "own_motion": models.motion_encoder(to(own["driving"]), to(own["f_rts"]))}
        bank = unet.project_reference(models.reference_unet(ref_latent, clip, timestep=0))
        runs = {"full": (motion["full"], clip, [0]), "no_reference": (motion["full"], clip * 0, [-1]),
                "own_motion": (motion["own_motion"], clip, [0])}
        for t in [t for t in timesteps for _ in range(draws)]:  # `draws` noise samples per timestep
            a = alphas[t]
            noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
            if reference_start is not None:
                noise = reference_start_noise(noise, x0, ref_latent, alphas[reference_start].to(dtype))
            noisy = (a.sqrt() * x0 + (1 - a).sqrt() * noise)[:, :, None]  # [1,4,1,h,w]
            for name, (tokens, embeds, rows) in runs.items():
                out = unet(noisy, torch.tensor([t], device=device), embeds, tokens, bank, torch.tensor(rows))
                guess = x0_from_prediction(out[:, :, 0].float(), noisy[:, :, 0].float(), a, prediction_type)
                sums[t][name] += float((guess - x0.float()).pow(2).mean())
            sums[t]["reference_latent"] += float((ref_latent - x0).float().pow(2).mean())
    return {t: {k: v / (len(pairs) * draws) for k, v in row.items()} for t, row in sums.items()}


def main(argv=None) -> int:
    from xnemo_core.checkpoints import load_bundle

    from .config import load_config
    from .data import load_videos

    parser = argparse.ArgumentParser(prog="python -m training.diagnose", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--config", required=True, help="a stage YAML naming the data and its held-out split")
    parser.add_argument("--split", default="held_out", choices=["held_out", "training"])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[200, 500, 800])
    parser.add_argument("--gaps", type=int, nargs="+", default=[3, 10, 30], help="driving frame = reference + gap")
    parser.add_argument("--random-pairs", type=int, default=0, metavar="N",
                        help="instead: N pairs drawn anywhere in the split, at least --min-gap frames apart")
    parser.add_argument("--min-gap", type=int, default=20)
    parser.add_argument("--draws", type=int, default=1, help="noise draws per pair and timestep")
    parser.add_argument("--reference-start", type=int, default=None, metavar="T0",
                        help="noise as a sample started from the reference at T0 (timesteps <= T0)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    models = load_bundle(args.bundle, dtype=torch.float32).eval()
    videos = [v for v in load_videos(cfg.data) if not v.still]
    if args.random_pairs:
        pairs = random_pairs(videos, args.split, args.random_pairs, args.min_gap)
    else:
        pairs = pair_list(videos, args.split, tuple(args.gaps))
    errors = pathway_errors(models, pairs, tuple(args.timesteps), cfg.data.resolution, draws=args.draws,
                            reference_start=args.reference_start)
    print(json.dumps({t: {k: round(v, 5) for k, v in row.items()} for t, row in errors.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
