"""Training: every stage runs at a micro size on CPU, trains exactly its parameters, masks the
stated fraction of reference tokens, and resumes after a kill exactly where it stopped."""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import losses as L
from training.augment import (
    DrivingAugment,
    colour_jitter,
    driving_f_rts,
    face_centred_box,
    piecewise_affine_displacement,
    piecewise_affine_warp,
    sample_augment,
    sample_pair_augment,
)
from training.checkpoint import latest_checkpoint, save_checkpoint
from training.config import (
    AugmentSpec,
    ConfigError,
    DataSpec,
    config_from_dict,
    load_config,
)
from training.data import (
    FaceSampleDataset,
    FaceVideo,
    MediaSource,
    StepBatchSampler,
    discover_media,
    load_videos,
    make_sample,
    resample_indices,
)
from training.stages import stage_selects
from training.trainer import Trainer
from xnemo_core.checkpoints import load_bundle, read_bundle_metadata
from xnemo_core.config import (
    ImageEncoderConfig,
    MotionEncoderConfig,
    UNetConfig,
    VAEConfig,
    XNeMoConfig,
)
from xnemo_core.models.reference import mask_reference_kv

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def micro_config() -> XNeMoConfig:
    """Official topology (4 levels, 21+21 inserted modules), as small as it gets."""
    return XNeMoConfig(
        unet=UNetConfig(block_out_channels=(32, 32, 32, 32), cross_attention_dim=16, sample_size=8,
                        attention_head_dim=2, module_heads=2, norm_num_groups=8, module_norm_groups=8),
        motion_encoder=MotionEncoderConfig(image_size=32, stem_channels=8, hourglass_channels=16, hourglass_depth=2,
                                           attn_embed_dim=32, attn_heads=2, attn_norm_groups=4),
        vae=VAEConfig(block_out_channels=(32, 32), layers_per_block=1),
        image_encoder=ImageEncoderConfig(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=1,
                                         num_attention_heads=2, patch_size=32),
        name="micro",
    )


def synthetic_video(frames: int = 12, seed: int = 0, holdout: int = 2) -> FaceVideo:
    """A cartoon face (skin ellipse, eyes, a mouth that opens) moving across a 64x48 frame."""
    h, w = 48, 64
    yy, xx = np.mgrid[:h, :w]
    out, boxes = np.zeros((frames, h, w, 3), np.uint8), []
    for i in range(frames):
        cx, cy, s = 32 + 4 * np.sin(i / 3 + seed), 24 + 2 * np.cos(i / 4), 12
        f = np.full((h, w, 3), 40 + 30 * seed, np.uint8)
        f[((xx - cx) / s) ** 2 + ((yy - cy) / (1.2 * s)) ** 2 < 1] = (200, 160, 120)
        for ex in (cx - 4, cx + 4):
            f[(abs(xx - ex) < 2) & (abs(yy - (cy - 3)) < 2)] = 0
        f[(abs(xx - cx) < 4) & (abs(yy - (cy + 5)) < 1 + i % 3)] = (120, 0, 0)
        out[i] = f
        boxes.append([cx - s, cy - 1.2 * s, cx + s, cy + 1.2 * s])
    return FaceVideo(MediaSource(f"synthetic{seed}.mp4", "video"), out, np.asarray(boxes, np.float32), frames - holdout)


VIDEOS = [synthetic_video(12, 0), synthetic_video(10, 1)]


def synthetic_labels(video: FaceVideo) -> np.ndarray:
    """Motion labels that follow the cartoon (mouth opening, head x); frame 1 has no face (NaN)."""
    from training.motion_labels import LABEL_DIM

    i = np.arange(len(video), dtype=np.float32)
    labels = np.zeros((len(video), LABEL_DIM), np.float32)
    labels[:, 25] = (i % 3) / 2  # jawOpen-like
    labels[:, 52] = np.sin(i / 3)  # head turns with the face's x
    labels[1] = np.nan
    return labels


LABELLED = [dataclasses.replace(v, motion_labels=synthetic_labels(v)) for v in VIDEOS]
GAN = {"resolution": 16, "appearance_dim": 32, "appearance_width": 8, "appearance_layers": [1, 1, 1, 1],
       "style_dim": 32, "mapping_layers": 2, "channel_base": 256, "channel_max": 32, "disc_channel_base": 256,
       "disc_channel_max": 32}


def make_cfg(stage: str, **optim):
    clip = 4 if stage in ("temporal", "vae", "vae_decoder") else 1
    if stage == "motion_init":
        optim = {"batch_size": 4, **optim}
    return config_from_dict({
        "stage": stage, "model": {"config": micro_config().to_dict()},
        "data": {"resolution": 16, "clip_frames": clip},
        "loss": {"gan": stage == "motion", "random_perceptual_ok": True, "perceptual_width_divisor": 16},
        "gan": GAN,
        "optim": {"batch_size": 2, "max_steps": 4, "lr": 1e-3, "gan_lr": 2e-3, **optim},
        "log": {"checkpoint_every": 2, "sample_every": 0, "log_every": 100},
    })


def make_trainer(stage, tmp_path, name="run", **optim) -> Trainer:
    videos = LABELLED if stage == "motion_init" else VIDEOS
    return Trainer(make_cfg(stage, **optim), output=tmp_path / name, videos=videos, log=lambda msg: None)


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    named = {f"{c}.{k}": p.detach().clone() for c, m in trainer.models.modules().items() for k, p in m.named_parameters()}
    if trainer.gan is not None:
        named.update({f"gan.{k}": p.detach().clone() for k, p in trainer.gan.named_parameters()})
    return named




@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two threads per
    process spin against other processes (10-50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------- configs

def test_stage_yaml_configs_parse():
    files = sorted(CONFIGS.glob("*.yaml"))
    names = {p.stem for p in files}
    for stage in ("stage1", "stage2", "stage3"):
        assert {f"{stage}_full", f"{stage}_tiny"} <= names
    stages = {}
    for path in files:
        cfg = load_config(path)
        stages[path.stem] = cfg.stage
        cfg.model.xnemo_config()  # the preset / config resolves
        if path.stem.endswith("_full"):
            assert cfg.model.preset == "official" and cfg.data.resolution == 512
            assert cfg.loss.reference_mask_ratio == pytest.approx(0.3)
        if path.stem.startswith("stage2"):
            lc = cfg.loss
            assert lc.gan and (lc.l1, lc.adversarial, lc.feature_matching) == (1.0, 1.0, 10.0)
            if path.stem.endswith("_full"):  # appendix A; tiny/demo have no perceptual weights offline
                assert (lc.vgg, lc.vggface) == (3e-2, 6e-3) and lc.vgg19_weights and lc.vggface_weights
    assert stages["stage1_full"] == "image" and stages["stage2_full"] == "motion" and stages["stage3_full"] == "temporal"
    assert load_config(CONFIGS / "stage3_full.yaml").data.clip_frames == 24
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"stage": 1, "optim": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="clip_frames"):
        config_from_dict({"stage": "temporal", "data": {"clip_frames": 1}})


# ----------------------------------------------------------------------------------------- augmentation

def test_f_rts_formula_on_synthetic_boxes():
    ref = np.array([100.0, 50.0, 200.0, 170.0])  # centre (150, 110), side max(100, 120) = 120
    drv = np.array([[130.0, 80.0, 190.0, 140.0], [100.0, 50.0, 200.0, 170.0]])  # centre (160, 110), side 60
    got = driving_f_rts(drv, ref, "paper")
    # y-first (release order): (Δy / s_r, Δx / s_r, s_d / s_r)
    np.testing.assert_allclose(got, [[0.0, 10 / 120, 0.5], [0.0, 0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(driving_f_rts(drv, ref, "constant"), [[0, 0, 1], [0, 0, 1]])
    # augmentation changes what the encoder sees, never f_rts (it comes from the true boxes)
    video = VIDEOS[0]
    plain = make_sample(video, 0, [5], 16, 32)
    augmented = make_sample(video, 0, [5], 16, 32, sample_augment(AugmentSpec(), np.random.default_rng(3)))
    torch.testing.assert_close(plain["f_rts"], augmented["f_rts"])
    b0, b5 = video.boxes[0], video.boxes[5]
    s0 = max(b0[2] - b0[0], b0[3] - b0[1])
    expected = [((b5[1] + b5[3]) - (b0[1] + b0[3])) / 2 / s0, ((b5[0] + b5[2]) - (b0[0] + b0[2])) / 2 / s0,
                max(b5[2] - b5[0], b5[3] - b5[1]) / s0]
    np.testing.assert_allclose(plain["f_rts"][0].numpy(), expected, rtol=1e-5)
    assert not torch.equal(plain["driving"], augmented["driving"])
    torch.testing.assert_close(plain["target"], augmented["target"])  # targets are never augmented


def test_augmentation_pieces():
    spec = AugmentSpec(scale=0.3)
    scales = [sample_augment(spec, np.random.default_rng(i)).scale for i in range(200)]
    assert 0.7 <= min(scales) < 0.75 and 1.25 < max(scales) <= 1.3
    box = face_centred_box([10, 20, 30, 60], crop_scale=1.1, scale=1.2)
    np.testing.assert_allclose(box, [20 - 26.4, 40 - 26.4, 20 + 26.4, 40 + 26.4])
    # piecewise affine: control points move by exactly their displacement, cells interpolate linearly
    warp = np.zeros((3, 3, 2), np.float32)
    warp[1, 1] = (0.1, -0.05)
    disp = piecewise_affine_displacement(warp, 64)
    # pixel (32, 32) sits half a pixel past the centre control point in x and y: barycentric weight
    # of that point = 1 - (0.5/32 + 0.5/32)
    np.testing.assert_allclose(disp[32, 32].numpy(), [0.1 * 0.96875, -0.05 * 0.96875], rtol=1e-5)
    np.testing.assert_allclose(disp[0, 0].numpy(), [0, 0], atol=1e-3)
    row = disp[32, 32:].numpy()[:, 0]  # along x from the centre: linear decay to the border
    assert np.allclose(np.diff(row), np.diff(row)[0], atol=1e-6)
    image = torch.rand(3, 16, 16)
    torch.testing.assert_close(piecewise_affine_warp(image, np.zeros((5, 5, 2), np.float32)), image)
    torch.testing.assert_close(colour_jitter(image, DrivingAugment.identity()), image)
    bright = colour_jitter(image * 0.5, DrivingAugment(brightness=1.5))
    torch.testing.assert_close(bright, (image * 0.75).clamp(0, 1))


# ----------------------------------------------------------------------------------------- data

def test_paired_augmentation_moves_reference_and_targets_together():
    video = dataclasses.replace(VIDEOS[0], frames=VIDEOS[0].frames.copy())
    for frame, box in zip(video.frames, video.boxes.astype(int)):  # a left-right asymmetric mark
        frame[box[1]:box[1] + 8, box[0]:box[0] + 8] = (250, 20, 20)
    rng = np.random.default_rng(0)
    assert sample_pair_augment(AugmentSpec(), rng) is None
    assert rng.random() == np.random.default_rng(0).random()  # off: draws nothing, old samples unchanged
    plain = make_sample(video, 0, [0, 6], 32, 32)
    # mirror: images mirror, the horizontal f_rts offset changes sign, vertical offset and scale stay
    flip = sample_pair_augment(AugmentSpec(pair_flip=1.0), np.random.default_rng(0))
    mirrored = make_sample(video, 0, [0, 6], 32, 32, pair=flip)
    f, m = plain["f_rts"].numpy(), mirrored["f_rts"].numpy()
    np.testing.assert_allclose(m[:, [0, 2]], f[:, [0, 2]], atol=1e-5)
    np.testing.assert_allclose(m[:, 1], -f[:, 1], atol=1e-5)
    assert abs(f[1, 1]) > 0.05  # the cartoon head does move sideways
    for key, pick in (("reference", ...), ("target", (slice(None), 1)), ("driving", (slice(None), 1))):
        a, b = mirrored[key][pick], plain[key][pick]  # equal up to sub-pixel box rounding
        assert (a - b.flip(-1)).abs().mean() < 0.7 * (a - b).abs().mean(), key
    # colour, shift and zoom: one draw for reference and targets, so a target that is the reference
    # frame stays identical to the reference, while both differ from the un-augmented crop
    spec = AugmentSpec(pair_colour=0.4, pair_shift=0.1, pair_zoom=0.1)
    draws = [sample_pair_augment(spec, np.random.default_rng(i)) for i in range(200)]
    assert all(abs(d.shift[0]) <= 0.1 and 0.9 <= d.zoom <= 1.1 and 0.6 <= d.colour.brightness <= 1.4 for d in draws)
    assert max(d.shift[1] for d in draws) > 0.09 and not any(d.flip for d in draws)
    pair = draws[0]
    moved = make_sample(video, 0, [0, 6], 32, 32, pair=pair)
    torch.testing.assert_close(moved["target"][:, 0], moved["reference"])
    assert (moved["reference"] - plain["reference"]).abs().mean() > 0.02
    torch.testing.assert_close(moved["f_rts"], plain["f_rts"])  # relative motion is untouched
    torch.testing.assert_close(moved["driving"], plain["driving"])
    # the dataset draws it from the config
    ds = FaceSampleDataset(VIDEOS, DataSpec(resolution=32), AugmentSpec(enabled=False, pair_flip=1.0), 32)
    item = ds[3]
    vi, ref = int(item["video_index"]), int(item["frame_indices"][0])
    again = make_sample(VIDEOS[vi], ref, [int(i) for i in item["frame_indices"][1:]], 32, 32, pair=flip)
    torch.testing.assert_close(item["reference"], again["reference"])


def test_media_discovery_resampling_and_box_cache(tmp_path):
    folder = tmp_path / "clips" / "person_a"
    folder.mkdir(parents=True)
    video = synthetic_video(6, 0)
    for i, frame in enumerate(video.frames):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    Image.fromarray(video.frames[0]).save(tmp_path / "clips" / "still.jpg")
    sources = discover_media([tmp_path / "clips"])
    assert [(Path(s.path).name, s.kind) for s in sources] == [("person_a", "frames"), ("still.jpg", "image")]
    assert resample_indices(30, 30.0, 25.0).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 18, 19,
                                                         20, 21, 22, 24, 25, 26, 27, 28]
    calls = []

    def detector(frames, fps, still):
        calls.append(len(frames))
        if still:
            return video.boxes[:1]
        boxes = video.boxes[: len(frames)].copy()
        boxes[1] = np.nan  # a missed frame is filled from its neighbours
        return boxes

    detector.name = "counting"
    spec = DataSpec(roots=[str(tmp_path / "clips")], resolution=16, cache_dir=str(tmp_path / "cache"),
                    holdout_fraction=0.34)
    first = load_videos(spec, detector)
    second = load_videos(spec, detector)
    assert calls == [6, 1]  # detection ran once per source; the second epoch read the JSON cache
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    np.testing.assert_allclose(second[0].boxes, first[0].boxes)
    got = first[0].boxes
    np.testing.assert_allclose(got[1], (got[0] + got[2]) / 2, rtol=1e-5)  # the missed frame, interpolated
    scale = first[0].frames.shape[2] / 64  # frames were shrunk to the working size, boxes with them
    assert scale < 1 and np.allclose(got[0], video.boxes[0] * scale, rtol=1e-2)
    assert [v.train_end for v in first] == [4, 1]
    cached = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert cached["detector"] == "counting"


def test_samples_are_a_function_of_their_id():
    spec = DataSpec(resolution=16, clip_frames=4)
    data = FaceSampleDataset(VIDEOS, spec, AugmentSpec(), 32, seed=5)
    a, b = data[123], data[123]
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert a["target"].shape == (3, 4, 16, 16) and a["driving"].shape == (3, 4, 32, 32)
    vi, ref, frames, _ = data.choose(123)
    assert max(frames) < VIDEOS[vi].train_end and ref < VIDEOS[vi].train_end  # held-out frames never train
    assert np.diff(frames).tolist() == [1, 1, 1]
    batches = list(StepBatchSampler(3, 5, batch_size=2, world=2, rank=1))
    assert batches == [[14, 15], [18, 19]]


# ----------------------------------------------------------------------------------------- stages

EXPECTED = {
    "vae": lambda c, n: c == "vae",
    "vae_decoder": lambda c, n: c == "vae" and n.startswith("decoder."),
    "motion_init": lambda c, n: c == "motion_encoder",
    "image": lambda c, n: c == "reference_unet" or (c == "denoising_unet" and "_modules." not in n),
    "motion": lambda c, n: c == "motion_encoder" or (c == "denoising_unet" and ".motion_modules." in n),
    "temporal": lambda c, n: c == "denoising_unet" and ".temporal_modules." in n,
    "joint": lambda c, n: c in ("reference_unet", "motion_encoder") or (c == "denoising_unet" and ".temporal_modules." not in n),
}


def never_reached(name: str) -> bool:
    """Trainable parameters no loss can reach, by construction of the (official) model."""
    if re.search(r"\.transformer_blocks\.\d+\.(attn2\.to_[qk]|norm2)\.", name):
        return True  # attn2 sees one CLIP token: its output is to_out(to_v(e)), whatever the queries
    if name.startswith("vae.decoder.mid_block.attentions."):
        return True  # diffusers' MidBlockTemporalDecoder only runs its attention between two resnets (layers >= 2)
    tail = "reference_unet.up_blocks.3.attentions.2."  # after the last bank record, nothing is read
    return name.startswith(tail) and not name.startswith(
        (tail + "norm.", tail + "proj_in.", tail + "transformer_blocks.0.norm1."))


@pytest.mark.parametrize("stage", ["vae", "vae_decoder", "motion_init", "image", "motion", "joint", "temporal"])
def test_stage_trains_exactly_its_parameters_and_loss_falls(stage, tmp_path):
    trainer = make_trainer(stage, tmp_path)
    models = trainer.models
    expected = {f"{c}.{n}" for c, m in models.modules().items() for n, _ in m.named_parameters() if EXPECTED[stage](c, n)}
    assert set(trainer.trainable) == expected
    for c, m in models.modules().items():
        for n, p in m.named_parameters():
            assert p.requires_grad == (f"{c}.{n}" in expected)
    assert not any(".image_encoder." in k or k.startswith("image_encoder.") for k in trainer.params)
    before = snapshot(trainer)
    batch = trainer.batch([0, 1, 2, 3] if stage == "motion_init" else [0, 1])
    steps = 10 if stage == "motion" else 6  # the GAN's L1 first jumps (adversarial start), then falls
    history = [trainer.train_step(batch, micro_step=0) for _ in range(steps)]  # same batch, same noise
    after = snapshot(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    gan_g = {k for k in before if k.startswith("gan.") and not k.startswith("gan.discriminator.")}
    assert changed - gan_g - {k for k in changed if k.startswith("gan.discriminator.")} <= expected
    assert changed & expected == {k for k in expected if not never_reached(k)}
    if stage == "motion":
        assert gan_g <= changed  # the GAN head trains with the motion path
        assert any(k.startswith("gan.discriminator.") for k in changed)
    key = "l1" if stage.startswith("vae") else "labels" if stage == "motion_init" else "diffusion"
    values = [h[key] for h in history]
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert values[-1] < 0.95 * values[0], values
    assert sum(b < a for a, b in itertools.pairwise(values)) >= 4, values  # falls step after step
    if stage == "motion":
        assert np.mean([h["gan_l1"] for h in history[-3:]]) < history[0]["gan_l1"]


def test_stage_rules_cover_named_families():
    assert stage_selects("image", "denoising_unet", "down_blocks.0.attentions.0.proj_in.weight")
    assert not stage_selects("image", "denoising_unet", "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight")
    assert stage_selects("motion", "denoising_unet", "up_blocks.1.motion_modules.2.temporal_transformer.proj_out.bias")
    assert not stage_selects("motion", "denoising_unet", "up_blocks.1.temporal_modules.2.temporal_transformer.proj_out.bias")
    assert stage_selects("temporal", "denoising_unet", "mid_block.temporal_modules.0.temporal_transformer.norm.weight")
    assert stage_selects("joint", "denoising_unet", "up_blocks.1.motion_modules.2.temporal_transformer.proj_out.bias")
    assert stage_selects("joint", "denoising_unet", "down_blocks.0.attentions.0.proj_in.weight")
    assert not stage_selects("joint", "denoising_unet", "mid_block.temporal_modules.0.temporal_transformer.norm.weight")
    assert not any(stage_selects(s, "image_encoder", "vision_model.embeddings.patch_embedding.weight")
                   for s in ("vae", "image", "motion", "joint", "temporal"))


def test_reference_masking_drops_the_configured_fraction(tmp_path, monkeypatch):
    import training.trainer as trainer_module

    seen = []

    def spy(kv, ratio, generator=None):
        out = mask_reference_kv(kv, ratio, generator)
        seen.append((ratio, {k: v[0].shape[1] for k, v in kv.items()}, {k: v[0].shape[1] for k, v in out.items()}))
        return out

    monkeypatch.setattr(trainer_module, "mask_reference_kv", spy)
    trainer = make_trainer("image", tmp_path)
    assert trainer.cfg.loss.reference_mask_ratio == pytest.approx(0.3)  # the default
    trainer.train_step(trainer.batch([0, 1]), 0)
    ratio, before, after = seen[0]
    assert ratio == pytest.approx(0.3) and len(before) == 16
    for name, length in before.items():
        assert after[name] == round(0.7 * length)
    kv = {"a": (torch.randn(2, 200, 8), torch.randn(2, 200, 8))}
    k, v = mask_reference_kv(kv, 0.3, torch.Generator().manual_seed(0))["a"]
    assert k.shape == (2, 140, 8) and v.shape == (2, 140, 8)


# ----------------------------------------------------------------------------------------- resume

def test_killed_run_resumes_identically(tmp_path):
    straight = make_trainer("motion", tmp_path, "straight", ema_decay=0.9)
    straight.fit()
    killed = make_trainer("motion", tmp_path, "killed", ema_decay=0.9)
    killed.fit(stop_at=3)  # step 3 ran, but only step 2 was checkpointed: the kill loses step 3
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step-00000002"
    resumed = make_trainer("motion", tmp_path, "killed", ema_decay=0.9)
    resumed.fit(resume=True)
    assert resumed.step == straight.step == 4
    a, b = snapshot(straight), snapshot(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[key], resumed.ema.shadow[key]), key
    for name in ("motion_encoder",):  # BatchNorm running statistics too
        for key, value in straight.models.modules()[name].state_dict().items():
            assert torch.equal(value, resumed.models.modules()[name].state_dict()[key]), key
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("straight", "killed")]
    drop = ("sec",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in logs[0]] == \
           [{k: v for k, v in r.items() if k not in drop} for r in logs[1]]
    # outputs: a loadable bundle with the stage in its metadata, the GAN head, metrics with throughput
    meta = read_bundle_metadata(tmp_path / "straight" / "final.safetensors")
    assert meta["training_stage"] == "motion" and meta["license"].startswith("Apache-2.0")
    bundle = load_bundle(tmp_path / "straight" / "final.safetensors")
    ema_key = next(iter(straight.ema.shadow))
    component, _, param = ema_key.partition(".")
    assert torch.equal(dict(bundle.modules()[component].named_parameters())[param], straight.ema.shadow[ema_key])
    assert (tmp_path / "straight" / "gan_head.safetensors").is_file()
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["samples_per_s"] > 0 and metrics["steps"] == 4


def test_interrupted_save_is_ignored(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 5, dict(model.state_dict()), {"main": opt}, {"stage": "image"})
    (tmp_path / ".tmp-step-00000007-123").mkdir()  # a save killed half-way
    (tmp_path / "step-00000009").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step-00000005"


# ----------------------------------------------------------------------------------------- losses

def test_ssim_matches_reference_definition():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1)
    ours = float(L.ssim(x, y))
    ref = structural_similarity(x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy(), channel_axis=2,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert ours == pytest.approx(ref, abs=1e-6)
    assert float(L.ssim(x, x)) == pytest.approx(1.0)


def test_perceptual_networks_use_torchvision_layouts(tmp_path):
    from safetensors.torch import save_file

    net = L.vgg19()
    convs = [k for k in net.state_dict() if k.endswith(".weight")]
    assert len(convs) == 16 and convs[0] == "features.0.weight" and convs[-1] == "features.34.weight"
    assert net.taps == [1, 6, 11, 20, 29]  # relu1_1 .. relu5_1
    face = L.VGGFace()
    assert face.taps == [1, 6, 11, 18, 25]
    named = {}
    names = [f"conv{b}_{i}" for b, n in enumerate([2, 2, 3, 3, 3], 1) for i in range(1, n + 1)]
    for name, idx in zip(names, [i for i, m in enumerate(face.features) if isinstance(m, torch.nn.Conv2d)]):
        named[f"{name}.weight"] = torch.full_like(face.features[idx].weight, 0.5)
        named[f"{name}.bias"] = torch.zeros_like(face.features[idx].bias)
    save_file(named, str(tmp_path / "vggface.safetensors"))
    loaded = L.build_perceptual("vggface", str(tmp_path / "vggface.safetensors"), random_ok=False)
    assert torch.all(loaded.features[28].weight == 0.5) and not loaded.features[0].weight.requires_grad
    with pytest.raises(FileNotFoundError, match="vgg19_weights"):
        L.build_perceptual("vgg", None, random_ok=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert float(L.perceptual_loss(L.vgg19(8), x, x)) == 0.0


def test_release_schedule_matches_the_sampler():
    from xnemo_core.pipeline import make_scheduler

    torch.testing.assert_close(L.release_alphas_cumprod().float(), make_scheduler("ddim").alphas_cumprod.float())


def test_entry_point_runs_a_yaml_and_resumes(tmp_path):
    import yaml

    from training.train import main

    frames = tmp_path / "faces" / "clip_a"
    frames.mkdir(parents=True)
    for i, frame in enumerate(synthetic_video(8, 0).frames):
        Image.fromarray(frame[:, 8:56]).save(frames / f"{i:03d}.png")  # already a face crop (48x48)
    config = {
        "stage": "image", "output": str(tmp_path / "unused"),
        "model": {"config": micro_config().to_dict()},
        "data": {"roots": [str(tmp_path / "faces")], "resolution": 16, "detector": "full_frame",
                 "cache_dir": str(tmp_path / "cache")},
        "optim": {"batch_size": 2, "max_steps": 50},
        "log": {"checkpoint_every": 1, "sample_every": 0},
    }
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["--config", str(path), "--max-steps", "2", "--output", str(out)]) == 0
    assert main(["--config", str(path), "--max-steps", "3", "--output", str(out), "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert load_bundle(out / "final.safetensors").config.name == "micro"
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_vae_stage_calibrates_the_latent_scaling_factor(tmp_path):
    trainer = make_trainer("vae", tmp_path, max_steps=1)
    metrics = trainer.fit()
    bundle = load_bundle(tmp_path / "run" / "final.safetensors")
    factor = bundle.config.vae.scaling_factor
    assert factor == metrics["scaling_factor"] != XNeMoConfig().vae.scaling_factor
    batch = trainer.batch([0, 1, 2, 3])
    with torch.no_grad():
        z = bundle.vae.encode(batch["target"][:, :, 0]).latent_dist.mean
    assert 0.3 < float(z.std()) * factor < 3.0  # unit-scale latents for the diffusion stages


def test_full_size_starting_point_from_sd_image_variations_layout(tmp_path):
    """The sd-image-variations path, exercised on a micro-sized copy of its folder layout."""
    from diffusers import AutoencoderKLTemporalDecoder, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from training.config import ModelSpec
    from training.stages import build_initial_models

    cfg = micro_config()
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**cfg.unet.diffusers_config())
    unet.save_pretrained(tmp_path / "sdiv" / "unet")
    CLIPVisionModelWithProjection(cfg.image_encoder.transformers_config()).save_pretrained(tmp_path / "sdiv" / "image_encoder")
    AutoencoderKLTemporalDecoder(**cfg.vae.diffusers_config()).save_pretrained(tmp_path / "vae")
    spec = ModelSpec(init="sd_image_variations", path=str(tmp_path / "sdiv"), vae_dir=str(tmp_path / "vae"))
    models, license_text = build_initial_models(spec, seed=0)
    assert "OpenRAIL" in license_text
    sd = unet.state_dict()
    den, ref = models.denoising_unet.state_dict(), models.reference_unet.state_dict()
    for key, value in sd.items():
        assert torch.equal(den[key], value), key
        if not key.startswith(("conv_norm_out.", "conv_out.")):
            assert torch.equal(ref[key], value), key
    inserted = [k for k in den if ".proj_out." in k and "_modules." in k]
    assert len(inserted) == 2 * 2 * 21 and all(float(den[k].abs().max()) == 0 for k in inserted)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    plain = make_trainer("image", tmp_path, "plain")
    checkpointed = make_trainer("image", tmp_path, "ckpt", gradient_checkpointing=True)
    assert checkpointed.models.denoising_unet.gradient_checkpointing
    assert checkpointed.models.reference_unet.gradient_checkpointing
    batch = plain.batch([0, 1])
    a, b = plain.train_step(batch, 0), checkpointed.train_step(batch, 0)
    assert a["diffusion"] == pytest.approx(b["diffusion"], rel=1e-5)
    after_a, after_b = snapshot(plain), snapshot(checkpointed)
    for key in plain.trainable:
        torch.testing.assert_close(after_a[key], after_b[key], rtol=1e-4, atol=1e-6)
    # the sampler (no autograd) still clears the reference after each call
    den = checkpointed.models.denoising_unet
    with torch.no_grad():
        den.reference_context.kv = None
    assert den.reference_context.kv is None


def test_learning_rate_schedule():
    from training.config import OptimSpec
    from training.trainer import lr_factor

    f = lr_factor(OptimSpec(warmup_steps=10, max_steps=110, lr_decay="cosine", min_lr_ratio=0.1))
    assert [f(0), f(4), f(9)] == [pytest.approx(0.1), pytest.approx(0.5), pytest.approx(1.0)]
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_factor(OptimSpec(max_steps=5))(3) == 1.0


def test_motion_encoder_gets_its_own_rate_and_a_collapse_is_reported(tmp_path):
    messages = []
    trainer = Trainer(make_cfg("motion", motion_encoder_lr=1e-4), output=tmp_path / "run", videos=VIDEOS,
                      log=messages.append)
    groups = trainer.optimizer.param_groups
    encoder = {id(p) for k, p in trainer.trainable.items() if k.startswith("motion_encoder.")}
    by_rate = {g["initial_lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_rate[1e-4] == encoder and by_rate[1e-3] == {id(p) for p in trainer.trainable.values()} - encoder
    assert by_rate[2e-3]  # the GAN head keeps gan_lr

    logs = trainer.train_step(trainer.batch([0, 1]), micro_step=0)
    assert logs["motion_spread"] > 0  # two different driving frames, two different feature vectors
    assert not any("collapsed" in m for m in messages)

    # kill the encoder the way a too-high rate does (the fc input is all zero after its ReLU)
    with torch.no_grad():
        fan = trainer.models.motion_encoder.model
        fan.conv6.weight.zero_()
        fan.conv6.bias.fill_(-1.0)
    logs = trainer.train_step(trainer.batch([0, 1]), micro_step=1)
    assert logs["motion_spread"] == 0.0
    trainer._warn_if_motion_collapsed(logs)
    trainer._warn_if_motion_collapsed(logs)
    assert sum("motion encoder collapsed" in m for m in messages) == 1


def test_motion_labels_are_read_once_cached_and_skip_faceless_frames(tmp_path):
    from types import SimpleNamespace

    from training.data import BoxCache
    from training.motion_labels import BLENDSHAPES, LABEL_DIM, POSE_SCALE, attach_motion_labels, frame_labels

    video = synthetic_video(6, 0)
    calls = []

    def analyze(frame):  # a fake tracker: no face in frame 2, otherwise the frame index as the expression
        calls.append(frame)
        if len(calls) == 3:
            return None
        return SimpleNamespace(blendshapes=np.full(BLENDSHAPES, len(calls) / 10), pose=np.array([30.0, -15.0, 0.0]))

    labels = frame_labels(video.frames, analyze)
    assert labels.shape == (6, LABEL_DIM) and np.isnan(labels[2]).all() and not np.isnan(np.delete(labels, 2, 0)).any()
    assert labels[0, 0] == pytest.approx(0.1) and labels[3, 0] == pytest.approx(0.4)
    assert labels[0, BLENDSHAPES:].tolist() == pytest.approx([30 / POSE_SCALE, -15 / POSE_SCALE, 0.0])

    source_file = tmp_path / "clip.mp4"
    source_file.write_bytes(b"x")  # the cache key reads the file's size and time
    video = dataclasses.replace(video, source=MediaSource(str(source_file), "video"))
    cache, messages = BoxCache(tmp_path / "cache"), []
    calls.clear()
    attach_motion_labels([video], cache, 25.0, analyze=analyze, log=messages.append)
    assert len(calls) == 6 and np.array_equal(np.isnan(video.motion_labels[:, 0]), np.isnan(labels[:, 0]))
    assert "5/6 frames with a face" in messages[0]
    again = dataclasses.replace(video, motion_labels=None)
    attach_motion_labels([again], cache, 25.0, analyze=lambda frame: pytest.fail("labels are cached"))
    np.testing.assert_array_equal(again.motion_labels, video.motion_labels)
    with pytest.raises(ValueError, match="no face in any frame"):
        attach_motion_labels([dataclasses.replace(video, frames=video.frames[:3], motion_labels=None)],
                             BoxCache(tmp_path / "other"), 25.0, analyze=lambda frame: None)


def test_motion_probe_standardises_labels_and_ignores_faceless_rows():
    from training.motion_labels import LABEL_DIM, MotionProbe

    rng = np.random.default_rng(0)
    labels = rng.normal(3.0, 0.01, (40, LABEL_DIM)).astype(np.float32)  # tiny spread around a large mean
    labels[5] = np.nan
    probe = MotionProbe(8)
    probe.fit_label_scale(labels)
    known = np.delete(labels, 5, 0)
    assert torch.allclose(probe.label_mean, torch.from_numpy(known.mean(0)))
    with torch.no_grad():  # a read-out that always answers the mean (0 in standard units) scores 1
        probe.head.weight.zero_()
        probe.head.bias.zero_()
        assert float(probe.loss(torch.zeros(40, 8), torch.from_numpy(labels))) == pytest.approx(1.0, rel=1e-3)
        only_faceless = torch.full((3, LABEL_DIM), float("nan"))
        assert float(probe.loss(torch.zeros(3, 8), only_faceless)) == 0.0
    with pytest.raises(ValueError, match="two training frames"):
        probe.fit_label_scale(labels[4:6])


def test_stage2_can_take_the_motion_encoder_of_another_run(tmp_path):
    source = make_trainer("motion_init", tmp_path, "init")
    source.train_step(source.batch([0, 1, 2, 3]), micro_step=0)
    source.export(tmp_path / "init.safetensors")
    cfg = make_cfg("motion")
    cfg.model.motion_encoder_from = str(tmp_path / "init.safetensors")
    trainer = Trainer(cfg, output=tmp_path / "run", videos=VIDEOS, log=lambda msg: None)
    trained = source.models.motion_encoder.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in trainer.models.motion_encoder.state_dict().items())
    plain = make_trainer("motion", tmp_path, "plain")
    assert not torch.equal(plain.models.motion_encoder.final_proj.weight, trained["final_proj.weight"])

    other = make_cfg("motion")
    other.model.config["motion_encoder"]["stem_channels"] = 16
    other.model.motion_encoder_from = str(tmp_path / "init.safetensors")
    with pytest.raises(ConfigError, match="motion encoder config differs"):
        Trainer(other, output=tmp_path / "bad", videos=VIDEOS, log=lambda msg: None)


def micro_sampling():
    """Seeded random micro models and a 2-step sampler setting, for the evaluation tests."""
    from xnemo_core.config import SamplingConfig
    from xnemo_core.models.stack import build_models

    torch.manual_seed(0)
    settings = SamplingConfig(steps=2, guidance_scale=1.0, context_frames=4, context_overlap=2, closed_loop=False)
    return build_models(micro_config()), settings


def test_self_reenactment_evaluation_scores_model_and_baseline():
    from training.evaluate import evaluate, side_by_side

    models, settings = micro_sampling()
    video = synthetic_video(12, 0, holdout=8)
    summary, results = evaluate(models, [video], 32, settings, max_frames=4, decode_chunk=4)
    (result,) = results
    assert result.prediction.shape == result.target.shape == (4, 3, 32, 32)
    target = result.target
    repeat = result.reference[None].expand_as(target)
    seg = summary["segments"]["synthetic0.mp4"]
    assert seg["repeat_reference_l1"] == pytest.approx(float((repeat - target).abs().mean()), abs=1e-5)
    assert seg["repeat_reference_ssim"] == pytest.approx(float(L.ssim(repeat, target)), abs=1e-5)
    assert 0 < seg["model_l1"] < 1 and summary["mean"]["frames"] == 4
    picture = side_by_side(results, columns=3, scale=1)
    assert picture.shape == (96, 96, 3) and picture.dtype == np.uint8


def test_copy_check_drives_each_reference_with_itself():
    from training.evaluate import evaluate

    models, settings = micro_sampling()
    video = synthetic_video(20, 0, holdout=12)
    summary, (result,) = evaluate(models, [video], 32, settings, max_frames=10, decode_chunk=4, copy=True)
    assert result.target.shape[0] == 8  # one context window of copies, not all 10 drivers
    torch.testing.assert_close(result.target, result.reference[None].expand_as(result.target))
    assert summary["mean"]["repeat_reference_l1"] == 0.0 and summary["mean"]["repeat_reference_ssim"] == 1.0
    assert 0 < summary["mean"]["model_l1"] < 1


def test_headroom_reference_points_reduce_to_repeat_and_round_trip():
    from training.headroom import box_warped_reference, headroom, latent_interpolations
    from xnemo_core.models.stack import build_models
    from xnemo_core.pipeline import XNeMoPipeline

    video = synthetic_video(20, 0, holdout=10)  # the cartoon head moves across the frame
    sample = make_sample(video, 10, [11, 15, 19], 32, 32)
    target = (sample["target"].permute(1, 0, 2, 3) + 1) / 2
    reference = (sample["reference"] + 1) / 2
    # a frame whose face box is the reference's gets the reference crop itself
    torch.testing.assert_close(box_warped_reference(video, 10, [10], 32)[0], reference)
    warped = box_warped_reference(video, 10, [11, 15, 19], 32)
    assert (warped - target).abs().mean() < 0.6 * (reference[None] - target).abs().mean()  # it tracks the head
    torch.manual_seed(0)
    models = build_models(micro_config())
    decoded = latent_interpolations(models, sample["reference"], sample["target"].permute(1, 0, 2, 3), alphas=(0.0, 1.0))
    pipe = XNeMoPipeline(models)
    round_trip = pipe.decode(pipe.encode_latents(sample["target"].permute(1, 0, 2, 3)).permute(1, 0, 2, 3)[None],
                             chunk=8)[0].permute(1, 0, 2, 3)
    torch.testing.assert_close(decoded[1.0], round_trip)
    z_ref = pipe.encode_latents(sample["reference"][None]).permute(1, 0, 2, 3)[None].expand(1, -1, 3, -1, -1)
    torch.testing.assert_close(decoded[0.0], pipe.decode(z_ref.contiguous(), chunk=8)[0].permute(1, 0, 2, 3))
    scores = headroom(None, [video], 32, max_frames=9)
    repeat = [float((reference[None] - t).abs().mean()) for t in
              (make_sample(video, 10, list(range(11, 20)), 32, 32)["target"].permute(1, 0, 2, 3) + 1) / 2]
    assert scores["frames"] == 9 and scores["repeat"][0] == pytest.approx(np.mean(repeat), abs=1e-4)
    assert scores["box_warp"][0] < scores["repeat"][0] and "latent_0.0" not in scores
    assert set(headroom(models, [video], 32, max_frames=4)) >= {"latent_0.1", "blur_0.5", "box_warp_smoothed"}


def test_static_motion_check_tells_a_motion_blind_model_apart():
    from training.evaluate import evaluate
    from training.stages import zero_init_inserted_modules

    models, settings = micro_sampling()
    video = synthetic_video(12, 0, holdout=8)
    summary, (result,) = evaluate(models, [video], 32, settings, max_frames=4, decode_chunk=4, static_motion=True)
    assert result.metrics["motion_effect"] > 1e-6  # random motion attention: the driving frames matter
    assert 0 < summary["mean"]["static_motion_l1"] < 1 and "static_motion_ssim" in summary["mean"]
    zero_init_inserted_modules(models.denoising_unet)  # motion (and temporal) attention add nothing
    summary, (result,) = evaluate(models, [video], 32, settings, max_frames=4, decode_chunk=4, static_motion=True)
    assert result.metrics["motion_effect"] == 0.0
    assert summary["mean"]["static_motion_l1"] == summary["mean"]["model_l1"]


def test_x0_from_prediction_inverts_both_targets():
    from training.diagnose import x0_from_prediction

    torch.manual_seed(0)
    x0, noise, a = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor(0.3)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(x0_from_prediction(noise, noisy, a, "epsilon"), x0, atol=1e-5)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(x0_from_prediction(v, noisy, a, "v_prediction"), x0, atol=1e-5)


def test_pathway_check_sees_ignored_motion_and_scores_the_reference_latent():
    from training.diagnose import CONDITIONS, pair_list, pathway_errors
    from training.stages import zero_init_inserted_modules
    from xnemo_core.models.stack import build_models

    torch.manual_seed(0)
    models = build_models(micro_config()).eval()
    video = synthetic_video(12, 0, holdout=8)
    pairs = pair_list([video], "held_out", gaps=(2, 5))
    assert [(r, d) for _, r, d in pairs] == [(4, 6), (4, 9)]
    errors = pathway_errors(models, pairs, timesteps=(100, 900), resolution=32)
    assert set(errors) == {100, 900} and all(set(row) == set(CONDITIONS) for row in errors.values())
    assert all(np.isfinite(v) and v > 0 for row in errors.values() for v in row.values())
    assert errors[100]["own_motion"] != errors[100]["full"]  # random motion attention reacts to motion
    assert errors[100]["reference_latent"] == errors[900]["reference_latent"]  # no noise involved
    zero_init_inserted_modules(models.denoising_unet)
    blind = pathway_errors(models, pairs, timesteps=(100, 900), resolution=32)
    assert all(row["own_motion"] == row["full"] for row in blind.values())
    with pytest.raises(ValueError, match="no \\(reference, driving\\) pairs"):
        pathway_errors(models, [], timesteps=(100,))
    twice = pathway_errors(models, pairs, timesteps=(100,), resolution=32, draws=2)
    assert twice[100]["reference_latent"] == pytest.approx(errors[100]["reference_latent"])  # a mean, not a sum
    assert twice[100]["full"] != errors[100]["full"]  # a second noise draw enters the mean
    # a denoiser that predicts no noise returns its input: at t = 0 that is the noised target in the
    # default regime, but the reference under a reference start (latents scaled up so that the
    # reference-target gap dwarfs the noise at t = 0)
    models.denoising_unet.forward = lambda sample, *args, **kwargs: torch.zeros_like(sample)
    vae = models.config.vae
    models.config = dataclasses.replace(models.config, vae=dataclasses.replace(vae, scaling_factor=vae.scaling_factor * 100))
    plain = pathway_errors(models, pairs, timesteps=(0,), resolution=32)[0]
    started = pathway_errors(models, pairs, timesteps=(0,), resolution=32, reference_start=0)[0]
    assert plain["full"] < 1e-2 * plain["reference_latent"]
    assert started["full"] == pytest.approx(started["reference_latent"], rel=0.05)
    with pytest.raises(ValueError, match="must be <= it"):
        pathway_errors(models, pairs, timesteps=(100,), resolution=32, reference_start=50)


def test_copy_pairs_drive_the_reference_with_itself_at_the_stated_rate():
    video = synthetic_video(60, 0, holdout=10)
    plain = FaceSampleDataset([video], DataSpec(resolution=16, max_gap=20), AugmentSpec(enabled=False), 32, seed=3)
    copy = FaceSampleDataset([video], DataSpec(resolution=16, max_gap=20, same_frame_prob=0.4),
                             AugmentSpec(enabled=False), 32, seed=3)
    picks = [copy.choose(i)[1:3] for i in range(2000)]
    same = sum(frames == [ref] for ref, frames in picks) / len(picks)
    natural = sum(frames == [ref] for ref, frames in (plain.choose(i)[1:3] for i in range(400))) / 400
    assert natural < 0.05 and 0.38 < same < 0.46  # 0.4 on top of the rare natural gap-0 pair
    assert all(ref < 50 and frames[0] < 50 and abs(frames[0] - ref) <= 20 for ref, frames in picks)
    item = copy[next(i for i, (r, f) in enumerate(picks) if f == [r])]
    torch.testing.assert_close(item["target"][:, 0], item["reference"])  # the target is the reference frame
    # off (the default) draws nothing extra, so configs without it sample exactly as before
    assert [plain.choose(i)[1:3] for i in range(20)] == [
        FaceSampleDataset([video], DataSpec(resolution=16, max_gap=20, same_frame_prob=0.0),
                          AugmentSpec(enabled=False), 32, seed=3).choose(i)[1:3] for i in range(20)]
    with pytest.raises(ConfigError, match="same_frame_prob"):
        config_from_dict({"stage": "joint", "data": {"same_frame_prob": 1.5}})


def test_random_pairs_stay_in_their_split_and_keep_their_gap():
    from training.diagnose import random_pairs

    video = synthetic_video(40, 0, holdout=10)  # trained on frames 0-29, held out 30-39
    pairs = random_pairs([video], "training", 12, min_gap=8)
    assert len(pairs) == 12 and len({(r, d) for _, r, d in pairs}) > 3
    assert all(r < 30 and d < 30 and abs(r - d) >= 8 for _, r, d in pairs)
    held = random_pairs([video], "held_out", 5, min_gap=4)
    assert all(30 <= r < 40 and 30 <= d < 40 and abs(r - d) >= 4 for _, r, d in held)
    assert random_pairs([video], "held_out", 5, min_gap=10) == []  # a 10-frame tail has no pair 10 apart


def test_training_segments_mirror_the_held_out_ones_without_touching_them():
    from training.evaluate import held_out_segments, training_segments

    video = synthetic_video(30, 0, holdout=8)
    assert held_out_segments([video]) == [(video, 22, 30)]
    assert training_segments([video], max_frames=48) == [(video, 14, 22)]  # same length, ends where held-out starts
    assert training_segments([video], max_frames=4) == [(video, 17, 22)]  # reference + 4 drivers
    assert training_segments([synthetic_video(12, 0, holdout=8)]) == []  # too few trained-on frames


def test_x0_weighting_scores_high_noise_steps_by_their_x0_error(tmp_path):
    from training.losses import release_alphas_cumprod

    cfg = make_cfg("image")
    cfg.loss.x0_weighting, cfg.loss.max_x0_weight = True, 50.0
    trainer = Trainer(cfg, output=tmp_path / "run", videos=VIDEOS, log=lambda msg: None)
    batch = trainer.batch([0, 1])
    seen = {}
    original = trainer.models.denoising_unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen["t"] = timestep.clone()
        return original(sample, timestep, *args, **kwargs)

    trainer.models.denoising_unet.forward = spy
    with torch.no_grad():
        out = trainer.module(batch, seed=123)
    alpha = release_alphas_cumprod().float()[seen["t"]]
    weight = ((1 - alpha) / alpha).clamp(1.0, 50.0)
    assert float(weight.max()) > 1.0  # this draw has a noisy step
    # loss = mean_b(w_b * mse_b) lies between min(w) and max(w) times the plain ε-MSE
    assert float(weight.min()) * float(out["diffusion"]) * 0.999 <= float(out["loss"])
    assert float(out["loss"]) <= float(weight.max()) * float(out["diffusion"]) * 1.001


def test_v_prediction_loss_targets_v_and_the_bundle_says_so(tmp_path):
    """model.prediction_type v_prediction: the loss is the MSE to v = √ᾱ·ε − √(1−ᾱ)·x0, and the
    exported stack carries the type, so the sampler picks the matching scheduler."""
    from training.losses import release_alphas_cumprod

    cfg = make_cfg("image")
    cfg.model.prediction_type = "v_prediction"
    trainer = Trainer(cfg, output=tmp_path / "run", videos=VIDEOS, log=lambda msg: None)
    assert trainer.models.config.unet.prediction_type == "v_prediction"
    batch = trainer.batch([0, 1])
    seen = {}

    def zero(sample, timestep, *args, **kwargs):
        seen["x"], seen["t"] = sample.clone(), timestep.clone()
        return torch.zeros_like(sample)

    trainer.models.denoising_unet.forward = zero
    with torch.no_grad():
        out = trainer.module(batch, seed=321)
        x0 = trainer.module.encode_target(batch["target"], torch.Generator().manual_seed(321))
    alpha = release_alphas_cumprod().float()[seen["t"]].view(-1, 1, 1, 1, 1)
    noise = (seen["x"] - alpha.sqrt() * x0) / (1 - alpha).sqrt()
    v = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    expected = v.pow(2).flatten(1).mean(1).mean()
    assert abs(float(out["diffusion"]) - float(expected)) < 1e-4 * float(expected)
    assert abs(float(out["diffusion"]) - float(noise.pow(2).mean())) > 1e-3  # not the ε target
    trainer.export(tmp_path / "v.safetensors")
    assert load_bundle(tmp_path / "v.safetensors").config.unet.prediction_type == "v_prediction"


def test_reference_start_noise_is_what_a_reference_started_ddim_sample_passes_through():
    """Started from the reference at t0, DDIM with a perfect denoiser visits √ᾱ·x0 + √(1−ᾱ)·ε' at every
    later step (ε' from losses.reference_start_noise) and ends at x0: what reference-start training shows."""
    from xnemo_core.pipeline import make_scheduler, schedule_timesteps

    g = torch.Generator().manual_seed(0)
    x0, ref, eps = (torch.randn(1, 4, 1, 6, 6, generator=g) for _ in range(3))
    scheduler = make_scheduler("ddim", "v_prediction")
    timesteps = schedule_timesteps(scheduler, 10, denoise=0.4)
    alphas = scheduler.alphas_cumprod.double()
    t0 = int(timesteps[0])
    shifted = L.reference_start_noise(eps.double(), x0.double(), ref.double(), alphas[t0])
    latents = scheduler.add_noise(ref, eps, timesteps[:1])
    for t in timesteps:
        a = alphas[int(t)]
        torch.testing.assert_close(latents.double(), a.sqrt() * x0 + (1 - a).sqrt() * shifted, atol=1e-5, rtol=1e-5)
        implied = (latents.double() - a.sqrt() * x0) / (1 - a).sqrt()
        v = (a.sqrt() * implied - (1 - a).sqrt() * x0).float()  # the perfect denoiser's output
        latents = scheduler.step(v, t, latents).prev_sample
    torch.testing.assert_close(latents, x0, atol=2e-4, rtol=1e-4)


def test_reference_start_training_noises_the_target_as_a_reference_start(tmp_path):
    """loss.reference_start_prob 1: every sample gets t <= reference_start_t and the noise
    ε + √SNR(t0)·(z_ref − x0), where ε and the rest of the random stream are those of the plain loss."""
    from training.losses import release_alphas_cumprod

    seen = []

    def run(prob):
        cfg = make_cfg("image")
        cfg.loss.reference_start_prob, cfg.loss.reference_start_t = prob, 40
        trainer = Trainer(cfg, output=tmp_path / f"run{prob}", videos=VIDEOS, log=lambda msg: None)
        torch.manual_seed(0)
        trainer.models.denoising_unet.forward = lambda sample, timestep, *a, **k: (
            seen.append((sample.clone(), timestep.clone())) or torch.zeros_like(sample))
        batch = trainer.batch([0, 1])
        with torch.no_grad():
            trainer.module(batch, seed=5)
            x0 = trainer.module.encode_target(batch["target"], torch.Generator().manual_seed(5))
            ref = trainer.module.vae.encode(batch["reference"]).latent_dist.mean * trainer.module.scaling_factor
        return x0, ref[:, :, None]

    x0, ref = run(0.0)
    x0_again, _ = run(1.0)
    torch.testing.assert_close(x0, x0_again)
    (plain_x, plain_t), (start_x, start_t) = seen
    alphas = release_alphas_cumprod().float()
    assert int(start_t.max()) <= 40 and not torch.equal(plain_t, start_t)

    def noise_of(x, t):
        a = alphas[t].view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    snr0 = alphas[40] / (1 - alphas[40])
    expected = noise_of(plain_x, plain_t) + snr0.sqrt() * (ref - x0)
    torch.testing.assert_close(noise_of(start_x, start_t), expected, atol=2e-3, rtol=2e-3)
    with pytest.raises(ConfigError, match="reference_start_t"):
        config_from_dict({"stage": "image", "loss": {"reference_start_t": 1000}})


def test_reference_unet_can_start_as_a_copy_of_the_denoiser(tmp_path):
    cfg = make_cfg("image")
    cfg.model.reference_from_denoiser = True
    trainer = Trainer(cfg, output=tmp_path / "run", videos=VIDEOS, log=lambda msg: None)
    den = trainer.models.denoising_unet.state_dict()
    ref = trainer.models.reference_unet.state_dict()
    assert ref and all(torch.equal(v, den[k]) for k, v in ref.items())
    plain = Trainer(make_cfg("image"), output=tmp_path / "plain", videos=VIDEOS, log=lambda msg: None)
    assert not all(torch.equal(v, plain.models.denoising_unet.state_dict()[k])
                   for k, v in plain.models.reference_unet.state_dict().items())


def test_demo_recipe_chains_its_runs_and_takes_the_fine_tuned_vae(micro_models):
    import dataclasses

    from training.config import load_config
    from training.demo import CONFIGS, STAGES, VAE_FROM, start_from
    from training.stages import take_component
    from xnemo_core.models.stack import build_models

    starts = {s: load_config(CONFIGS / f"demo_{s}.yaml").model.path for s in STAGES}
    assert starts["vae"] is None  # from scratch
    assert start_from(starts["vae_decoder"], Path("out")) == Path("out/vae/final.safetensors")
    assert start_from(starts["stage1"], Path("out")) == Path("out/vae/final.safetensors")  # same latents
    assert start_from(starts["stage2"], Path("out")) == Path("out/stage1/final.safetensors")
    assert STAGES.index("motion_init") < STAGES.index("stage2")
    assert start_from(starts["stage3"], Path("out")) == Path("out/stage2/final.safetensors")
    joint = load_config(CONFIGS / "demo_joint.yaml")  # the optional stage 2b experiment, not in the recipe
    assert joint.stage == "joint" and start_from(joint.model.path, Path("out")) == Path("out/stage2/final.safetensors")
    paired = load_config(CONFIGS / "demo_joint_paired.yaml")  # the same with paired appearance augmentation
    assert paired.model.path == joint.model.path and paired.optim == joint.optim and paired.data == joint.data
    assert paired.augment.pair_flip == 0.5 and joint.augment.pair_flip == 0.0
    refstart = load_config(CONFIGS / "demo_joint_refstart.yaml")  # + reference-start training
    assert refstart.augment == paired.augment and refstart.optim == paired.optim and refstart.data == paired.data
    assert dataclasses.replace(refstart.loss, reference_start_prob=0.0, reference_start_t=300) == paired.loss
    assert refstart.loss.reference_start_prob == 0.5 and paired.loss.reference_start_prob == 0.0
    assert refstart.model.path == paired.model.path
    encoder_from = load_config(CONFIGS / "demo_stage2.yaml").model.motion_encoder_from
    assert start_from(encoder_from, Path("out")) == Path("out/motion_init/final.safetensors")
    assert VAE_FROM == "vae_decoder" and STAGES.index(VAE_FROM) < STAGES.index("stage3")

    torch.manual_seed(1)
    donor = build_models(micro_models.config)
    target = build_models(micro_models.config)
    take_component(target, donor, "vae", "the vae_decoder run")
    assert all(torch.equal(v, donor.vae.state_dict()[k]) for k, v in target.vae.state_dict().items())
    other = dataclasses.replace(micro_models.config, vae=dataclasses.replace(micro_models.config.vae,
                                                                             scaling_factor=0.5))
    with pytest.raises(ValueError, match="VAE config differs"):
        take_component(build_models(other), donor, "vae", "the vae_decoder run")
