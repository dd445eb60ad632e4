"""CLI commands that run the main job: `animate`, `demo` (embedded defaults, no download) and `bench`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import INITS, SCHEDULERS


class _Bar:
    """A tqdm bar that tolerates repeated totals (one per phase)."""

    def __init__(self, desc: str, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, disable=not enabled, file=sys.stderr, leave=True)

    def __call__(self, done, total, *_):
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        self.bar.close()


def run_animation(reference: str, driving: str, out: str, *, weights=None, steps=35, cfg=2.5, seed=0, frames=None,
                  stride=1, size=None, context=24, overlap=4, scheduler="ddim", f_rts="constant", preview=False,
                  device="auto", precision="auto", quiet=False, closed_loop=True, decode_chunk=25,
                  init="blurred_reference", denoise=1.0) -> dict:
    """Reference image + driving video -> mp4 at the driving fps (stride-adjusted). Returns a summary."""
    from .animate import animate, extract_driving_motion, load_models, prepare_reference_crop
    from .config import SamplingConfig
    from .video import read_image, read_video, write_video

    t0 = time.perf_counter()
    models = load_models(weights, device, precision)
    image = read_image(reference)
    video = read_video(driving, max_frames=frames, stride=stride)
    ref = prepare_reference_crop(models, image, size=size)
    bar = _Bar("motion", not quiet)
    t1 = time.perf_counter()
    driving_motion = extract_driving_motion(models, video.frames, video.fps, reference=ref, f_rts_mode=f_rts,
                                            source=str(driving), progress=bar)
    bar.close()
    t2 = time.perf_counter()
    if driving_motion.track.filled_frames:
        print(f"note: {driving_motion.report}", file=sys.stderr)
    settings = SamplingConfig(steps=steps, guidance_scale=cfg, seed=seed, context_frames=context,
                              context_overlap=overlap, scheduler=scheduler, closed_loop=closed_loop, init=init,
                              denoise=denoise)
    bar = _Bar("sampling", not quiet)
    result = animate(models, image, driving_motion.motion, settings, reference=ref, progress=bar,
                     decode_chunk=decode_chunk)
    bar.close()
    t3 = time.perf_counter()
    frames_out = result.uint8()
    if preview:
        frames_out = side_by_side(driving_motion.track.crops, frames_out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_video(out, frames_out, video.fps)
    summary = {"out": str(out), "frames": int(len(frames_out)), "fps": float(video.fps),
               "size": list(frames_out.shape[1:3]), "motion_s": round(t2 - t1, 2), "sampling_s": round(t3 - t2, 2),
               "total_s": round(time.perf_counter() - t0, 2), "filled_frames": driving_motion.track.filled_frames}
    return summary


def side_by_side(crops: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """[driving crop | result] per frame, the crop resized to the result's height."""
    from .faces import resize_lanczos

    h = frames.shape[1]
    left = np.stack([resize_lanczos(c, h) for c in crops[: len(frames)]])
    return np.concatenate([left, frames], axis=2)


def _animate(args) -> int:
    summary = run_animation(args.reference, args.driving, args.out, weights=args.weights, steps=args.steps,
                            cfg=args.cfg, seed=args.seed, frames=args.frames, stride=args.stride, size=args.size,
                            context=args.context, overlap=args.overlap, scheduler=args.scheduler,
                            f_rts=args.f_rts, preview=args.preview, device=args.device, precision=args.precision,
                            init=args.init, denoise=args.denoise)
    print(json.dumps(summary))
    return 0


def _demo(args) -> int:
    """The bundled demo model with the sampling settings it was trained for (stored in its metadata)."""
    from .animate import DEMO_DRIVING, DEMO_MODEL, DEMO_REFERENCE
    from .checkpoints import read_bundle_metadata

    rec = json.loads(read_bundle_metadata(DEMO_MODEL).get("recommended_sampling", "{}"))
    summary = run_animation(str(DEMO_REFERENCE), str(DEMO_DRIVING), args.out, weights=None,
                            steps=args.steps or rec.get("steps", 25), cfg=args.cfg, seed=args.seed, frames=args.frames,
                            preview=True, device=args.device, context=rec.get("context_frames", 24),
                            overlap=rec.get("context_overlap", 4), closed_loop=rec.get("closed_loop", True),
                            f_rts=rec.get("f_rts_mode", "constant"), decode_chunk=rec.get("decode_chunk", 25),
                            init=rec.get("init", "blurred_reference"), denoise=rec.get("denoise", 1.0))
    print(json.dumps(summary))
    print(f"demo video written to {args.out} (left: driving face crop, right: animated reference)")
    return 0


def _bench_suite(args) -> int:
    from .bench import default_suite_json, run_suite, save_suite, suite_table

    def log(text):
        print(text, file=sys.stderr, flush=True)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = run_suite(weights=args.weights, suite=args.suite_size, device=args.device, precision=args.precision,
                        log=log)
    baseline = json.loads(Path(args.compare).read_text()) if args.compare else None
    print(suite_table(results, baseline))
    path = save_suite(results, args.json or default_suite_json(results))
    print(f"saved {path}")
    return 0


def _bench(args) -> int:
    from .bench import run_bench

    if getattr(args, "suite", False):
        return _bench_suite(args)

    results = run_bench(weights=args.weights, size=args.size, frames=args.frames, steps=args.steps, cfg=args.cfg,
                        device=args.device, precision=args.precision, extraction_frames=args.extraction_frames)
    for key, value in results.items():
        print(f"{key:32s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def add_commands(sub) -> None:
    def sampling_args(p, steps=35, cfg=2.5):
        p.add_argument("--steps", type=int, default=steps, help="denoising steps (release 35, paper 25)")
        p.add_argument("--cfg", type=float, default=cfg, help="guidance scale (release 2.5, paper 3.5)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--frames", type=int, default=None, help="animate at most this many driving frames")
        p.add_argument("--device", default="auto")

    p = sub.add_parser("animate", help="animate a reference portrait with a driving video")
    p.add_argument("--reference", required=True, help="reference image (png/jpg)")
    p.add_argument("--driving", required=True, help="driving video (mp4/mov/...)")
    p.add_argument("--out", required=True, help="output .mp4 (driving fps)")
    p.add_argument("--weights", default=None,
                   help="bundle .safetensors or official release folder; default: the bundled demo model")
    sampling_args(p)
    p.add_argument("--stride", type=int, default=1, help="use every N-th driving frame")
    p.add_argument("--size", type=int, default=None, help="output size in px (default: the model's native size)")
    p.add_argument("--context", type=int, default=24, help="frames per context window")
    p.add_argument("--overlap", type=int, default=4, help="overlap between context windows")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS)
    p.add_argument("--f-rts", dest="f_rts", default="constant", choices=["constant", "paper"],
                   help="constant (0,0,1) as the release, or the paper's box-relative f_rts")
    p.add_argument("--init", default="blurred_reference", choices=INITS,
                   help="start latents: blurred noised reference (release), sharp noised reference, pure noise")
    p.add_argument("--denoise", type=float, default=1.0,
                   help="as ComfyUI's KSampler: < 1 starts part-way down the schedule from the init latent")
    p.add_argument("--preview", action="store_true", help="write [driving crop | result] side by side")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.set_defaults(func=_animate)

    p = sub.add_parser("demo", help="run the main job on the embedded demo model and media (CPU, offline)")
    p.add_argument("--out", default="out/demo.mp4")
    sampling_args(p, steps=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="speed / memory benchmark of motion extraction and sampling")
    p.add_argument("--weights", default=None, help="bundle / official folder; default demo; 'official-random', "
                                                   "'demo-random' or 'tiny-random' build random weights of that size")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cfg", type=float, default=2.5)
    p.add_argument("--extraction-frames", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--json", default=None, help="also save the results as JSON (--suite: default "
                                                "out/bench/bench-<suite>-<commit>-<device>.json)")
    p.add_argument("--suite", action="store_true", help="run the fixed suite (motion extraction; sampling at two "
                                                        "sizes x two lengths x with/without CFG; VAE decode)")
    p.add_argument("--suite-size", default="auto", choices=["auto", "tiny", "full"],
                   help="full: 256/512 px, 24/120 frames (GPU); tiny: the model's native size and 2x, 8/24 "
                        "frames (CPU); auto: full on CUDA, tiny otherwise")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--compare", default=None, help="an earlier suite JSON: adds a time ratio column")
    p.set_defaults(func=_bench)

    from .evaluation.cli import add_evaluate_command

    add_evaluate_command(sub)
