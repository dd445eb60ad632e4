"""Shared pieces of the evaluation metrics: availability records, model-file lookup, image helpers.

Every metric backend reports whether it can run through :class:`MetricStatus`: a metric whose
model or package is missing is *listed* in the results table with the reason ("absent: needs ...")
instead of silently disappearing.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import XNeMoError
from ..faces import _package_dir


class MetricUnavailable(XNeMoError):
    """A metric cannot run here; the message says what is missing and how to provide it."""


@dataclass(frozen=True)
class MetricStatus:
    """One results-table column: its name, direction, backend, and why it is absent (if it is)."""

    name: str
    higher_is_better: bool
    backend: str = ""
    absent: str | None = None  # None when the metric runs

    @property
    def available(self) -> bool:
        return self.absent is None


# the folder of an installed package, found without importing it (one implementation, in faces)
package_dir = _package_dir


def package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package, or None."""
    folder = package_dir(package)
    if folder is None:
        return None
    path = folder.joinpath(*parts)
    return path if path.is_file() else None


def env_path(value: str | os.PathLike | None, env: str) -> str | None:
    """An explicit path wins; else the environment variable ``env``; else None."""
    if value:
        return str(value)
    return os.environ.get(env) or None


def user_file(value: str | os.PathLike | None, env: str, flag: str, needs: str,
              kind: str) -> tuple[str | None, str | None]:
    """(path, why it is absent or None) of a weights file only the user can supply: the explicit path,
    else ``$env``; the reason names what is needed, the flag and the variable, or the missing file."""
    path = env_path(value, env)
    if path is None:
        return None, f"needs {needs} ({flag} PATH or ${env})"
    if not Path(path).is_file():
        return path, f"{kind} file not found: {path}"
    return path, None


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def as_uint8_rgb(image) -> np.ndarray:
    """[H,W,3] uint8 RGB (float input in [0,1] is scaled)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H,W,3], got {array.shape}")
    return np.ascontiguousarray(array)


def upscale_for_analysis(image: np.ndarray, min_side: int = 256) -> tuple[np.ndarray, float]:
    """Lanczos-upscale small frames (the demo model renders 64 px) so face analysers see a face of
    a usable size. Returns (image, scale). Frames at least ``min_side`` px are returned as they are."""
    from PIL import Image

    image = as_uint8_rgb(image)
    h, w = image.shape[:2]
    if min(h, w) >= min_side:
        return image, 1.0
    scale = min_side / min(h, w)
    size = (int(round(w * scale)), int(round(h * scale)))
    resample = getattr(Image, "Resampling", Image).LANCZOS
    return np.asarray(Image.fromarray(image).resize(size, resample)), scale


def crop_space_face_box(size_hw: tuple[int, int]) -> np.ndarray:
    """Where the face sits in an X-NeMo appearance crop: the crop is the face box grown by half its
    size on every side, so the face is the central half. Used only when a detector finds nothing in a
    generated frame (which is in that crop space by construction)."""
    h, w = size_hw
    return np.array([w * 0.25, h * 0.25, w * 0.75, h * 0.75], np.float32)


class FaceBoxes:
    """Largest-face boxes from the project's BlazeFace detector (IMAGE mode), with an optional
    fallback box for frames in the appearance-crop space. Counts how often the fallback was used."""

    def __init__(self, detector=None):
        self._detector = detector
        self.fallbacks = 0
        self.detections = 0

    @property
    def detector(self):
        if self._detector is None:
            from ..faces import BlazeFaceDetector

            self._detector = BlazeFaceDetector()
        return self._detector

    def box(self, image: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray | None:
        """[x0,y0,x1,y1] float32 of the largest face, else ``fallback`` (may be None)."""
        dets = self.detector.detect(as_uint8_rgb(image))
        if len(dets):
            areas = (dets.boxes[:, 2] - dets.boxes[:, 0]) * (dets.boxes[:, 3] - dets.boxes[:, 1])
            self.detections += 1
            return dets.boxes[int(np.argmax(areas))].astype(np.float32)
        if fallback is not None:
            self.fallbacks += 1
            return np.asarray(fallback, np.float32)
        return None


def is_torchscript(path: str | os.PathLike) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_program(path: str | os.PathLike):
    """A whole network from a user file without unpickling code: a ``torch.export`` program (.pt2) or
    a TorchScript archive. Returns a callable module on CPU, or None when the file is neither."""
    import warnings

    import torch

    path = str(path)
    if path.endswith(".pt2"):
        return torch.export.load(path).module()
    if is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but still loads
            return torch.jit.load(path, map_location="cpu").eval()
    return None
