"""Entry point: `python -m training.train --config FILE [--max-steps N] [--output DIR] [--resume]`.

Multi-GPU / mixed precision: launch the same command through accelerate, e.g.
`accelerate launch --num_processes 8 -m training.train --config training/configs/stage1_full.yaml`;
`optim.mixed_precision` in the YAML picks fp16/bf16.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import load_config
from .trainer import Trainer


def run(config_path: str, max_steps: int | None = None, output: str | None = None, resume: bool = False,
        detector=None) -> dict:
    overrides = {"optim": {"max_steps": int(max_steps)}} if max_steps else {}
    cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg, output=output or cfg.output, detector=detector)
    return trainer.fit(resume=resume)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="stage YAML (training/configs/*.yaml)")
    parser.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps")
    parser.add_argument("--output", default=None, help="run folder (default: the config's output)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    args = parser.parse_args(argv)
    metrics = run(args.config, args.max_steps, args.output, args.resume)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
