"""Where X-NeMo weights live in a ComfyUI install, and how the loader's choices map to files.

Layout (all folders of the ``xnemo`` key are searched, so ``extra_model_paths.yaml`` entries such
as ``xnemo: /data/models/xnemo`` work):

    models/xnemo/xnemo_denoising_unet.pth, xnemo_reference_unet.pth,
                 xnemo_motion_encoder.pth, xnemo_temporal_module.pth     official release (CC BY-NC 4.0)
    models/xnemo/<name>/xnemo_*.pth                                         more official-format sets
    models/xnemo/*.safetensors                                              converted bundles
    models/xnemo/sd-image-variations-diffusers/{image_encoder,unet}/        base models (diffusers format)
    models/xnemo/stable-video-diffusion-img2vid-xt/vae/

Base models are also found in ComfyUI's ``diffusers`` folders (same sub-folder names), or picked
as single files from ``clip_vision`` (image encoder) and ``vae`` (SVD VAE, diffusers keys).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import comfy_compat

KEY = "xnemo"
DEMO = "demo"
OFFICIAL = "official (models/xnemo)"
OFFICIAL_PREFIX = "official: "
AUTO = "auto"
CLIP_PREFIX = "clip_vision: "
VAE_PREFIX = "vae: "
DIFFUSERS_PREFIX = "diffusers: "

OFFICIAL_MARKER = "xnemo_denoising_unet.pth"
OFFICIAL_FILES = ("xnemo_denoising_unet.pth", "xnemo_reference_unet.pth", "xnemo_motion_encoder.pth",
                  "xnemo_temporal_module.pth")  # = xnemo_core.checkpoints.OFFICIAL_FILES (checked by the tests)
BASE_FOLDER = "sd-image-variations-diffusers"
BASE_REPO = "lambdalabs/sd-image-variations-diffusers"
VAE_FOLDER = "stable-video-diffusion-img2vid-xt"
VAE_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
_SKIP_DIRS = {BASE_FOLDER, VAE_FOLDER, "image_encoder", "unet", "vae"}
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def register() -> None:
    """Register models/xnemo under the ``xnemo`` key (called at pack import inside ComfyUI)."""
    comfy_compat.register_model_folder(KEY, KEY)


def xnemo_folders() -> list[str]:
    return comfy_compat.model_folders(KEY, KEY)


def _existing(folders) -> list[Path]:
    return [Path(f) for f in folders if os.path.isdir(f)]


# ------------------------------------------------------------------------------------------ X-NeMo weights

def official_sets() -> dict[str, Path]:
    """Loader label -> folder holding the official xnemo_*.pth files (the root folder as OFFICIAL)."""
    found: dict[str, Path] = {}
    for root in _existing(xnemo_folders()):
        if (root / OFFICIAL_MARKER).is_file() and OFFICIAL not in found:
            found[OFFICIAL] = root
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if (sub / OFFICIAL_MARKER).is_file():
                found.setdefault(f"{OFFICIAL_PREFIX}{sub.name}/", sub)
    return found


def bundles() -> dict[str, Path]:
    """Loader label (path relative to its xnemo folder) -> converted .safetensors bundle."""
    found: dict[str, Path] = {}
    for root in _existing(xnemo_folders()):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
            if Path(dirpath) != root and (Path(dirpath) / "config.json").is_file():
                continue  # a diffusers/transformers model folder, not a bundle
            for name in sorted(filenames):
                if name.endswith(".safetensors"):
                    label = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                    found.setdefault(label, Path(dirpath) / name)
    return found


def weights_choices() -> list[str]:
    """Loader choices: the demo model, the official release (always listed, so shared workflows
    reach the loader's message about missing files), more official sets, bundles."""
    choices = [DEMO, OFFICIAL]
    for label in list(official_sets()) + list(bundles()):
        if label not in choices:
            choices.append(label)
    return choices


def resolve_weights(choice: str) -> tuple[str, Path | None]:
    """('demo', None) | ('official', folder) | ('bundle', file). Unknown names raise FileNotFoundError."""
    if choice == DEMO:
        return "demo", None
    sets = official_sets()
    if choice in sets:
        return "official", sets[choice]
    if choice == OFFICIAL:  # not installed: the default folder, so the engine lists what is missing there
        return "official", Path(comfy_compat.models_directory()) / KEY
    found = bundles()
    if choice in found:
        return "bundle", found[choice]
    if os.path.isabs(choice) and os.path.exists(choice):
        return ("official" if os.path.isdir(choice) else "bundle"), Path(choice)
    places = ", ".join(xnemo_folders()) or "ComfyUI/models/xnemo"
    raise FileNotFoundError(
        f"weights {choice!r} not found. Put the X-NeMo bundle (.safetensors) or the official xnemo_*.pth files "
        f"into one of: {places} (or add an 'xnemo:' entry to extra_model_paths.yaml), then refresh the page.")


# ------------------------------------------------------------------------------------------ base models

def _comfy_files(key: str) -> list[str]:
    fp = comfy_compat.module("folder_paths")
    if fp is None:
        return []
    try:
        return [f for f in fp.get_filename_list(key) if f.lower().endswith(_WEIGHT_SUFFIXES)]
    except Exception:
        return []


def _comfy_file_path(key: str, name: str) -> Path | None:
    fp = comfy_compat.module("folder_paths")
    if fp is None:
        return None
    try:
        path = fp.get_full_path(key, name)
    except Exception:
        return None
    return Path(path) if path else None


def _diffusers_folders() -> list[Path]:
    return _existing(comfy_compat.model_folders("diffusers", "diffusers"))


def _model_dirs(component: str) -> dict[str, Path]:
    """'diffusers: <model>/<component>' -> folder with config.json, from ComfyUI's diffusers folders."""
    found: dict[str, Path] = {}
    for root in _diffusers_folders():
        for model in sorted(p for p in root.iterdir() if p.is_dir()):
            folder = model / component
            if (folder / "config.json").is_file():
                found.setdefault(f"{DIFFUSERS_PREFIX}{model.name}/{component}", folder)
    return found


def image_encoder_choices() -> list[str]:
    return [AUTO] + list(_model_dirs("image_encoder")) + [CLIP_PREFIX + f for f in _comfy_files("clip_vision")]


def vae_choices() -> list[str]:
    return [AUTO] + list(_model_dirs("vae")) + [VAE_PREFIX + f for f in _comfy_files("vae")]


def _auto_dir(official_dir: Path | None, model_folder: str, component: str) -> Path | None:
    roots = ([official_dir] if official_dir else []) + _existing(xnemo_folders()) + _diffusers_folders()
    for root in roots:
        folder = root / model_folder / component
        if (folder / "config.json").is_file():
            return folder
    return None


def _stage_single_file(component: str, file: Path) -> Path:
    """A diffusers/transformers-style folder (config.json + the file linked in) for a single weight file.

    Single files from ComfyUI's clip_vision / vae folders have no config.json; the official
    architecture's (ViT-L/14 image encoder, SVD temporal VAE) is written next to a link to the file.
    """
    from xnemo_core.config import ImageEncoderConfig, VAEConfig

    stat = file.stat()
    digest = hashlib.sha1(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = Path(comfy_compat.temp_directory()) / "xnemo_staged" / digest / component
    if component == "image_encoder":
        config = dict(ImageEncoderConfig().to_dict(), model_type="clip_vision_model")
        weight = "model.safetensors" if file.suffix == ".safetensors" else "pytorch_model.bin"
    else:
        config = VAEConfig().to_dict()
        weight = "diffusion_pytorch_model.safetensors" if file.suffix == ".safetensors" else "diffusion_pytorch_model.bin"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    target = folder / weight
    if not target.exists():
        try:
            os.symlink(file.resolve(), target)
        except OSError:
            try:
                os.link(file.resolve(), target)
            except OSError as exc:
                raise FileNotFoundError(
                    f"cannot link {file} into {folder} ({exc}); put the model in a diffusers-format folder "
                    f"(config.json + weights) instead") from exc
    return folder


def _choice_dir(choice: str, component: str) -> Path:
    dirs = _model_dirs(component)
    if choice in dirs:
        return dirs[choice]
    prefix, key = (CLIP_PREFIX, "clip_vision") if component == "image_encoder" else (VAE_PREFIX, "vae")
    if choice.startswith(prefix):
        path = _comfy_file_path(key, choice[len(prefix):])
        if path is not None and path.is_file():
            return _stage_single_file(component, path)
    if os.path.isdir(choice):
        return Path(choice)
    raise FileNotFoundError(f"{component} {choice!r} not found; pick another entry or 'auto'")


def download_base_models(target_root: Path, need_base: bool, need_vae: bool) -> None:
    """Fetch the missing base models with huggingface_hub (online only) into target_root."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError("downloading needs the 'huggingface_hub' package: pip install huggingface_hub") from exc
    jobs = []
    if need_base:
        jobs.append((BASE_REPO, ["image_encoder/*", "unet/*"], target_root / BASE_FOLDER))
    if need_vae:
        jobs.append((VAE_REPO, ["vae/*"], target_root / VAE_FOLDER))
    for repo, patterns, dest in jobs:
        try:
            snapshot_download(repo_id=repo, allow_patterns=patterns, local_dir=str(dest))
        except Exception as exc:
            gated = " (this repository is gated: accept its licence on huggingface.co and run `huggingface-cli login`)" \
                if repo == VAE_REPO else ""
            raise FileNotFoundError(
                f"could not download {repo} {patterns} into {dest}: {type(exc).__name__}: {exc}{gated}. "
                f"Download it by hand into that folder.") from exc


def resolve_official(folder: Path, image_encoder: str = AUTO, vae: str = AUTO, download: bool = False):
    """OfficialPaths for an official set plus base models chosen (or found, or downloaded)."""
    from xnemo_core.checkpoints import OfficialPaths

    enc_dir = None if image_encoder == AUTO else _choice_dir(image_encoder, "image_encoder")
    vae_dir = None if vae == AUTO else _choice_dir(vae, "vae")
    if enc_dir is None:
        enc_dir = _auto_dir(folder, BASE_FOLDER, "image_encoder")
    if vae_dir is None:
        vae_dir = _auto_dir(folder, VAE_FOLDER, "vae")
    release_complete = all((folder / name).is_file() for name in OFFICIAL_FILES)
    if download and release_complete and (enc_dir is None or vae_dir is None):
        download_base_models(folder, enc_dir is None, vae_dir is None)
        enc_dir = enc_dir or _auto_dir(folder, BASE_FOLDER, "image_encoder")
        vae_dir = vae_dir or _auto_dir(folder, VAE_FOLDER, "vae")
    unet_dir = _auto_dir(folder, BASE_FOLDER, "unet")
    # from_folder checks the four release files and the two base folders and lists every missing one
    base_dir = enc_dir.parent if enc_dir is not None else None  # from_folder wants <base>/image_encoder
    if enc_dir is not None and enc_dir.name != "image_encoder":
        raise FileNotFoundError(f"{enc_dir}: an image encoder folder must be named image_encoder/")
    paths = OfficialPaths.from_folder(folder, base_dir, vae_dir)
    if unet_dir is not None:
        paths.base_unet_dir = str(unet_dir)
    return paths
