"""Reproduce the bundled demo model: `python -m training.demo`.

Runs training/configs/demo_{vae,vae_decoder,stage1,motion_init,stage2,stage3}.yaml in order on CPU. Each
stage starts from the run its config names (vae_decoder and stage1 both from vae: the decoder fine-tune
keeps the encoder, so the latents the diffusion stages learn are unchanged; stage 2 takes its motion
encoder from motion_init). The bundle is stage 3's stack with
the fine-tuned VAE, stored fp16 in xnemo_core/assets/demo_model.safetensors; then self-reenactment on
the held-out tails of the videos is evaluated, and the side-by-side picture and model card are written
next to the bundle. A killed run continues where it stopped with the same command plus `--resume`.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from xnemo_core.checkpoints import load_bundle, save_bundle
from xnemo_core.config import SamplingConfig

from .config import load_config
from .stages import take_component
from .trainer import Trainer

CONFIGS = Path(__file__).parent / "configs"
STAGES = ["vae", "vae_decoder", "stage1", "motion_init", "stage2", "stage3"]
VAE_FROM = "vae_decoder"  # the bundle's VAE comes from here, everything else from the last stage
ASSETS = Path(__file__).resolve().parents[1] / "xnemo_core" / "assets"
LICENSE = "Apache-2.0 (comfyui-xnemo demo weights, trained from scratch on CPU; no third-party weights)"
# Fixed sampling settings of the evaluation; `init`, `denoise` and `guidance` are chosen among CANDIDATES
# by L1 on trained-on segments shaped like the held-out ones (never on the held-out frames), and the
# release's own start (blurred reference, denoise 1, CFG 2.5) is reported beside the choice.
EVAL = {"steps": 25, "context": 8, "max_frames": 48, "closed_loop": False, "decode_chunk": 8}
RELEASE_START = {"init": "blurred_reference", "denoise": 1.0, "guidance": 2.5}
CANDIDATES = [RELEASE_START, {**RELEASE_START, "guidance": 1.0},
              *({"init": "reference", "denoise": d, "guidance": g} for d in (0.3, 0.5) for g in (1.0, 2.5))]


def train_stages(output: Path, resume: bool, log) -> dict:
    metrics = {}
    for stage in STAGES:
        cfg = load_config(CONFIGS / f"demo_{stage}.yaml", {"output": str(output / stage)})
        if cfg.model.path:
            cfg.model.path = str(start_from(cfg.model.path, output))
        if cfg.model.motion_encoder_from:
            cfg.model.motion_encoder_from = str(start_from(cfg.model.motion_encoder_from, output))
        folder = output / stage
        if resume and (folder / "metrics.json").is_file():
            log(f"demo: {stage} already finished, skipping")
            metrics[stage] = json.loads((folder / "metrics.json").read_text())
        else:
            metrics[stage] = Trainer(cfg, output=folder, log=log).fit(resume=resume)
    return metrics


def sampling(start: dict) -> SamplingConfig:
    """The evaluation's sampler settings with one candidate start (init, denoise, guidance)."""
    return SamplingConfig(steps=EVAL["steps"], guidance_scale=start["guidance"], context_frames=EVAL["context"],
                          context_overlap=EVAL["context"] // 2, closed_loop=EVAL["closed_loop"],
                          init=start["init"], denoise=start["denoise"], seed=0)


def start_from(named: str, output: Path) -> Path:
    """A config's starting bundle inside this run: runs/demo/<stage>/final.safetensors -> <output>/<stage>/..."""
    named = Path(named)
    return output / named.parent.name / named.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/demo", help="run folder for the four stages")
    parser.add_argument("--assets", default=str(ASSETS), help="where the bundle, card and picture go")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for these small models on a shared CPU)")
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate the existing runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output, assets = Path(args.output), Path(args.assets)
    assets.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log = lambda msg: print(msg, flush=True)
    if args.eval_only:
        metrics = {s: json.loads((output / s / "metrics.json").read_text()) for s in STAGES}
    else:
        metrics = train_stages(output, args.resume, log)
    train_seconds = round(time.time() - started, 1)

    bundle_path = assets / "demo_model.safetensors"
    models = load_bundle(output / STAGES[-1] / "final.safetensors", dtype=torch.float32)
    take_component(models, load_bundle(output / VAE_FROM / "final.safetensors", dtype=torch.float32), "vae",
                   f"the {VAE_FROM} run")
    last_cfg = load_config(CONFIGS / f"demo_{STAGES[-1]}.yaml")
    resolution = last_cfg.data.resolution
    command = "python -m training.demo"

    from PIL import Image

    from .data import load_videos
    from .evaluate import evaluate, side_by_side

    videos = load_videos(last_cfg.data)

    def run(stack, start: dict, split: str, static_motion: bool = False):
        return evaluate(stack, videos, resolution, sampling(start), EVAL["max_frames"],
                        decode_chunk=EVAL["decode_chunk"], split=split, static_motion=static_motion)

    selection = []
    for start in CANDIDATES:
        selection.append({**start, **run(models, start, "training")[0]["mean"]})
        log(f"demo: on training segments {start}: {selection[-1]}")
    chosen = {k: min(selection, key=lambda r: r["model_l1"])[k] for k in ("init", "denoise", "guidance")}
    recommended = {"steps": EVAL["steps"], "guidance_scale": chosen["guidance"], "context_frames": EVAL["context"],
                   "context_overlap": EVAL["context"] // 2, "closed_loop": EVAL["closed_loop"],
                   "f_rts_mode": "paper", "decode_chunk": EVAL["decode_chunk"], "resolution": resolution,
                   "init": chosen["init"], "denoise": chosen["denoise"]}
    save_bundle(models, bundle_path, dtype=torch.float16, license_text=LICENSE,
                extra_metadata={"name": "xnemo-demo", "reproduce": command,
                                "recommended_sampling": json.dumps(recommended)})

    demo = load_bundle(bundle_path, dtype=torch.float32)  # evaluate exactly what ships (fp16 -> fp32)
    summary, results = run(demo, chosen, "held_out", static_motion=True)  # + does it follow motion?
    Image.fromarray(side_by_side(results)).save(assets / "demo_selfreenactment.png")
    summary["release_start"] = run(demo, RELEASE_START, "held_out")[0]
    card = {
        "name": "xnemo-demo",
        "file": bundle_path.name,
        "size_bytes": bundle_path.stat().st_size,
        "parameters": {k: int(v) for k, v in demo.parameter_count().items()},
        "license": LICENSE,
        "reproduce": command,
        "recommended_sampling": recommended,
        "configs": [f"training/configs/demo_{s}.yaml" for s in STAGES],
        "data": {"sources": last_cfg.data.roots, "resolution": last_cfg.data.resolution, "fps": last_cfg.data.fps,
                 "held_out": "the last 15% of the frames of every video (never trained on); evaluation uses them"},
        "held_out_segments": {v.source.name: [v.train_end, len(v)] for v in videos if not v.still},
        "stages": {s: {k: metrics[s].get(k) for k in ("steps", "seconds", "samples_per_s", "batch_size", "final_losses")}
                   for s in STAGES},
        "training_seconds": round(sum(metrics[s]["seconds"] for s in STAGES), 1),  # the training loops
        "run_seconds": train_seconds if not args.eval_only else None,  # + data loading, checkpoints, previews
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)",
        "evaluation": {"protocol": "self-reenactment on each held-out tail: its first frame is the reference, the next "
                                   f"<= {EVAL['max_frames']} frames drive; L1 and SSIM (Gaussian 11, sigma 1.5) on "
                                   "[0,1] face crops vs repeating the reference frame; init/denoise/CFG chosen "
                                   "by L1 on the trained-on segments just before each held-out tail; static_motion_*: "
                                   "the same sampling driven by the reference's own motion on every frame",
                       "sampling": {**EVAL, **chosen}, "selection_on_training_segments": selection, **summary},
        "beats_repeat_reference": {k: summary["mean"][f"model_{k}"] < summary["mean"][f"repeat_reference_{k}"]
                                   if k == "l1" else summary["mean"][f"model_{k}"] > summary["mean"][f"repeat_reference_{k}"]
                                   for k in ("l1", "ssim")},
        "notes": "CLIP image encoder: a one-layer random-init stand-in, frozen (never trained). "
                 "Perceptual (VGG-19 / VGGFace) terms off: no such weights are available offline.",
    }
    (assets / "demo_model.json").write_text(json.dumps(card, indent=1))
    print(json.dumps(card["evaluation"]["mean"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
