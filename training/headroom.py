"""Headroom of the self-reenactment test: what simple, model-free predictions score on the same segments.

"Repeat the reference frame" is a strong baseline when the driving frames are near the reference.
These reference points show how much room it leaves, all scored like `training.evaluate` (L1 and SSIM
on [0, 1] face crops, reference = first frame of each segment, up to `max_frames` following frames):

* `box_warp`: the raw reference frame re-cropped so its face lands where each frame's face box is
  (perfect rigid head tracking from the boxes f_rts is made of; `box_warp_smoothed` averages the
  boxes over +-2 frames against detector jitter);
* `blur_<sigma>`: the reference frame, Gaussian-blurred (a hedge against misalignment);
* `latent_<alpha>`: the VAE decoding of z_ref + alpha * (z_target - z_ref). alpha 0 is the decoded
  reference, alpha 1 the VAE round trip of the targets; the alpha where it crosses "repeat" is how
  much of the latent change a denoiser has to recover before the VAE lets it win.

`python -m training.headroom --bundle xnemo_core/assets/demo_model.safetensors --config training/configs/demo_stage3.yaml`
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from xnemo_core.faces import appearance_box
from xnemo_core.models.stack import XNeMoModels
from xnemo_core.pipeline import XNeMoPipeline, gaussian_blur

from .augment import crop_resize, to_unit_tensor
from .data import FaceVideo, make_sample
from .evaluate import split_segments
from .losses import ssim

BLUR_SIGMAS = (0.5, 0.8)
ALPHAS = (0.0, 0.1, 0.25, 0.5, 1.0)


def box_warped_reference(video: FaceVideo, ref: int, frames: list[int], resolution: int,
                         smooth: int = 0) -> torch.Tensor:
    """[F,3,H,W] in [0,1]: crops of the reference frame that put its face where each frame's face is,
    in that frame's appearance crop (the reference's box, as `make_sample` cuts targets)."""
    ref_box = np.asarray(video.boxes[ref], np.float64)
    app = np.asarray(appearance_box(ref_box, video.frames.shape[1:3])[0], np.float64)
    ref_centre, ref_side = (ref_box[:2] + ref_box[2:]) / 2, max(ref_box[2] - ref_box[0], ref_box[3] - ref_box[1])
    centre, half = (app[:2] + app[2:]) / 2, (app[2:] - app[:2]) / 2
    out = []
    for i in frames:
        box = np.asarray(video.boxes[max(0, i - smooth):i + smooth + 1], np.float64).mean(0)
        k = ref_side / max(box[2] - box[0], box[3] - box[1])  # reference px per frame px
        # frame pixel p shows the head point that sits at ref_centre + (p - its face centre) * k in the reference
        mapped = ref_centre + (centre - (box[:2] + box[2:]) / 2) * k
        out.append(to_unit_tensor(crop_resize(video.frames[ref], np.r_[mapped - half * k, mapped + half * k], resolution)))
    return torch.stack(out)


def blurred(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """[N,3,H,W] Gaussian blur, kernel 2*ceil(3 sigma)+1."""
    return gaussian_blur(image, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)


@torch.no_grad()
def latent_interpolations(models: XNeMoModels, reference: torch.Tensor, targets: torch.Tensor,
                          alphas=ALPHAS, decode_chunk: int = 8) -> dict[float, torch.Tensor]:
    """reference [3,H,W], targets [F,3,H,W] in [-1,1] -> {alpha: decoded [F,3,H,W] in [0,1]}."""
    pipe = XNeMoPipeline(models)
    z_ref = pipe.encode_latents(reference[None])
    z_tgt = pipe.encode_latents(targets)
    out = {}
    for alpha in alphas:
        z = z_ref + alpha * (z_tgt - z_ref)  # [F,4,h,w]
        out[alpha] = pipe.decode(z.permute(1, 0, 2, 3)[None].contiguous(), chunk=decode_chunk)[0].permute(1, 0, 2, 3)
    return out


def headroom(models: XNeMoModels | None, videos: list[FaceVideo], resolution: int, max_frames: int = 48,
             split: str = "held_out", decode_chunk: int = 8) -> dict:
    """Frame-weighted mean [L1, SSIM] of every reference point (and "repeat") over the split's segments.
    Without `models` the latent points are skipped."""
    segments = split_segments(videos, split, max_frames)
    sums: dict[str, np.ndarray] = {}
    total = 0
    for video, first, end in segments:
        frames = list(range(first + 1, end))[:max_frames]
        sample = make_sample(video, first, frames, resolution, resolution)
        target = (sample["target"].permute(1, 0, 2, 3) + 1) / 2
        reference = (sample["reference"] + 1) / 2
        guesses = {"repeat": reference[None].expand_as(target),
                   "box_warp": box_warped_reference(video, first, frames, resolution),
                   "box_warp_smoothed": box_warped_reference(video, first, frames, resolution, smooth=2)}
        guesses.update({f"blur_{s}": blurred(reference[None], s).expand_as(target) for s in BLUR_SIGMAS})
        if models is not None:
            decoded = latent_interpolations(models, sample["reference"], sample["target"].permute(1, 0, 2, 3),
                                            decode_chunk=decode_chunk)
            guesses.update({f"latent_{a}": d for a, d in decoded.items()})
        for name, guess in guesses.items():
            score = np.array([float((guess - target).abs().mean()), float(ssim(guess, target))])
            sums[name] = sums.get(name, 0) + score * len(frames)
        total += len(frames)
    return {"frames": total, **{k: [round(float(v[0]) / total, 5), round(float(v[1]) / total, 4)] for k, v in sums.items()}}


def main(argv=None) -> int:
    from xnemo_core.checkpoints import load_bundle

    from .config import load_config
    from .data import load_videos

    parser = argparse.ArgumentParser(prog="python -m training.headroom", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a stage YAML naming the data and its held-out split")
    parser.add_argument("--bundle", default=None, help="a bundle whose VAE scores the latent points (optional)")
    parser.add_argument("--split", default="held_out", choices=["held_out", "training"])
    parser.add_argument("--max-frames", type=int, default=48)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    models = load_bundle(args.bundle, dtype=torch.float32) if args.bundle else None
    print(json.dumps(headroom(models, load_videos(cfg.data), cfg.data.resolution, args.max_frames, args.split), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
