"""Self-reenactment evaluation: reference = first frame of a held-out segment, driving = later frames.

The model has to re-create each later frame from the first frame's appearance and the later
frame's motion. It is compared with the trivial baseline "repeat the reference frame" on L1 and
SSIM (Gaussian window 11, σ 1.5), both computed on the face crops in [0, 1]. With `static_motion`
it is also sampled with the reference's own motion on every frame: if that scores the same, the
model ignores motion (`motion_effect` = mean |difference| of the two outputs). With `copy` the
reference drives itself (8 frames) and is scored against itself: a denoiser that takes appearance
from the reference copies an unseen (held-out) frame about as well as a trained-on one.

`python -m training.evaluate --bundle xnemo_core/assets/demo_model.safetensors --config training/configs/demo_stage3.yaml`
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np
import torch

from xnemo_core.config import INITS, SamplingConfig
from xnemo_core.models.stack import XNeMoModels
from xnemo_core.pipeline import XNeMoPipeline

from .data import FaceVideo, make_sample
from .losses import ssim


STATIC_KEYS = ("static_motion_l1", "static_motion_ssim", "motion_effect")
COPY_FRAMES = 8  # one context window of the reference driving itself


@dataclass
class Reenactment:
    name: str
    reference: torch.Tensor  # [3,H,W] in [0,1]
    target: torch.Tensor  # [F,3,H,W]
    prediction: torch.Tensor  # [F,3,H,W]
    driving: torch.Tensor  # [F,3,S,S] motion-encoder view
    metrics: dict


@torch.no_grad()
def self_reenact(models: XNeMoModels, video: FaceVideo, start: int, frames: list[int], resolution: int,
                 settings: SamplingConfig, f_rts_mode: str = "paper", decode_chunk: int = 25,
                 static_motion: bool = False) -> Reenactment:
    """Animate frame `start` of `video` with the motion of `frames`; score against the real frames."""
    motion_size = models.config.motion_encoder.image_size
    sample = make_sample(video, start, frames, resolution, motion_size, None, f_rts_mode=f_rts_mode)
    device, dtype = models.device, models.dtype
    pipe = XNeMoPipeline(models)
    prepared = pipe.prepare_reference(sample["reference"][None].to(device, dtype),
                                      sample["reference_clip"][None].to(device, dtype),
                                      sample["motion_reference"][None].to(device, dtype))

    def animate(driven_by: dict) -> torch.Tensor:
        tokens = models.motion_encoder(driven_by["driving"][None].to(device, dtype),
                                       driven_by["f_rts"][None].to(device, dtype))
        video = pipe.sample(prepared, tokens[0], settings, decode_chunk=decode_chunk).video[0]
        return video.permute(1, 0, 2, 3).float()  # [F,3,H,W]

    video_out = animate(sample)
    target = (sample["target"].permute(1, 0, 2, 3) + 1) / 2
    reference = (sample["reference"] + 1) / 2
    repeat = reference[None].expand_as(target)
    metrics = {
        "frames": len(frames),
        "model_l1": float((video_out - target).abs().mean()),
        "repeat_reference_l1": float((repeat - target).abs().mean()),
        "model_ssim": float(ssim(video_out, target)),
        "repeat_reference_ssim": float(ssim(repeat, target)),
    }
    if static_motion:
        still = animate(make_sample(video, start, [start] * len(frames), resolution, motion_size, None,
                                    f_rts_mode=f_rts_mode))
        metrics.update(static_motion_l1=float((still - target).abs().mean()), static_motion_ssim=float(ssim(still, target)),
                       motion_effect=float((video_out - still).abs().mean()))
    return Reenactment(video.source.name, reference, target, video_out,
                       (sample["driving"].permute(1, 0, 2, 3) + 1) / 2, metrics)


def held_out_segments(videos: list[FaceVideo], min_frames: int = 8) -> list[tuple[FaceVideo, int, int]]:
    """(video, first, end) of every held-out tail long enough to evaluate."""
    return [(v, v.train_end, len(v)) for v in videos if not v.still and len(v) - v.train_end >= min_frames]


def training_segments(videos: list[FaceVideo], max_frames: int = 48,
                      min_frames: int = 8) -> list[tuple[FaceVideo, int, int]]:
    """Segments shaped like the held-out ones (reference + up to `max_frames` drivers) that end where
    each held-out tail begins: trained-on frames, for choosing sampling settings without the held-out ones."""
    out = []
    for video, first, end in held_out_segments(videos, min_frames):
        length = min(end - first, max_frames + 1)
        if first - length >= 0:
            out.append((video, first - length, first))
    return out


def split_segments(videos: list[FaceVideo], split: str, max_frames: int = 48) -> list[tuple[FaceVideo, int, int]]:
    """The held-out tails (split 'held_out') or the trained-on segments just before them ('training');
    raises if the split has none."""
    if split not in ("held_out", "training"):
        raise ValueError(f"split must be 'held_out' or 'training', got {split!r}")
    segments = held_out_segments(videos) if split == "held_out" else training_segments(videos, max_frames)
    if not segments:
        raise ValueError(f"no {split} video segment (set data.holdout_fraction)")
    return segments


def side_by_side(results: list[Reenactment], columns: int = 6, scale: int = 2) -> np.ndarray:
    """Per video three rows (real driving frames | model | repeated reference) at `columns` times."""
    import torch.nn.functional as F

    rows = []
    for r in results:
        picks = np.linspace(0, len(r.target) - 1, columns).round().astype(int)
        real = torch.cat([r.target[i] for i in picks], dim=2)
        model = torch.cat([r.prediction[i] for i in picks], dim=2)
        repeat = torch.cat([r.reference for _ in picks], dim=2)
        rows += [real, model, repeat, torch.ones_like(real[:, :2])]
    grid = torch.cat(rows[:-1], dim=1)
    grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    return (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def summarise(results: list[Reenactment]) -> dict:
    """Frame-weighted means over all evaluated segments, plus each segment's numbers."""
    total = sum(r.metrics["frames"] for r in results)
    keys = ["model_l1", "repeat_reference_l1", "model_ssim", "repeat_reference_ssim"]
    keys += [k for k in STATIC_KEYS if all(k in r.metrics for r in results)]
    mean = {k: round(sum(r.metrics[k] * r.metrics["frames"] for r in results) / total, 5) for k in keys}
    return {"mean": {"frames": total, **mean},
            "segments": {r.name: {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.metrics.items()}
                         for r in results}}


def evaluate(models: XNeMoModels, videos: list[FaceVideo], resolution: int, settings: SamplingConfig,
             max_frames: int = 48, stride: int = 1, decode_chunk: int = 25,
             split: str = "held_out", static_motion: bool = False, copy: bool = False) -> tuple[dict, list[Reenactment]]:
    """Self-reenactment on the held-out tails (split 'held_out') or on the trained-on segments just
    before them (split 'training', for choosing settings); `copy`: each segment's reference drives itself."""
    results = []
    for video, first, end in split_segments(videos, split, max_frames):
        frames = list(range(first + 1, end, stride))[:max_frames]
        if copy:
            frames = [first] * min(len(frames), COPY_FRAMES)
        results.append(self_reenact(models, video, first, frames, resolution, settings, decode_chunk=decode_chunk,
                                    static_motion=static_motion))
    return summarise(results), results


def main(argv=None) -> int:
    from PIL import Image

    from xnemo_core.checkpoints import load_bundle

    from .config import load_config
    from .data import load_videos

    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--config", required=True, help="a stage YAML naming the data and its held-out split")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--context", type=int, default=8, help="context window (frames); the clip length trained")
    parser.add_argument("--max-frames", type=int, default=48)
    parser.add_argument("--decode-chunk", type=int, default=8, help="frames per VAE decode (the VAE's clip length)")
    parser.add_argument("--init", default="blurred_reference", choices=INITS)
    parser.add_argument("--denoise", type=float, default=1.0, help="< 1 starts part-way down the schedule")
    parser.add_argument("--split", default="held_out", choices=["held_out", "training"],
                        help="held-out tails, or trained-on segments of the same shape (for choosing settings)")
    parser.add_argument("--static-motion", action="store_true",
                        help="also sample with the reference's own motion (does the model follow motion?)")
    parser.add_argument("--copy", action="store_true",
                        help="each reference drives itself: does the denoiser copy an unseen frame?")
    parser.add_argument("--picture", default=None, help="write the side-by-side PNG here")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    models = load_bundle(args.bundle, dtype=torch.float32)
    settings = SamplingConfig(steps=args.steps, guidance_scale=args.guidance, context_frames=args.context,
                              context_overlap=min(4, args.context // 2), closed_loop=False, init=args.init,
                              denoise=args.denoise, seed=0)
    summary, results = evaluate(models, load_videos(cfg.data), cfg.data.resolution, settings, args.max_frames,
                                decode_chunk=args.decode_chunk, split=args.split, static_motion=args.static_motion,
                                copy=args.copy)
    if args.picture:
        Image.fromarray(side_by_side(results)).save(args.picture)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
