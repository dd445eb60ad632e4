"""Loading the official X-NeMo release and our own safetensors bundle, with validated keys.

Why so strict: the official script loads two of its four files with strict=False, so a wrong file
silently leaves random modules in the model. Here every load compares keys and shapes first and
raises one readable report (file, key, expected vs found) instead of loading anything partially.
Pickled files are read with `torch.load(weights_only=True)` only; anything needing arbitrary
unpickling is refused.

Licence note: the official X-NeMo weights (bytedance/x-nemo-inference) are CC BY-NC 4.0
(non-commercial). Bundles converted from them carry that licence in their metadata.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .config import ImageEncoderConfig, UNetConfig, VAEConfig, XNeMoConfig
from .errors import XNeMoError
from .models.stack import COMPONENTS, XNeMoModels, build_models

OFFICIAL_LICENSE = "CC BY-NC 4.0 (official X-NeMo weights, bytedance/x-nemo-inference): non-commercial use only"
BUNDLE_FORMAT = "xnemo-bundle/1"

# the four files of the official release, in the order the official script loads them
OFFICIAL_FILES = {
    "denoising_unet": "xnemo_denoising_unet.pth",
    "reference_unet": "xnemo_reference_unet.pth",
    "motion_encoder": "xnemo_motion_encoder.pth",
    "temporal_module": "xnemo_temporal_module.pth",
}

# deterministic buffers (key suffixes) a file may carry or omit: the model builds them exactly itself
REBUILDABLE = {"denoising_unet": (".pos_encoder.pe",), "image_encoder": ("position_ids",)}

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(XNeMoError):
    """A weight file is missing, unsafe, or does not fit the model it is loaded into."""


def resolve_dtype(precision: str, device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' = fp16 on CUDA (bf16 where supported and fp16 is not wanted is an explicit choice), fp32 on CPU."""
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


# ----------------------------------------------------------------------------------------- reading

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors, or from .pth/.pt/.bin/.ckpt with weights_only unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused. This file needs arbitrary Python unpickling (it stores objects, not only tensors), "
            "which can run code. Only plain tensor checkpoints are loaded. If you trust the file, convert it to "
            "safetensors in an isolated environment and load that instead."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    return _unwrap_state_dict(state, path)


def _unwrap_state_dict(state, path) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(state, dict) and set(state) == {wrapper}:
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


# ----------------------------------------------------------------------------------------- validation

@dataclass
class KeyReport:
    """Differences between the keys a module expects and what a file provides."""

    source: str
    target: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: int = 12) -> str:
        lines = [f"{self.source} does not fit the {self.target}:"]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"  {len(items)} {title} key(s):")
                lines += [f"    {k}" for k in items[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} key(s) with the wrong shape (expected vs found):")
            lines += [f"    {k}: {list(e)} vs {list(f)}" for k, e, f in self.mismatched[:limit]]
            if len(self.mismatched) > limit:
                lines.append(f"    ... and {len(self.mismatched) - limit} more")
        lines.append("  Check that the file is the right one for this slot and matches the model size/config.")
        return "\n".join(lines)


def compare_keys(expected: dict[str, tuple], found: dict[str, tuple], source: str, target: str,
                 optional: tuple[str, ...] = ()) -> KeyReport:
    """Compare {key: shape} maps; keys ending in one of `optional` may be missing."""
    report = KeyReport(source, target)
    for key, shape in expected.items():
        if key not in found:
            if not key.endswith(optional):
                report.missing.append(key)
        elif tuple(found[key]) != tuple(shape):
            report.mismatched.append((key, tuple(shape), tuple(found[key])))
    report.unexpected = [k for k in found if k not in expected]
    return report


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def load_validated(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, target: str,
                   optional: tuple[str, ...] = ()) -> None:
    """Load `state` into `module` after checking every key and shape; raises one report on any mismatch."""
    expected = _shapes(module.state_dict())
    report = compare_keys(expected, _shapes(state), source, target, optional)
    if not report.ok:
        raise CheckpointError(report.format())
    on_meta = any(p.is_meta for p in module.parameters())
    result = module.load_state_dict(state, strict=not optional, assign=on_meta)
    leftover = [k for k in result.missing_keys if not k.endswith(optional)] if optional else []
    if leftover:
        raise CheckpointError(f"{source}: internal error, keys left unloaded: {leftover[:5]}")


# ----------------------------------------------------------------------------------------- official release

@dataclass
class OfficialPaths:
    """Where the pieces of the official release live on disk (all local; downloading is separate)."""

    denoising_unet: str
    reference_unet: str
    motion_encoder: str
    temporal_module: str
    image_encoder_dir: str  # sd-image-variations image_encoder/ (transformers folder)
    vae_dir: str  # stable-video-diffusion-img2vid-xt vae/ (diffusers folder)
    base_unet_dir: str | None = None  # sd-image-variations unet/ (fills denoiser keys the file lacks)

    @classmethod
    def from_folder(cls, weights_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                    vae_dir: str | os.PathLike | None = None) -> "OfficialPaths":
        """Resolve the usual layout: weights_dir/xnemo_*.pth, base_dir/{unet,image_encoder}, vae_dir."""
        weights_dir = Path(weights_dir)
        base = Path(base_dir) if base_dir else weights_dir / "sd-image-variations-diffusers"
        vae = Path(vae_dir) if vae_dir else weights_dir / "stable-video-diffusion-img2vid-xt" / "vae"
        files = {name: weights_dir / fname for name, fname in OFFICIAL_FILES.items()}
        missing = [str(p) for p in files.values() if not p.is_file()]
        for folder in (base / "image_encoder", vae):
            if not folder.is_dir():
                missing.append(str(folder) + "/")
        if missing:
            raise CheckpointError(
                "official X-NeMo weights incomplete; missing:\n  " + "\n  ".join(missing)
                + "\nDownload xnemo_*.pth from bytedance/x-nemo-inference (CC BY-NC 4.0), "
                "lambdalabs/sd-image-variations-diffusers (unet/, image_encoder/) and "
                "stabilityai/stable-video-diffusion-img2vid-xt (vae/) into these places."
            )
        unet_dir = base / "unet"
        return cls(**{k: str(v) for k, v in files.items()}, image_encoder_dir=str(base / "image_encoder"),
                   vae_dir=str(vae), base_unet_dir=str(unet_dir) if unet_dir.is_dir() else None)


def _folder_weights(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json + weights of a diffusers/transformers model folder (safetensors preferred)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a diffusers/transformers model folder)")
    config = json.loads(config_path.read_text())
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return config, read_state_dict(folder / name)
    raise CheckpointError(f"{folder}: no weight file (diffusion_pytorch_model.safetensors / model.safetensors / *.bin)")


def official_config(paths: OfficialPaths) -> XNeMoConfig:
    """Model sizes of the official release, read from the base-model folders where available."""
    vae_cfg = json.loads((Path(paths.vae_dir) / "config.json").read_text())
    clip_cfg = json.loads((Path(paths.image_encoder_dir) / "config.json").read_text())
    unet = UNetConfig()
    if paths.base_unet_dir:
        unet = UNetConfig.from_official(json.loads((Path(paths.base_unet_dir) / "config.json").read_text()))
    return XNeMoConfig(unet=unet, vae=VAEConfig.from_dict(vae_cfg),
                       image_encoder=ImageEncoderConfig.from_dict(clip_cfg), name="official")


def merge_denoiser_states(denoising: dict[str, torch.Tensor], temporal: dict[str, torch.Tensor],
                          base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Official load order: base SD UNet, then the denoising file, then the temporal file (later wins)."""
    merged = dict(base or {})
    merged.update(denoising)
    merged.update(temporal)
    return merged


def load_official_states(paths: OfficialPaths) -> dict[str, dict[str, torch.Tensor]]:
    """Read the official files into per-component state dicts in our naming (identical to the official)."""
    states = {name: read_state_dict(getattr(paths, name)) for name in OFFICIAL_FILES}
    base = _folder_weights(paths.base_unet_dir)[1] if paths.base_unet_dir else None
    states["denoising_unet"] = merge_denoiser_states(states["denoising_unet"], states.pop("temporal_module"), base)
    states["vae"] = _folder_weights(paths.vae_dir)[1]
    states["image_encoder"] = _folder_weights(paths.image_encoder_dir)[1]
    return states


def load_states_into(models: XNeMoModels, states: dict[str, dict[str, torch.Tensor]], sources: dict[str, str]) -> None:
    """Validate and load each component; REBUILDABLE buffers may be absent, or present where the model lacks them."""
    for name, module in models.modules().items():
        optional = REBUILDABLE.get(name, ())
        expected = module.state_dict().keys()
        state = {k: v for k, v in states[name].items() if k in expected or not k.endswith(optional)}
        load_validated(module, state, sources.get(name, name), COMPONENTS[name], optional)


def load_official(paths: OfficialPaths, device="cpu", dtype: torch.dtype = torch.float32,
                  config: XNeMoConfig | None = None) -> XNeMoModels:
    """Build the stack and load the official release into it (validated, nothing silently random)."""
    config = config or official_config(paths)
    states = load_official_states(paths)
    models = build_models(config, device="meta")
    sources = {name: getattr(paths, name) for name in ("reference_unet", "motion_encoder")}
    sources["denoising_unet"] = f"{paths.denoising_unet} + {paths.temporal_module}" + (
        f" (+ base {paths.base_unet_dir})" if paths.base_unet_dir else "")
    sources["vae"], sources["image_encoder"] = paths.vae_dir, paths.image_encoder_dir
    load_states_into(models, states, sources)
    _check_materialised(models)
    return models.to(device=device, dtype=dtype).eval()


def _check_materialised(models: XNeMoModels) -> None:
    """After a meta-device build every parameter must have been loaded (buffers are built for real)."""
    for name, module in models.modules().items():
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                raise CheckpointError(f"{COMPONENTS[name]}: {key} was not loaded from any file")


# ----------------------------------------------------------------------------------------- bundle

def save_bundle(models: XNeMoModels, path: str | os.PathLike, dtype: torch.dtype | None = None,
                license_text: str = OFFICIAL_LICENSE, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the whole stack (and its config) into one safetensors file."""
    tensors = {}
    for name, module in models.modules().items():
        for key, value in module.state_dict().items():
            value = value.detach().to("cpu")
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[f"{name}.{key}"] = value.contiguous()
    metadata = {"format": BUNDLE_FORMAT, "config": models.config.to_json(), "license": license_text}
    metadata.update(extra_metadata or {})
    with atomic_path(path, prefix=".bundle-") as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_bundle_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path}: not an X-NeMo bundle (metadata format={metadata.get('format')!r}, "
                              f"expected {BUNDLE_FORMAT!r}); convert official weights with `python -m xnemo_core convert`")
    return metadata


def load_bundle(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> XNeMoModels:
    """Rebuild the stack from a bundle's config and load its tensors (validated per component)."""
    metadata = read_bundle_metadata(path)
    config = XNeMoConfig.from_json(metadata["config"])
    flat = read_state_dict(path)
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in COMPONENTS}
    stray = []
    for key, value in flat.items():
        prefix, _, rest = key.partition(".")
        (states[prefix].__setitem__(rest, value) if prefix in states else stray.append(key))
    if stray:
        raise CheckpointError(f"{path}: unexpected tensors outside the five components: {stray[:5]}")
    models = build_models(config, device="meta")
    load_states_into(models, states, {name: f"{path} [{name}]" for name in COMPONENTS})
    _check_materialised(models)
    stored = {v.dtype for v in flat.values() if v.is_floating_point()}
    dtype = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    return models.to(device=device, dtype=dtype).eval()
