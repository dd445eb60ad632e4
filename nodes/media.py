"""Driving media for the nodes: core VIDEO / IMAGE batches to uint8 frames, AUDIO pass-through, demo files.

Why here and not in the engine: VIDEO (comfy_api VideoInput) and AUDIO ({"waveform", "sample_rate"})
are ComfyUI value types. Frames of a file-backed VIDEO are decoded straight from the file with
start / stride / cap applied while decoding (as uint8), so a long clip never sits in RAM as float32.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import XNeMoNodeError, to_uint8

log = logging.getLogger("xnemo")

ASSETS = Path(__file__).resolve().parent.parent / "xnemo_core" / "assets"
DEMO_MEDIA = {"xnemo_astronaut.png": "astronaut.png", "xnemo_driving_carphone.mp4": "driving_carphone.mp4"}


def install_demo_media(input_dir: str | os.PathLike) -> list[str]:
    """Copy the demo reference image and driving clip into ComfyUI's input folder (if absent).

    The shipped workflows name these files in core LoadImage / LoadVideo nodes, which only read from
    the input folder. Returns the names copied. Never raises (a read-only input folder is logged).
    """
    copied = []
    try:
        os.makedirs(input_dir, exist_ok=True)
        for name, source in DEMO_MEDIA.items():
            target = os.path.join(input_dir, name)
            if not os.path.exists(target) and (ASSETS / source).is_file():
                shutil.copyfile(ASSETS / source, target)
                copied.append(name)
    except OSError as exc:
        log.warning("X-NeMo: could not copy the demo media into %s (%s); copy %s there by hand",
                    input_dir, exc, ", ".join(DEMO_MEDIA))
    return copied


@dataclass
class DrivingFrames:
    frames: np.ndarray  # [F,H,W,3] uint8
    fps: float  # rate of these frames (source fps / stride)
    source_fps: float
    start_frame: int
    stride: int
    audio: dict | None
    source: str


def _video_path(video) -> str | None:
    getter = getattr(video, "get_stream_source", None)
    if getter is None:
        return None
    try:
        source = getter()
    except Exception:
        return None
    return source if isinstance(source, str) and os.path.isfile(source) else None


def read_audio(path: str) -> dict | None:
    """The first audio stream of a media file as ComfyUI AUDIO, or None when there is none."""
    import av

    try:
        container = av.open(path)
    except Exception:
        return None
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        chunks, rate = [], stream.rate or stream.codec_context.sample_rate
        for frame in container.decode(stream):
            array = frame.to_ndarray()
            if not frame.format.is_planar:  # interleaved: (1, samples*channels)
                array = array.reshape(-1, len(frame.layout.channels)).T
            if np.issubdtype(array.dtype, np.integer):
                array = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
            chunks.append(array.astype(np.float32))
        if not chunks:
            return None
        waveform = torch.from_numpy(np.concatenate(chunks, axis=1))[None]
        return {"waveform": waveform, "sample_rate": int(rate)}
    except Exception as exc:
        log.warning("X-NeMo: could not decode the audio of %s (%s); continuing without audio", path, exc)
        return None
    finally:
        container.close()


def trim_audio(audio: dict | None, start_s: float, duration_s: float | None) -> dict | None:
    """AUDIO cut to [start_s, start_s + duration_s) so it stays in sync with the frames used."""
    if audio is None:
        return None
    waveform, rate = audio["waveform"], int(audio["sample_rate"])
    first = max(0, round(start_s * rate))
    last = waveform.shape[-1] if duration_s is None else min(waveform.shape[-1], first + round(duration_s * rate))
    return {**audio, "waveform": waveform[..., first:last], "sample_rate": rate}


def driving_frames(images=None, video=None, fps: float = 25.0, start_frame: int = 0, stride: int = 1,
                   max_frames: int = 0, audio: dict | None = None) -> DrivingFrames:
    """Frames (and audio) of the driving input, with start / stride / cap applied."""
    if (images is None) == (video is None):
        raise XNeMoNodeError("X-NeMo Extract Motion: connect exactly one driving input: driving_images (IMAGE "
                             "batch) or driving_video (VIDEO from Load Video)")
    stride, start_frame, max_frames = max(1, int(stride)), max(0, int(start_frame)), max(0, int(max_frames))
    if video is not None:
        path = _video_path(video)
        result = _from_file(video, path, start_frame, stride, max_frames) if path else None
        if result is None:
            result = _from_components(video, start_frame, stride, max_frames)
        return result
    total = int(images.shape[0])
    picked = images[start_frame::stride]
    if max_frames:
        picked = picked[:max_frames]
    if picked.shape[0] == 0:
        raise XNeMoNodeError(f"X-NeMo Extract Motion: start_frame {start_frame} is past the last of the {total} "
                             f"driving frames")
    count = int(picked.shape[0])
    fps = float(fps)
    clip = trim_audio(audio, start_frame / fps, count * stride / fps)
    return DrivingFrames(to_uint8(picked), fps / stride, fps, start_frame, stride, clip, "the driving frames")


def _from_file(video, path: str, start_frame: int, stride: int, max_frames: int) -> DrivingFrames | None:
    from xnemo_core.video import read_video

    try:  # a VIDEO trimmed by another node no longer matches its file: decode its components instead
        duration, (file_frames, file_fps) = float(video.get_duration()), _frame_count_and_rate(path)
        if file_frames and file_fps and abs(duration * file_fps - file_frames) > 1.5:
            return None
    except Exception:
        pass
    result = read_video(path, max_frames=max_frames or None, stride=stride, start_frame=start_frame)
    used = len(result.frames)
    clip = trim_audio(read_audio(path), start_frame / result.source_fps, used * stride / result.source_fps)
    return DrivingFrames(result.frames, result.fps, result.source_fps, start_frame, stride, clip,
                         os.path.basename(path))


def _frame_count_and_rate(path: str) -> tuple[int, float]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 0)
        if stream.frames:
            return int(stream.frames), rate
        if stream.duration is not None and stream.time_base and rate:
            return round(float(stream.duration * stream.time_base) * rate), rate
    return 0, rate


def _from_components(video, start_frame: int, stride: int, max_frames: int) -> DrivingFrames:
    components = video.get_components()
    fps = float(components.frame_rate)
    images = components.images
    result = driving_frames(images=images, fps=fps, start_frame=start_frame, stride=stride, max_frames=max_frames,
                            audio=getattr(components, "audio", None))
    result.source = "the driving video"
    return result
