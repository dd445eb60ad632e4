"""Shared glue of the X-NeMo nodes: custom types, tensor conversion, the pipe object, error messages.

Nothing here knows about models: it converts between ComfyUI values (IMAGE = float [B,H,W,C] in
0..1 on the CPU) and the engine's (uint8 numpy frames, MotionSequence), and turns engine errors
into messages that name the node and say what to do.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xnemo_core.errors import Cancelled, XNeMoError

from . import comfy_compat

CATEGORY = "X-NeMo"
PIPE = "XNEMO_PIPE"
MOTION = "XNEMO_MOTION"
CROP = "XNEMO_CROP"

# the face to follow when several are visible; values map onto xnemo_core.faces face_select
FACE_CHOICES = ("largest", "highest_score", "leftmost", "second_from_left", "third_from_left", "rightmost")
_FACE_SELECT = {"leftmost": 0, "second_from_left": 1, "third_from_left": 2, "rightmost": -1}
FACE_TOOLTIP = ("Which face to use when several are visible: the largest box, the most confident detection, "
                "or counted from the left/right of the frame. Once chosen, the face is followed by overlap.")


def face_select(choice: str):
    return _FACE_SELECT.get(choice, choice)


# ------------------------------------------------------------------------------------------ errors

class XNeMoNodeError(XNeMoError):
    """An engine error re-raised with the node's name and what the user can do about it."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


def _hint(exc: BaseException) -> str:
    from xnemo_core.faces import ModelNotFoundError, NoFaceError

    name = type(exc).__name__
    if isinstance(exc, NoFaceError):
        return ("Use an image/clip where one face is clearly visible and not too small, try another 'face' "
                "choice, or crop the input closer to the face.")
    if isinstance(exc, ModelNotFoundError):
        return "The face detector model is needed for face tracking."
    if name == "CheckpointError":
        return ("Check the loader's weights choice; the official X-NeMo release (CC BY-NC 4.0) goes into "
                "ComfyUI/models/xnemo/.")
    if name == "FileFormatError" or name == "MediaReadError":
        return "The file is not what this node expects; pick another file."
    return ""


def node_error(node_name: str, exc: BaseException) -> BaseException:
    """The exception to raise instead of ``exc`` (the same object for interrupts and foreign errors)."""
    if isinstance(exc, XNeMoNodeError):
        return exc
    if comfy_compat.is_interrupt(exc) and not isinstance(exc, Cancelled):
        return exc  # ComfyUI's own interrupt: let it through untouched
    if isinstance(exc, XNeMoError):
        hint = _hint(exc)
        return XNeMoNodeError(f"{node_name}: {exc}" + (f"\n{hint}" if hint else ""), exc)
    if isinstance(exc, ImportError) and "mediapipe" in str(exc):
        return XNeMoNodeError(f"{node_name}: face detection needs the 'mediapipe' package (>= 0.10.30): "
                              f"pip install mediapipe ({exc})", exc)
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return XNeMoNodeError(f"{node_name}: out of GPU memory. Lower context_frames or size, choose fp16/bf16 "
                              "in the loader, or close other models.", exc)
    return exc


def guarded(node_name: str):
    """Decorator for a node's FUNCTION: Cancel becomes ComfyUI's interrupt, engine errors get node-level text."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Cancelled as exc:
                comfy_compat.raise_interrupted(f"{node_name}: {exc}")
            except Exception as exc:
                replacement = node_error(node_name, exc)
                if replacement is exc:
                    raise
                raise replacement from exc

        return wrapper

    return decorate


def cancel_requested() -> bool:
    """The engine's ``cancel()`` callback: ComfyUI's Cancel button (or the fallback flag)."""
    return comfy_compat.processing_interrupted()


# ------------------------------------------------------------------------------------------ tensors

def to_uint8(images: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """IMAGE [B,H,W,C] float 0..1 -> uint8 numpy [B,H,W,3] (alpha dropped, grey expanded), in chunks."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise XNeMoNodeError(f"expected an IMAGE batch [frames, height, width, channels], got {tuple(images.shape)}")
    count, height, width, channels = images.shape
    out = np.empty((count, height, width, 3), np.uint8)
    for start in range(0, count, chunk):
        part = images[start:start + chunk].detach().to("cpu", torch.float32)
        if channels == 1:
            part = part.expand(-1, -1, -1, 3)
        elif channels >= 3:
            part = part[..., :3]
        else:
            raise XNeMoNodeError(f"expected 1, 3 or 4 image channels, got {channels}")
        out[start:start + chunk] = part.clamp(0, 1).mul(255.0).round().to(torch.uint8).numpy()
    return out


def to_image(frames) -> torch.Tensor:
    """uint8 [F,H,W,3] or float [F,H,W,3] in 0..1 -> ComfyUI IMAGE on the intermediate device."""
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.float().div(255.0) if tensor.dtype == torch.uint8 else tensor.float().clamp(0, 1)
    return tensor.to(comfy_compat.intermediate_device())


def first_image(images: torch.Tensor) -> np.ndarray:
    """The first image of an IMAGE batch as uint8 [H,W,3]."""
    return to_uint8(images[:1])[0]


def preview(image_uint8: np.ndarray | None, min_side: int = 192):
    """A ProgressBar preview tuple ("JPEG", PIL image, max size) of a small uint8 image, or None."""
    if image_uint8 is None:
        return None
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(image_uint8))
    scale = max(1, math.ceil(min_side / max(1, min(pil.size))))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.BILINEAR)
    return ("JPEG", pil, 512)


# ------------------------------------------------------------------------------------------ the pipe

@dataclass
class XNeMoPipe:
    """What XNEMO_PIPE carries: the five networks plus where they live and where they run.

    Weights stay on ``offload_device`` (CPU unless ComfyUI runs with --highvram / --gpu-only) between
    runs; nodes that compute move them to ``load_device`` with :meth:`on_device` and back afterwards.
    """

    models: Any  # xnemo_core.models.stack.XNeMoModels
    name: str
    license: str
    load_device: torch.device
    offload_device: torch.device
    native_size: int
    info: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.models.dtype

    def size_bytes(self) -> int:
        total = 0
        for module in self.models.modules().values():
            total += sum(p.numel() * p.element_size() for p in module.parameters())
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        return total

    @contextlib.contextmanager
    def on_device(self):
        """Run the block with the models on the compute device; afterwards offload and free the cache."""
        moved = self.load_device != self.offload_device
        if moved:
            comfy_compat.free_memory(int(self.size_bytes() * 1.3), self.load_device)
            self.models.to(device=self.load_device)
        try:
            yield self.models
        finally:
            if moved:
                self.models.to(device=self.offload_device)
            comfy_compat.soft_empty_cache()

    def __repr__(self) -> str:
        return f"XNeMoPipe({self.name}, {self.native_size}px, {self.dtype}, run on {self.load_device})"


@dataclass
class ReferenceInfo:
    """What XNEMO_CROP carries: where the animated square came from in the reference image."""

    crop: Any  # xnemo_core.faces.ReferenceCrop
    size: int  # side of the animated frames in pixels

    def __repr__(self) -> str:
        box = [int(v) for v in self.crop.appearance_box]
        return f"XNeMoCrop(box={box}, image={self.crop.image_size}, padded={self.crop.padded})"
