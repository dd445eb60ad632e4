"""The sampler: windows, averaging, determinism, options, reference masking and the CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xnemo_core.config import SamplingConfig
from xnemo_core.errors import Cancelled, InvalidInputError
from xnemo_core.models.reference import mask_reference_kv
from xnemo_core.pipeline import XNeMoPipeline, gaussian_blur, make_scheduler, schedule_timesteps
from xnemo_core.windows import context_windows, window_weights


# ------------------------------------------------------------------ context windows
@pytest.mark.parametrize("frames,size,overlap", [(6, 4, 2), (100, 24, 4), (50, 24, 0), (25, 24, 4), (7, 24, 4)])
@pytest.mark.parametrize("closed", [True, False])
def test_windows_cover_every_frame(frames, size, overlap, closed):
    for offset in range(size):
        windows = context_windows(frames, size, overlap, offset, closed)
        counts = window_weights(windows, frames)
        assert bool((counts >= 1).all())
        assert all(len(w) == min(size, frames) for w in windows)
        assert all(len(set(w)) == len(w) for w in windows)  # no frame twice in one window
        if not closed:
            assert all(w == list(range(w[0], w[0] + len(w))) for w in windows)  # never wraps


def test_closed_loop_windows_match_the_release_formula():
    # F=6, 4 frames, overlap 2, offset 3: starts 0,2,4 -> frames (j+e+3) mod 6
    assert context_windows(6, 4, 2, 3) == [[3, 4, 5, 0], [5, 0, 1, 2], [1, 2, 3, 4]]
    assert context_windows(5, 24, 4, 17) == [[0, 1, 2, 3, 4]]  # short clip: one window, offset ignored


def test_window_weights_are_the_per_frame_cover_counts():
    windows = [[0, 1, 2], [2, 3, 4], [4, 0, 1]]
    assert window_weights(windows, 5).tolist() == [2, 2, 2, 1, 2]
    with pytest.raises(RuntimeError, match="uncovered"):
        window_weights([[0, 1]], 3)
    with pytest.raises(ValueError):
        context_windows(10, 4, 4)


def test_blur_is_normalised_and_reflects():
    x = torch.ones(1, 4, 8, 8)
    assert torch.allclose(gaussian_blur(x), x, atol=1e-6)
    y = torch.zeros(1, 1, 16, 16)
    y[0, 0, 8, 8] = 1
    blurred = gaussian_blur(y)
    assert abs(blurred.sum().item() - 1.0) < 1e-5 and blurred.max() < 0.05


# ------------------------------------------------------------------ sampling on a micro model
def _prepared(models, size=128):
    pipe = XNeMoPipeline(models)
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    clip = torch.randn(1, 3, models.config.image_encoder.image_size, models.config.image_encoder.image_size, generator=g)
    crop = models.config.motion_encoder.image_size
    prepared = pipe.prepare_reference(ref, clip, torch.rand(1, 3, crop, crop, generator=g) * 2 - 1)
    return pipe, prepared


def _tokens(models, frames, seed=2):
    cfg = models.config.unet
    return torch.randn(frames, cfg.motion_tokens, cfg.motion_token_dim, generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_output_different_seed_differs(micro_models):
    pipe, prepared = _prepared(micro_models)
    tokens = _tokens(micro_models, 5)
    s = SamplingConfig(steps=2, context_frames=3, context_overlap=1, seed=7)
    a = pipe.sample(prepared, tokens, s, decode=False)
    b = pipe.sample(prepared, tokens, s, decode=False)
    c = pipe.sample(prepared, tokens, SamplingConfig(steps=2, context_frames=3, context_overlap=1, seed=8), decode=False)
    assert torch.equal(a.latents, b.latents) and a.offsets == b.offsets
    assert not torch.allclose(a.latents, c.latents)


def test_window_average_equals_single_window_when_windows_are_identical(micro_models):
    """With F <= context there is one window; averaging over windows must reduce to it exactly."""
    pipe, prepared = _prepared(micro_models)
    tokens = _tokens(micro_models, 3)
    noise = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    one = pipe.sample(prepared, tokens, SamplingConfig(steps=1, context_frames=3, context_overlap=1), noise=noise,
                      decode=False)
    # closed-loop windows of 2 with overlap 1 over 3 frames: each frame is covered exactly twice
    two = pipe.sample(prepared, tokens, SamplingConfig(steps=1, context_frames=2, context_overlap=1), noise=noise,
                      window_offsets=[0], decode=False)
    assert two.windows[0] == [[0, 1], [1, 2], [2, 0]]
    assert one.latents.shape == two.latents.shape
    assert not torch.allclose(one.latents, two.latents)  # different temporal context -> different eps


def test_per_frame_average_uses_cover_counts(micro_models, monkeypatch):
    """Stub the denoiser with a per-frame constant; the averaged eps must equal that constant."""
    pipe, prepared = _prepared(micro_models)
    frames = 5
    seen = []

    def fake_unet(x, t, clip, motion, kv, rows):
        seen.append(x.shape[2])
        return torch.ones_like(x) * 0.5

    monkeypatch.setattr(micro_models, "denoising_unet", _Callable(fake_unet, micro_models.denoising_unet))
    noise = torch.zeros(1, 4, frames, 16, 16)
    s = SamplingConfig(steps=1, guidance_scale=1.0, context_frames=3, context_overlap=1, init="noise")
    out = pipe.sample(prepared, _tokens(micro_models, frames), s, noise=noise, window_offsets=[0], decode=False)
    # DDIM from zero latents with eps == 0.5 everywhere: every frame gets the identical update
    assert torch.allclose(out.latents, out.latents[:, :, :1].expand_as(out.latents))
    assert seen == [3, 3, 3]  # starts 0, 2, 4 -> three windows of 3


class _Callable:
    def __init__(self, fn, like):
        self.fn, self.like = fn, like

    def __call__(self, *args):
        return self.fn(*args)

    def __getattr__(self, name):
        return getattr(self.like, name)


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler"])
def test_other_schedulers_and_noise_start_run(micro_models, scheduler):
    pipe, prepared = _prepared(micro_models)
    s = SamplingConfig(steps=2, scheduler=scheduler, init="noise", closed_loop=False, context_frames=2,
                       context_overlap=1)
    out = pipe.sample(prepared, _tokens(micro_models, 3), s)
    assert out.video.shape == (1, 3, 3, 128, 128)
    assert torch.isfinite(out.video).all() and out.video.min() >= 0 and out.video.max() <= 1


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler"])
def test_denoise_runs_the_tail_of_a_longer_schedule(scheduler):
    """KSampler semantics: denoise 0.5 with 10 steps = the last 10 timesteps of a 20-step schedule."""
    full = make_scheduler(scheduler)
    full.set_timesteps(20)
    tail = schedule_timesteps(make_scheduler(scheduler), 10, 0.5)
    assert torch.equal(tail, full.timesteps[-10:])
    assert torch.equal(schedule_timesteps(make_scheduler(scheduler), 10, 1.0), make_scheduler_steps(scheduler, 10))


def make_scheduler_steps(name, steps):
    scheduler = make_scheduler(name)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler"])
def test_denoise_starts_from_the_noised_sharp_reference(micro_models, scheduler, monkeypatch):
    """init 'reference' + denoise 0.25: the denoiser first sees the sharp reference latent noised to the
    first timestep of the tail (not the blurred one, not pure noise), and only the tail's timesteps."""
    pipe, prepared = _prepared(micro_models)
    seen = []

    def record(x, t, *args):
        seen.append((int(t), x[:1].clone()))
        return torch.zeros_like(x)

    monkeypatch.setattr(micro_models, "denoising_unet", _Callable(record, micro_models.denoising_unet))
    frames = 2
    noise = torch.randn(1, 4, frames, 16, 16, generator=torch.Generator().manual_seed(4))
    pipe.sample(prepared, _tokens(micro_models, frames), noise=noise, decode=False,
                settings=SamplingConfig(steps=3, scheduler=scheduler, init="reference", denoise=0.25,
                                        guidance_scale=1.0))
    expected_steps = schedule_timesteps(make_scheduler(scheduler), 3, 0.25)
    assert [t for t, _ in seen] == [int(t) for t in expected_steps]
    scheduler_ = make_scheduler(scheduler)
    tail = schedule_timesteps(scheduler_, 3, 0.25)
    base = prepared.latents.float()[:, :, None].expand(1, -1, frames, -1, -1)
    start = scheduler_.scale_model_input(scheduler_.add_noise(base, noise, tail[:1]), tail[0])
    torch.testing.assert_close(seen[0][1], start)
    blurred = gaussian_blur(prepared.latents.float())[:, :, None].expand_as(base)
    assert not torch.allclose(seen[0][1], scheduler_.scale_model_input(scheduler_.add_noise(blurred, noise, tail[:1]),
                                                                       tail[0]))


def test_v_prediction_models_get_a_v_scheduler(micro_models, monkeypatch):
    """A v-prediction denoiser whose output is the exact v of a known x0 lands on that x0 in one DDIM step."""
    import dataclasses

    pipe, prepared = _prepared(micro_models)
    config = micro_models.config
    monkeypatch.setattr(micro_models, "config",
                        dataclasses.replace(config, unet=dataclasses.replace(config.unet,
                                                                             prediction_type="v_prediction")))
    frames = 2
    target = torch.randn(1, 4, frames, 16, 16, generator=torch.Generator().manual_seed(5))
    alphas = make_scheduler("ddim", "v_prediction").alphas_cumprod

    def exact_v(x, t, *args):
        a = alphas[int(t)]
        noise = (x - a.sqrt() * target) / (1 - a).sqrt()
        return a.sqrt() * noise - (1 - a).sqrt() * target

    monkeypatch.setattr(micro_models, "denoising_unet", _Callable(exact_v, micro_models.denoising_unet))
    out = pipe.sample(prepared, _tokens(micro_models, frames),
                      SamplingConfig(steps=1, guidance_scale=1.0, init="noise"), decode=False)
    torch.testing.assert_close(out.latents, target, atol=1e-4, rtol=1e-4)
    with pytest.raises(InvalidInputError, match="prediction type"):
        make_scheduler("ddim", "sample")


def test_progress_preview_and_cancel(micro_models):
    pipe, prepared = _prepared(micro_models)
    calls = []
    pipe.sample(prepared, _tokens(micro_models, 2), SamplingConfig(steps=3), decode=False,
                progress=lambda step, total, preview: calls.append((step, total, preview.shape, preview.dtype)))
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    assert calls[0][2] == (16, 16, 3) and calls[0][3] == np.uint8
    state = {"n": 0}

    def cancel():
        state["n"] += 1
        return state["n"] > 1

    with pytest.raises(Cancelled, match="step"):
        pipe.sample(prepared, _tokens(micro_models, 2), SamplingConfig(steps=3), cancel=cancel)


def test_bad_settings_are_clear(micro_models):
    pipe, prepared = _prepared(micro_models)
    with pytest.raises(InvalidInputError, match="steps"):
        pipe.sample(prepared, _tokens(micro_models, 2), SamplingConfig(steps=0))
    with pytest.raises(InvalidInputError, match="scheduler"):
        pipe.sample(prepared, _tokens(micro_models, 2), SamplingConfig(steps=1, scheduler="plms"))
    with pytest.raises(InvalidInputError, match="context_frames"):
        pipe.sample(prepared, _tokens(micro_models, 40), SamplingConfig(steps=1, context_frames=33))
    with pytest.raises(InvalidInputError, match="denoise must be"):
        pipe.sample(prepared, _tokens(micro_models, 2), SamplingConfig(steps=1, denoise=0.0))
    with pytest.raises(InvalidInputError, match="init latent"):
        pipe.sample(prepared, _tokens(micro_models, 2), SamplingConfig(steps=1, init="noise", denoise=0.5))


def test_uncond_rows_read_no_reference(micro_models):
    """Row 0 (reference row -1) must equal a call without any reference; row 1 must differ."""
    unet = micro_models.denoising_unet
    pipe, prepared = _prepared(micro_models)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 2, 16, 16, generator=g)
    clip = torch.randn(2, 1, micro_models.config.unet.cross_attention_dim, generator=g)
    motion = torch.randn(2, 2, 32, 16, generator=g)
    with torch.no_grad():
        mixed = unet(x, 300, clip, motion, prepared.reference_kv, torch.tensor([-1, 0]))
        plain = unet(x[:1], 300, clip[:1], motion[:1])
        with_ref = unet(x[1:], 300, clip[1:], motion[1:], prepared.reference_kv)
    assert torch.allclose(mixed[:1], plain, atol=1e-5)
    assert torch.allclose(mixed[1:], with_ref, atol=1e-5)
    assert not torch.allclose(mixed[1:], unet(x[1:], 300, clip[1:], motion[1:]), atol=1e-3)


def test_reference_masking_drops_the_stated_fraction():
    k = torch.arange(2 * 100 * 3, dtype=torch.float32).reshape(2, 100, 3)
    kv = {"block": (k, k + 0.5)}
    masked = mask_reference_kv(kv, 0.3, torch.Generator().manual_seed(0))
    mk, mv = masked["block"]
    assert mk.shape == (2, 70, 3)
    assert torch.equal(mv, mk + 0.5)  # the same tokens dropped from K and V
    for row in range(2):  # kept tokens are distinct originals, in order
        idx = (mk[row, :, 0] - k[row, 0, 0]) / 3
        assert torch.equal(idx, idx.round()) and bool((idx[1:] > idx[:-1]).all())
    assert mask_reference_kv(kv, 0.0) is kv
    with pytest.raises(ValueError):
        mask_reference_kv(kv, 1.0)


# ------------------------------------------------------------------ CLI end to end
@pytest.mark.slow
def test_animate_cli_writes_mp4_with_driving_fps_and_frame_count(tmp_path, micro_models):
    from xnemo_core.__main__ import main
    from xnemo_core.animate import DEMO_DRIVING, DEMO_REFERENCE
    from xnemo_core.checkpoints import save_bundle
    from xnemo_core.video import read_video

    bundle = tmp_path / "micro.safetensors"
    save_bundle(micro_models, bundle, license_text="random test weights")
    out = tmp_path / "out.mp4"
    code = main(["animate", "--reference", str(DEMO_REFERENCE), "--driving", str(DEMO_DRIVING), "--out", str(out),
                 "--weights", str(bundle), "--steps", "2", "--frames", "5", "--context", "3", "--overlap", "1"])
    assert code == 0
    video = read_video(out)
    source = read_video(DEMO_DRIVING)
    assert len(video) == 5
    assert abs(video.fps - source.fps) < 1e-3
    assert video.source_size == (128, 128)


def test_bf16_pipeline_agrees_with_fp32(micro_models):
    """Half precision end to end (casts of latents, tokens, reference K/V, VAE) within bf16 tolerance."""
    import copy

    def run(models):
        pipe, prepared = _prepared(models)
        return pipe.sample(prepared, _tokens(models, 3), SamplingConfig(steps=2, context_frames=2,
                                                                        context_overlap=1)).video

    full = run(micro_models)
    half = run(copy.deepcopy(micro_models).to(dtype=torch.bfloat16))
    assert half.dtype == torch.float32  # frames come back as float32 either way
    diff = (full - half).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.005


def test_gradient_checkpointing_matches_plain_backward(micro_models):
    """Checkpointed layers recompute attention in backward; the reference read must be identical."""
    import copy

    unet = copy.deepcopy(micro_models.denoising_unet).train().requires_grad_(True)
    _, prepared = _prepared(micro_models)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 2, 16, 16, generator=g)
    clip = torch.randn(2, 1, micro_models.config.unet.cross_attention_dim, generator=g)
    motion = torch.randn(2, 2, 32, 16, generator=g)

    def grads(checkpointing):
        unet.zero_grad()
        unet.gradient_checkpointing = checkpointing
        unet(x, 300, clip, motion, prepared.reference_kv, torch.tensor([-1, 0])).square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6, rtol=1e-4) for n in plain)
