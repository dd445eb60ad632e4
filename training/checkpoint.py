"""Resumable training state, written atomically, with no pickle anywhere.

A checkpoint is a folder `checkpoints/step-00001234/` holding
  weights.safetensors    every tensor (params + buffers) of each component that has trainable parameters
  ema.safetensors        the EMA shadow weights (when EMA is on)
  optim.safetensors      optimiser state tensors, flattened; hyper-parameters go into state.json
  state.json             step, stage, optimiser param groups, log position, config
It is written under a temporary name and renamed into place in one `os.replace`, so a run killed
at any moment leaves either the previous checkpoint or the new one, never half of one.
Frozen components are not saved: a resumed run rebuilds them from the same starting point.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{8})$")


def flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
                    optimizers: dict[str, torch.optim.Optimizer], state: dict,
                    ema: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically and prune all but the newest `keep`."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    optim_tensors, optim_meta = {}, {}
    for name, optimizer in optimizers.items():
        tensors, meta = flatten_optimizer(optimizer, name)
        optim_tensors.update(tensors)
        optim_meta[name] = meta
    save_file(optim_tensors, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizers": optim_meta}, indent=1))
    for path in tmp.iterdir():  # make the data durable before the rename publishes it
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of a killed save are ignored)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    state["weights"] = load_file(str(path / "weights.safetensors"))
    state["optim_tensors"] = load_file(str(path / "optim.safetensors"))
    state["ema"] = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    return state
