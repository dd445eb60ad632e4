"""Every ComfyUI import of the pack, with fallbacks that work outside ComfyUI.

Why a module of its own: the nodes must import (and run, in tests and scripts) without ComfyUI,
and must behave natively inside it (folder_paths model folders, the progress bar with previews,
Cancel, device and memory helpers). Each helper looks the ComfyUI module up when it is called,
so nothing is imported at pack import time and test stubs placed in ``sys.modules`` are honoured.

Fallbacks outside ComfyUI:
* folders: ``$XNEMO_INPUT_DIR`` / ``$XNEMO_OUTPUT_DIR`` / ``$XNEMO_TEMP_DIR`` / ``$XNEMO_MODELS_DIR``,
  else ``input``, ``output``, ``temp``, ``models`` under the current directory;
* progress: :class:`FallbackProgressBar` forwards to a hook set with :func:`set_progress_hook`
  (ComfyUI's own hook does the same job: it sends the websocket message and checks Cancel);
* cancel: :func:`interrupt_processing` sets a flag that :func:`processing_interrupted` reads, the
  same contract as ``comfy.model_management.interrupt_current_processing``; the exception raised
  is ComfyUI's ``InterruptProcessingException`` inside ComfyUI and the engine's ``Cancelled`` outside.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

_MISSING: set[str] = set()


def module(name: str):
    """The ComfyUI module ``name`` if it is importable, else None (never raises)."""
    found = sys.modules.get(name)
    if found is not None:
        return found
    if name in _MISSING:
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a ComfyUI module failing outside its server
        _MISSING.add(name)
        return None


def in_comfyui() -> bool:
    return module("folder_paths") is not None and module("comfy.model_management") is not None


def _mm():
    return module("comfy.model_management")


# ------------------------------------------------------------------------------------------ folders

def _fallback_dir(kind: str) -> str:
    return os.path.abspath(os.environ.get(f"XNEMO_{kind.upper()}_DIR") or os.path.join(os.getcwd(), kind))


def input_directory() -> str:
    fp = module("folder_paths")
    return fp.get_input_directory() if fp is not None else _fallback_dir("input")


def output_directory() -> str:
    fp = module("folder_paths")
    return fp.get_output_directory() if fp is not None else _fallback_dir("output")


def temp_directory() -> str:
    fp = module("folder_paths")
    return fp.get_temp_directory() if fp is not None else _fallback_dir("temp")


def models_directory() -> str:
    fp = module("folder_paths")
    if fp is not None and getattr(fp, "models_dir", None):
        return fp.models_dir
    return _fallback_dir("models")


def register_model_folder(key: str, subfolder: str) -> None:
    """Register ``models/<subfolder>`` under ``key`` (keeps paths added by extra_model_paths.yaml)."""
    fp = module("folder_paths")
    if fp is None:
        return
    path = os.path.join(models_directory(), subfolder)
    try:
        known = fp.get_folder_paths(key) if key in getattr(fp, "folder_names_and_paths", {}) else []
        if path not in known:
            fp.add_model_folder_path(key, path)
    except Exception:  # an old or unusual folder_paths: model lookup then uses models_dir directly
        pass


def model_folders(key: str, default_subfolder: str | None = None) -> list[str]:
    """Folders registered for ``key`` (extra_model_paths first as ComfyUI orders them), then the default."""
    folders: list[str] = []
    fp = module("folder_paths")
    if fp is not None:
        try:
            folders.extend(fp.get_folder_paths(key))
        except Exception:
            pass
    if default_subfolder is not None:
        folders.append(os.path.join(models_directory(), default_subfolder))
    unique: list[str] = []
    for folder in folders:
        folder = os.path.abspath(folder)
        if folder not in unique:
            unique.append(folder)
    return unique


def annotated_path(name: str, default_dir: str | None = None) -> str:
    """Resolve ``"file.ext [output]"`` / ``"[input]"`` / ``"[temp]"`` names as ComfyUI does (default: input)."""
    fp = module("folder_paths")
    if fp is not None and hasattr(fp, "get_annotated_filepath"):
        return fp.get_annotated_filepath(name, default_dir)
    for suffix, base in ((" [output]", output_directory), (" [input]", input_directory), (" [temp]", temp_directory)):
        if name.endswith(suffix):
            return os.path.join(base(), name[: -len(suffix)])
    return os.path.join(default_dir or input_directory(), name)


# ------------------------------------------------------------------------------------------ devices, memory

def torch_device():
    import torch

    mm = _mm()
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device():
    import torch

    mm = _mm()
    if mm is not None and hasattr(mm, "unet_offload_device"):
        return mm.unet_offload_device()
    return torch.device("cpu")


def intermediate_device():
    import torch

    mm = _mm()
    if mm is not None and hasattr(mm, "intermediate_device"):
        return mm.intermediate_device()
    return torch.device("cpu")


def soft_empty_cache() -> None:
    mm = _mm()
    if mm is not None:
        try:
            mm.soft_empty_cache()
        except Exception:
            pass
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_memory(num_bytes: int, device) -> None:
    """Ask ComfyUI to unload its own models until ``num_bytes`` are free on ``device`` (GPU only)."""
    mm = _mm()
    if mm is None or getattr(device, "type", "cpu") == "cpu":
        return
    try:
        mm.free_memory(int(num_bytes), device)
    except Exception:
        pass


# ------------------------------------------------------------------------------------------ cancel

_INTERRUPT = {"flag": False}


def interrupt_processing(value: bool = True) -> None:
    """Request (or clear) a Cancel: ComfyUI's flag inside ComfyUI, the fallback flag outside."""
    mm = _mm()
    if mm is not None:
        mm.interrupt_current_processing(value)
    else:
        _INTERRUPT["flag"] = bool(value)


def processing_interrupted() -> bool:
    mm = _mm()
    if mm is not None:
        return bool(mm.processing_interrupted())
    return _INTERRUPT["flag"]


def interrupt_exception_type() -> type:
    mm = _mm()
    if mm is not None and hasattr(mm, "InterruptProcessingException"):
        return mm.InterruptProcessingException
    from xnemo_core.errors import Cancelled

    return Cancelled


def raise_interrupted(message: str = "X-NeMo: cancelled") -> None:
    """Raise the host's interrupt exception and clear the flag (as ComfyUI's own check does)."""
    mm = _mm()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()  # raises and resets when the flag is set
        raise mm.InterruptProcessingException()
    _INTERRUPT["flag"] = False
    from xnemo_core.errors import Cancelled

    raise Cancelled(message)


def is_interrupt(exc: BaseException) -> bool:
    from xnemo_core.errors import Cancelled

    return isinstance(exc, (Cancelled, interrupt_exception_type()))


# ------------------------------------------------------------------------------------------ progress

_PROGRESS_HOOK: dict[str, Callable | None] = {"hook": None}


def set_progress_hook(hook: Callable[[int, int, Any], None] | None) -> None:
    """Outside ComfyUI: ``hook(value, total, preview)`` gets every progress update (tests, scripts).

    Like ComfyUI's hook it may raise to cancel the running node.
    """
    _PROGRESS_HOOK["hook"] = hook


class FallbackProgressBar:
    """The ``comfy.utils.ProgressBar`` interface outside ComfyUI."""

    def __init__(self, total: int, node_id=None):
        self.total = int(total)
        self.current = 0

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        if total is not None:
            self.total = int(total)
        self.current = min(int(value), self.total)
        hook = _PROGRESS_HOOK["hook"]
        if hook is not None:
            hook(self.current, self.total, preview)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + int(value))


def progress_bar(total: int):
    utils = module("comfy.utils")
    if utils is not None and hasattr(utils, "ProgressBar"):
        return utils.ProgressBar(int(total))
    return FallbackProgressBar(total)
