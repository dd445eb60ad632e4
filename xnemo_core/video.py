"""Reading and writing frames: videos through PyAV (what ComfyUI core uses), images through PIL.

Frames are always numpy ``uint8`` arrays of shape ``[F, H, W, 3]`` (RGB). Conversion to and from
ComfyUI ``IMAGE`` tensors (float 0..1) belongs to the node layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from xnemo_core.errors import FileFormatError, InvalidInputError

__all__ = [
    "MediaReadError",
    "VideoFrames",
    "read_video",
    "write_video",
    "read_image",
    "to_uint8_frames",
]

# Encoders tried in order when write_video() is given no codec: H.264 first, then MPEG-4 part 2,
# which every FFmpeg build has.
_ENCODER_PREFERENCE = ("libx264", "h264", "libopenh264", "mpeg4")


class MediaReadError(FileFormatError):
    """A media file exists but cannot be decoded. ``path`` is the file; the message names it."""


@dataclass
class VideoFrames:
    """Decoded frames of one video.

    ``fps`` is the rate of the returned frames, i.e. ``source_fps / stride``, so playing them back
    at ``fps`` keeps the original speed. ``source_size`` is (width, height) of the decoded
    frames (after applying any rotation stored in the file).
    """

    frames: np.ndarray  # [F, H, W, 3] uint8
    fps: float
    source_fps: float
    source_size: tuple[int, int]  # (width, height)
    frame_indices: list[int] = field(default_factory=list)  # index of each frame in the source
    path: str = ""

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def _require_av():
    try:
        import av  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - av is a hard dependency
        raise ImportError("PyAV is needed for video files: pip install av") from exc
    return av


def _check_exists(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"file not found: {path!r}")
    if os.path.isdir(path):
        raise MediaReadError(path, "expected a file but got a folder")
    return path


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, getattr(stream, "guessed_rate", None), stream.base_rate):
        if rate:
            value = float(rate)
            if 0 < value < 1000:
                return value
    return 25.0


def _apply_rotation(image: np.ndarray, rotation: int) -> np.ndarray:
    """Undo the display-matrix rotation of phone videos (``rotation`` in degrees, counter-clockwise)."""
    turns = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


def read_video(
    path: str | os.PathLike,
    max_frames: int | None = None,
    stride: int = 1,
    start_frame: int = 0,
) -> VideoFrames:
    """Decode a video file to RGB uint8 frames.

    Args:
        path: the video file.
        max_frames: keep at most this many frames (after ``start_frame`` and ``stride``); None or
            0 keeps all.
        stride: keep every ``stride``-th frame.
        start_frame: skip this many source frames first.

    Raises:
        FileNotFoundError: the file does not exist.
        MediaReadError: the file is not a readable video, or has no frames in the requested range.
    """
    if stride < 1:
        raise InvalidInputError(f"stride must be >= 1, got {stride}")
    if start_frame < 0:
        raise InvalidInputError(f"start_frame must be >= 0, got {start_frame}")
    path = _check_exists(path)
    av = _require_av()

    frames: list[np.ndarray] = []
    indices: list[int] = []
    try:
        container = av.open(path)
    except Exception as exc:  # av.error.FFmpegError and friends
        raise MediaReadError(path, f"cannot open video: {exc}") from exc
    try:
        if not container.streams.video:
            raise MediaReadError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = _stream_fps(stream)
        coded_size: tuple[int, int] | None = None  # (width, height) before rotation
        for index, frame in enumerate(container.decode(stream)):
            if index < start_frame or (index - start_frame) % stride:
                continue
            rotation = getattr(frame, "rotation", 0) or 0
            if coded_size is None:
                coded_size = (frame.width, frame.height)
            elif (frame.width, frame.height) != coded_size:
                # Mid-stream size change: scale to the first frame's size so the frames stack.
                frame = frame.reformat(width=coded_size[0], height=coded_size[1])
            image = _apply_rotation(frame.to_ndarray(format="rgb24"), rotation)
            frames.append(image)
            indices.append(index)
            if max_frames and len(frames) >= max_frames:
                break
    except MediaReadError:
        raise
    except Exception as exc:
        raise MediaReadError(path, f"cannot decode video: {exc}") from exc
    finally:
        container.close()

    if not frames:
        raise MediaReadError(path, f"no frames decoded (start_frame={start_frame}, stride={stride})")
    return VideoFrames(
        frames=np.stack(frames),
        fps=source_fps / stride,
        source_fps=source_fps,
        source_size=(int(frames[0].shape[1]), int(frames[0].shape[0])),
        frame_indices=indices,
        path=path,
    )


def to_uint8_frames(frames) -> np.ndarray:
    """Bring frames to ``[F, H, W, 3]`` uint8.

    Accepts numpy arrays or CPU tensors (anything ``np.asarray`` takes), one frame ``[H, W, C]``
    or a batch, uint8 or float in 0..1, with 1, 3 or 4 channels (alpha is dropped).
    """
    array = np.asarray(frames)
    if array.ndim == 2:
        array = array[None, ..., None]
    elif array.ndim == 3:
        array = array[None] if array.shape[-1] in (1, 3, 4) else array[..., None]
    if array.ndim != 4:
        raise InvalidInputError(f"expected frames [F,H,W,C], got shape {tuple(np.shape(frames))}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
        elif np.issubdtype(array.dtype, np.bool_):
            array = array.astype(np.uint8) * 255
        else:
            array = np.clip(array, 0, 255).astype(np.uint8)
    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        array = array[..., :3]
    elif channels != 3:
        raise InvalidInputError(f"expected 1, 3 or 4 channels, got {channels}")
    return array


def _pick_encoder(av, codec: str | None) -> str:
    candidates: Sequence[str] = (codec,) if codec else _ENCODER_PREFERENCE
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise RuntimeError(
        f"no usable video encoder among {list(candidates)} in this PyAV/FFmpeg build"
    )


def write_video(
    path: str | os.PathLike,
    frames,
    fps: float,
    codec: str | None = None,
    crf: int = 18,
    pix_fmt: str = "yuv420p",
) -> str:
    """Write frames to a video file (mp4 by default: H.264 yuv420p where available, else MPEG-4).

    Frames go through :func:`to_uint8_frames`. Odd widths/heights are padded by one edge pixel
    (yuv420p needs even sizes). Returns the path written.
    """
    if not fps or fps <= 0:
        raise InvalidInputError(f"fps must be > 0, got {fps}")
    array = to_uint8_frames(frames)
    if array.shape[0] == 0:
        raise InvalidInputError("no frames to write")
    height, width = array.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        height, width = height + pad_h, width + pad_w

    av = _require_av()
    encoder = _pick_encoder(av, codec)
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        stream.time_base = 1 / rate
        if encoder == "libx264":
            stream.options = {"crf": str(int(crf))}
        elif encoder == "mpeg4":
            stream.bit_rate = max(1_000_000, int(width * height * float(rate) * 0.5))
        for index, image in enumerate(array):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file to RGB uint8 ``[H, W, 3]`` (EXIF orientation applied, alpha dropped)."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415

    path = _check_exists(path)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if array.max() > 255 else 255.0
                array = np.rint(np.clip(array / peak, 0, 1) * 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(array[..., None], 3, axis=-1))
            return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    except UnidentifiedImageError as exc:
        raise MediaReadError(path, "not a readable image") from exc
    except OSError as exc:
        raise MediaReadError(path, f"cannot read image: {exc}") from exc
