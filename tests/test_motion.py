"""Tests for xnemo_core.motion: editing, keyframe interpolation, easing, I/O and extraction."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from xnemo_core.errors import Cancelled, FileFormatError, InvalidInputError, XNeMoError
from xnemo_core.motion import (
    EASING_NAMES,
    EASINGS,
    FORMAT_NAME,
    INTERPOLATION_MODES,
    Keyframe,
    MotionSequence,
    ScheduleEntry,
    blend,
    concat,
    ease,
    extract_motion,
    interpolate_keyframes,
    keyframes_every,
)

D = 512


def make_seq(n=10, dim=D, seed=0, fps=25.0, **kw):
    g = torch.Generator().manual_seed(seed)
    desc = torch.randn(n, dim, generator=g)
    rts = torch.randn(n, 3, generator=g)
    boxes = torch.stack(
        [torch.tensor([10.0 + i, 20.0 + i, 110.0 + i, 120.0 + i]) for i in range(n)]
    ) if n else torch.zeros(0, 4)
    return MotionSequence(desc, rts, boxes, fps=fps, **kw)


def ramp_seq(n=10, dim=8, fps=25.0):
    """Descriptor of frame i is i * ones (and f_rts = (i, 2i, -i)), to check numbers by hand."""
    t = torch.arange(n, dtype=torch.float32)
    desc = t[:, None] * torch.ones(n, dim)
    rts = torch.stack([t, 2 * t, -t], dim=1)
    return MotionSequence(desc, rts, fps=fps)


# ---------------------------------------------------------------------------- easing

def test_easing_table_endpoints_and_monotone():
    assert EASING_NAMES[:4] == ("linear", "ease_in", "ease_out", "ease_in_out")
    assert set(EASING_NAMES) == set(EASINGS)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    for name, fn in EASINGS.items():
        assert fn(0.0) == 0.0, name
        assert fn(1.0) == 1.0, name
        y = fn(grid)
        assert y.dtype == torch.float64
        assert float(y[0]) == 0.0 and float(y[-1]) == 1.0, name
        assert bool((y[1:] >= y[:-1]).all()), f"{name} not monotone"
        assert bool(((y >= 0) & (y <= 1)).all()), name
        # numpy in, numpy out; clamped outside [0, 1]
        ynp = fn(np.array([-0.5, 0.5, 1.5]))
        assert isinstance(ynp, np.ndarray) and ynp[0] == 0.0 and ynp[2] == 1.0


def test_easing_values():
    assert EASINGS["linear"](0.3) == pytest.approx(0.3)
    assert EASINGS["ease_in"](0.5) == pytest.approx(0.25)
    assert EASINGS["ease_out"](0.5) == pytest.approx(0.75)
    assert EASINGS["ease_in_out"](0.25) == pytest.approx(0.15625)  # smoothstep
    assert EASINGS["ease_in_out"](0.5) == pytest.approx(0.5)
    assert EASINGS["ease_in_out_cosine"](0.25) == pytest.approx(0.5 - 0.5 * math.cos(math.pi / 4))
    assert EASINGS["constant"](0.999) == 0.0
    assert ease("ease_in", 0.1) == pytest.approx(0.01)
    with pytest.raises(InvalidInputError, match="unknown easing"):
        ease("bounce", 0.5)


# ---------------------------------------------------------------------------- blend

def test_blend_linear_and_endpoints():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    w = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    for mode in INTERPOLATION_MODES:
        out = blend(a, b, w, mode)
        assert out.shape == (4, D) and out.dtype == torch.float32
        assert torch.equal(out[0], a) and torch.equal(out[3], b), mode
    lin = blend(a, b, w, "linear")
    torch.testing.assert_close(lin[2], (a + b) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin[1], 0.75 * a + 0.25 * b, rtol=0, atol=1e-6)


def test_slerp_norm_and_arc():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(D, generator=g, dtype=torch.float64)
    b = 3.0 * torch.randn(D, generator=g, dtype=torch.float64)
    w = torch.linspace(0, 1, 11, dtype=torch.float64)
    out = blend(a, b, w, "spherical")
    assert out.dtype == torch.float64
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    omega = torch.acos((ua @ ub).clamp(-1, 1))
    # norm interpolates linearly
    torch.testing.assert_close(out.norm(dim=1), (1 - w) * na + w * nb, rtol=1e-10, atol=0)
    dirs = out / out.norm(dim=1, keepdim=True)
    # angle to a grows linearly, angle to b shrinks linearly: the point is on the great arc
    ang_a = torch.acos((dirs @ ua).clamp(-1, 1))
    ang_b = torch.acos((dirs @ ub).clamp(-1, 1))
    torch.testing.assert_close(ang_a, w * omega, rtol=0, atol=1e-6)
    torch.testing.assert_close(ang_b, (1 - w) * omega, rtol=0, atol=1e-6)
    # and in the plane spanned by a and b
    basis = torch.linalg.qr(torch.stack([ua, ub], dim=1)).Q
    resid = dirs - (dirs @ basis) @ basis.T
    assert float(resid.abs().max()) < 1e-10
    # differs from lerp in the middle (lerp cuts the chord)
    lin = blend(a, b, torch.tensor([0.5], dtype=torch.float64), "linear")
    assert float(lin.norm()) < float(out[5].norm())


def test_slerp_fallbacks():
    a = torch.randn(16, generator=torch.Generator().manual_seed(3))
    w = torch.tensor([0.0, 0.3, 0.5, 1.0])
    for b in (2.0 * a, -a, torch.zeros(16)):  # parallel, antiparallel, zero
        s = blend(a, b, w, "spherical")
        l = blend(a, b, w, "linear")
        assert torch.isfinite(s).all()
        torch.testing.assert_close(s, l, rtol=0, atol=1e-6)
    # scalar weight, batched pairs
    A = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    B = torch.randn(5, 16, generator=torch.Generator().manual_seed(5))
    out = blend(A, B, torch.full((5,), 0.5), "spherical")
    torch.testing.assert_close(out.norm(dim=1), (A.norm(dim=1) + B.norm(dim=1)) / 2, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="interpolation mode"):
        blend(A, B, 0.5, "cubic")


# ---------------------------------------------------------------------------- validation

def test_shape_validation_errors():
    with pytest.raises(InvalidInputError, match=r"descriptors must have shape \[frames, dim\]"):
        MotionSequence(torch.zeros(512), torch.zeros(1, 3))
    with pytest.raises(InvalidInputError, match=r"f_rts must have shape \[4, 3\]"):
        MotionSequence(torch.zeros(4, 512), torch.zeros(4, 2))
    with pytest.raises(InvalidInputError, match=r"boxes must have shape \[4, 4\]"):
        MotionSequence(torch.zeros(4, 512), torch.zeros(4, 3), torch.zeros(3, 4))
    with pytest.raises(InvalidInputError, match=r"reference_descriptor must have shape \[512\]"):
        MotionSequence(torch.zeros(4, 512), torch.zeros(4, 3), reference_descriptor=torch.zeros(256))
    with pytest.raises(InvalidInputError, match="fps"):
        MotionSequence(torch.zeros(4, 512), torch.zeros(4, 3), fps=0)
    with pytest.raises(InvalidInputError, match="filled_frames"):
        MotionSequence(torch.zeros(4, 512), torch.zeros(4, 3), filled_frames=[4])
    with pytest.raises(InvalidInputError, match="NaN"):
        MotionSequence(torch.full((4, 512), float("nan")), torch.zeros(4, 3))
    with pytest.raises(InvalidInputError, match="JSON"):
        MotionSequence(torch.zeros(4, 512), torch.zeros(4, 3), meta={"x": object()})
    with pytest.raises(InvalidInputError, match="source_size"):
        MotionSequence(torch.zeros(4, 512), torch.zeros(4, 3), source_size=(0, 10))
    # the error types are user-facing and ValueErrors
    assert issubclass(InvalidInputError, XNeMoError) and issubclass(InvalidInputError, ValueError)


def test_construction_normalises_and_copies():
    desc = np.arange(12, dtype=np.float64).reshape(3, 4)
    s = MotionSequence(desc, np.zeros((3, 3)), fps=30, filled_frames=[2, 0, 2],
                       reference_descriptor=torch.ones(1, 4), source_size=[640, 480])
    assert s.descriptors.dtype == torch.float32 and s.descriptors.shape == (3, 4)
    assert len(s) == s.num_frames == 3 and s.descriptor_dim == 4
    assert s.filled_frames == [0, 2] and s.source_size == (640, 480)
    assert s.reference_descriptor.shape == (4,)
    assert torch.isnan(s.boxes).all() and s.boxes.shape == (3, 4)
    assert s.duration == pytest.approx(0.1)
    desc[0, 0] = 99.0  # caller's array changes, the sequence does not
    assert float(s.descriptors[0, 0]) == 0.0
    with pytest.raises(Exception):
        s.fps = 10  # frozen


# ---------------------------------------------------------------------------- editing ops

def test_slice():
    s = make_seq(10, filled_frames=[3, 4, 8], meta={"source": "a.mp4"})
    t = s.slice(2, 9, 2)  # frames 2,4,6,8
    assert len(t) == 4
    assert torch.equal(t.descriptors, s.descriptors[2:9:2])
    assert torch.equal(t.f_rts, s.f_rts[2:9:2]) and torch.equal(t.boxes, s.boxes[2:9:2])
    assert t.filled_frames == [1, 3]
    assert t.fps == s.fps and t.meta["source"] == "a.mp4" and t.meta["history"][-1].startswith("slice")
    assert torch.equal(s.slice(-3).descriptors, s.descriptors[-3:])
    assert torch.equal(s.slice(None, None, -1).descriptors, s.descriptors.flip(0))
    assert len(s.slice(5, 5)) == 0
    assert "history" not in s.meta  # input untouched
    with pytest.raises(InvalidInputError):
        s.slice(0, 5, 0)


def test_concat():
    a = make_seq(4, seed=1, filled_frames=[1], source_size=(640, 480),
                 reference_descriptor=torch.ones(D))
    b = make_seq(3, seed=2, filled_frames=[0, 2], source_size=(640, 480))
    c = concat(a, b)
    assert len(c) == 7
    assert torch.equal(c.descriptors[:4], a.descriptors) and torch.equal(c.descriptors[4:], b.descriptors)
    assert torch.equal(c.f_rts[4:], b.f_rts)
    assert c.filled_frames == [1, 4, 6]
    assert torch.equal(c.reference_descriptor, torch.ones(D))
    assert c.source_size == (640, 480)
    assert torch.equal(a.concat(b).descriptors, c.descriptors)
    assert len(concat([a, b, a])) == 11
    # different fps: warn and record
    d = make_seq(2, seed=3, fps=30.0)
    with pytest.warns(UserWarning, match="different fps"):
        e = concat(a, d)
    assert e.fps == 25.0 and "different fps" in e.meta["warnings"][0] and e.source_size is None
    # different dims: clear error
    with pytest.raises(InvalidInputError, match="different descriptor dims"):
        concat(a, make_seq(2, dim=256))


def test_loop_ping_pong_hold_reverse():
    s = ramp_seq(4)
    s = MotionSequence(s.descriptors, s.f_rts, fps=s.fps, filled_frames=[3])
    lp = s.loop(3)
    assert len(lp) == 12 and lp.descriptors[:, 0].tolist() == [0, 1, 2, 3] * 3
    assert lp.filled_frames == [3, 7, 11]
    pp = s.ping_pong()
    assert pp.descriptors[:, 0].tolist() == [0, 1, 2, 3, 2, 1, 0]
    assert pp.f_rts[:, 1].tolist() == [0, 2, 4, 6, 4, 2, 0]
    assert pp.filled_frames == [3]
    ppl = s.ping_pong(loopable=True)
    assert ppl.descriptors[:, 0].tolist() == [0, 1, 2, 3, 2, 1]
    assert ppl.loop(2).descriptors[:, 0].tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert len(s.slice(0, 1).ping_pong()) == 1
    h = s.hold(1, 3)
    assert h.descriptors[:, 0].tolist() == [0, 1, 1, 1, 1, 2, 3]
    assert h.filled_frames == [6]
    assert s.hold(-1, 2).descriptors[:, 0].tolist() == [0, 1, 2, 3, 3, 3]
    assert torch.equal(s.hold(2, 0).descriptors, s.descriptors)
    assert s.reverse().descriptors[:, 0].tolist() == [3, 2, 1, 0]
    with pytest.raises(InvalidInputError, match="out of range"):
        s.hold(4, 1)
    with pytest.raises(InvalidInputError):
        s.loop(0)
    # nothing mutated the input
    assert s.descriptors[:, 0].tolist() == [0, 1, 2, 3] and "history" not in s.meta


def test_reference_kept_through_ops():
    ref = torch.arange(D, dtype=torch.float32)
    s = make_seq(6, reference_descriptor=ref)
    for out in (s.slice(1, 3), s.loop(2), s.ping_pong(), s.hold(0, 2), s.resample(50),
                concat(s, make_seq(2)), interpolate_keyframes([(s, 0), (s, 5)], 4)):
        assert torch.equal(out.reference_descriptor, ref)


def test_resample():
    s = ramp_seq(10, fps=25.0)
    up = s.resample(50)
    assert len(up) == 20 and up.fps == 50.0
    # frame j is at source position j/2; the last one (9.5) holds frame 9
    expected = [min(j / 2, 9.0) for j in range(20)]
    torch.testing.assert_close(up.descriptors[:, 0], torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(up.f_rts[:, 2], -torch.tensor(expected), rtol=0, atol=1e-6)
    assert torch.equal(up.descriptors[::2], s.descriptors)  # exact on source frames
    down = s.resample(12.5)
    assert len(down) == 5 and torch.equal(down.descriptors, s.descriptors[::2])
    r = s.resample(30)  # 10 frames * 30/25 = 12, position j * 25/30
    assert len(r) == 12
    torch.testing.assert_close(r.descriptors[:, 0], torch.tensor([min(j * 25 / 30, 9) for j in range(12)]),
                               rtol=0, atol=1e-5)
    assert r.duration == pytest.approx(s.duration)
    # same fps is the identity
    assert torch.equal(s.resample(25).descriptors, s.descriptors)
    # filled frames and NaN boxes follow the contributing source frames
    f = MotionSequence(s.descriptors, s.f_rts, fps=25, filled_frames=[3])
    assert f.resample(50).filled_frames == [5, 6, 7]
    # spherical mode keeps the source frames exact too
    m = make_seq(10)
    sp = m.resample(50, mode="spherical")
    assert torch.equal(sp.descriptors[::2], m.descriptors)
    mid = blend(m.descriptors[0], m.descriptors[1], torch.tensor([0.5]), "spherical")[0]
    torch.testing.assert_close(sp.descriptors[1], mid)
    torch.testing.assert_close(sp.boxes[1], (m.boxes[0] + m.boxes[1]) / 2)


# ---------------------------------------------------------------------------- keyframes

def test_interpolate_keyframes_linear_and_holds():
    a = ramp_seq(10)
    b = MotionSequence(-torch.ones(3, 8) * 5, torch.ones(3, 3), fps=30)
    out = interpolate_keyframes(
        [(a, 2), (b, 1), Keyframe.from_sequence(a, 9)],
        [ScheduleEntry(0, hold=2), (7, 0), {"frame": 11, "hold": 1}],
    )
    assert len(out) == 13 and out.fps == 25.0
    d = out.descriptors[:, 0]
    # keyframe 0 on frames 0..2, then 3..6 interpolate 2 -> -5 over 5 steps, keyframe 1 at 7,
    # 8..10 interpolate -5 -> 9 over 4 steps, keyframe 2 on frames 11..12
    expected = [2, 2, 2] + [2 + (-7) * k / 5 for k in range(1, 5)] + [-5] + \
               [-5 + 14 * k / 4 for k in range(1, 4)] + [9, 9]
    torch.testing.assert_close(d, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-5)
    # endpoints hit keyframes bit-exactly (all channels, f_rts too)
    assert torch.equal(out.descriptors[0], a.descriptors[2]) and torch.equal(out.descriptors[2], a.descriptors[2])
    assert torch.equal(out.descriptors[7], b.descriptors[1]) and torch.equal(out.f_rts[7], b.f_rts[1])
    assert torch.equal(out.descriptors[12], a.descriptors[9]) and torch.equal(out.f_rts[11], a.f_rts[9])
    # f_rts midpoint is linear: between (2,4,-2) and (1,1,1) at k/5
    torch.testing.assert_close(out.f_rts[5], torch.tensor([2, 4, -2.0]) * 0.4 + torch.tensor([1, 1, 1.0]) * 0.6)
    # lead-in before the first keyframe holds it
    lead = interpolate_keyframes([(a, 3), (a, 5)], [2, 4])
    assert lead.descriptors[:, 0].tolist() == [3, 3, 3, 4, 5]


def test_interpolate_keyframes_easing_and_spherical():
    s = make_seq(10, seed=7)
    out = interpolate_keyframes([(s, 0), (s, 9)], [0, 4], easing="ease_in", mode="spherical")
    a, b = s.descriptors[0], s.descriptors[9]
    w = torch.tensor([0.0, 1 / 16, 4 / 16, 9 / 16, 1.0], dtype=torch.float64)
    torch.testing.assert_close(out.descriptors, blend(a, b, w, "spherical"), rtol=0, atol=1e-6)
    assert torch.equal(out.descriptors[0], a) and torch.equal(out.descriptors[4], b)
    # the norm goes linearly in the eased weight -- slerp, not lerp
    torch.testing.assert_close(out.descriptors[2].norm(), 0.75 * a.norm() + 0.25 * b.norm(), rtol=1e-5, atol=0)
    # f_rts stays linear (with the same eased weight) even in spherical mode
    torch.testing.assert_close(out.f_rts[2], 0.75 * s.f_rts[0] + 0.25 * s.f_rts[9])
    # per-segment lists and per-entry overrides
    out2 = interpolate_keyframes(
        [(s, 0), (s, 1), (s, 2)],
        [0, 2, ScheduleEntry(4)],
        easing=["linear", "constant"],
    )
    assert torch.equal(out2.descriptors[3], s.descriptors[1])  # 'constant' holds keyframe 1
    out3 = interpolate_keyframes([(s, 0), (s, 1)], [(0, 0, "constant"), 3], easing="linear")
    assert torch.equal(out3.descriptors[2], s.descriptors[0])
    # a plain int schedule spaces keyframes evenly
    assert len(interpolate_keyframes([(s, 0), (s, 3), (s, 6)], 5)) == 11
    # a single keyframe with a hold
    one = interpolate_keyframes([(s, 4)], [ScheduleEntry(0, hold=3)])
    assert len(one) == 4 and torch.equal(one.descriptors, s.descriptors[4].expand(4, D))


def test_interpolate_keyframes_boxes_filled_reference():
    a = make_seq(5, seed=1, source_size=(640, 480), filled_frames=[4])
    b = make_seq(5, seed=2, source_size=(640, 480))
    out = interpolate_keyframes([(a, 0), (b, 4)], [0, 4])
    assert out.source_size == (640, 480)
    torch.testing.assert_close(out.boxes[2], (a.boxes[0] + b.boxes[4]) / 2)
    c = make_seq(5, seed=3, source_size=(1280, 720))
    mixed = interpolate_keyframes([(a, 4), (c, 0)], [0, 3])
    assert mixed.source_size is None and torch.isnan(mixed.boxes).all()
    assert mixed.filled_frames == [0]
    ref = torch.full((D,), 2.0)
    r = interpolate_keyframes([(a, 0), (b, 1)], 2, reference_descriptor=ref, meta={"name": "kf"})
    assert torch.equal(r.reference_descriptor, ref) and r.meta["name"] == "kf"


def test_interpolate_keyframes_errors():
    s = make_seq(5)
    with pytest.raises(InvalidInputError, match="must increase"):
        interpolate_keyframes([(s, 0), (s, 1)], [(0, 3), 3])
    with pytest.raises(InvalidInputError, match="must increase"):
        interpolate_keyframes([(s, 0), (s, 1)], [4, 2])
    with pytest.raises(InvalidInputError, match="2 entries but there are 3"):
        interpolate_keyframes([(s, 0), (s, 1), (s, 2)], [0, 2])
    with pytest.raises(InvalidInputError, match="unknown easing"):
        interpolate_keyframes([(s, 0), (s, 1)], [0, 2], easing="wobble")
    with pytest.raises(InvalidInputError, match="interpolation mode"):
        interpolate_keyframes([(s, 0), (s, 1)], [ScheduleEntry(0, mode="cubic"), 2])
    with pytest.raises(InvalidInputError, match="different descriptor dims"):
        interpolate_keyframes([(s, 0), (make_seq(2, dim=64), 1)], 2)
    with pytest.raises(InvalidInputError, match="out of range"):
        interpolate_keyframes([(s, 0), (s, 5)], 2)
    with pytest.raises(InvalidInputError):
        interpolate_keyframes([], [])


def test_keyframes_every():
    s = ramp_seq(10)
    kfs, frames = keyframes_every(s, 4)
    assert [k.index for k in kfs] == [0, 4, 8, 9] and frames == [0, 4, 8, 9]
    rebuilt = interpolate_keyframes(kfs, frames)
    # the ramp is linear in time, so linear keyframe interpolation rebuilds it
    torch.testing.assert_close(rebuilt.descriptors, s.descriptors, rtol=0, atol=1e-6)
    torch.testing.assert_close(rebuilt.f_rts, s.f_rts, rtol=0, atol=1e-6)
    kfs2, frames2 = keyframes_every(s, 4, start=1, include_last=False, spacing=10)
    assert [k.index for k in kfs2] == [1, 5, 9] and frames2 == [0, 10, 20]
    stretched = interpolate_keyframes(kfs2, frames2)
    assert len(stretched) == 21
    torch.testing.assert_close(stretched.descriptors[5, 0], torch.tensor(3.0))


# ---------------------------------------------------------------------------- save / load

def test_save_load_roundtrip_bit_exact(tmp_path):
    s = make_seq(7, seed=11, fps=29.97, source_size=(1920, 1080), filled_frames=[2, 5],
                 reference_descriptor=torch.randn(D), meta={"source": "clip.mp4", "nested": {"a": [1, 2.5]}})
    boxes = s.boxes.clone()
    boxes[3] = float("nan")
    s = MotionSequence(s.descriptors, s.f_rts, boxes, s.fps, s.source_size, s.filled_frames,
                       s.reference_descriptor, s.meta).slice(0, 7)
    path = tmp_path / "motion.safetensors"
    assert s.save(path) == str(path)
    t = MotionSequence.load(path)
    for name in ("descriptors", "f_rts", "reference_descriptor"):
        assert torch.equal(getattr(t, name), getattr(s, name)), name
    assert torch.equal(torch.isnan(t.boxes), torch.isnan(s.boxes))
    assert torch.equal(t.boxes.nan_to_num(-1), s.boxes.nan_to_num(-1))
    assert t.fps == 29.97 and t.source_size == (1920, 1080) and t.filled_frames == [2, 5]
    assert t.meta == s.meta and t.meta["history"] == ["slice(0, 7, None)"]
    # metadata in the header is plain JSON strings (no pickle)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md["format"] == FORMAT_NAME and md["format_version"] == "1" and md["descriptor_dim"] == str(D)
    assert json.loads(md["filled_frames"]) == [2, 5]
    # no reference descriptor, no source size, empty meta also round-trip
    u = make_seq(3)
    u.save(tmp_path / "u.safetensors")
    v = MotionSequence.load(tmp_path / "u.safetensors")
    assert v.reference_descriptor is None and v.source_size is None and v.meta == {}
    assert torch.equal(v.descriptors, u.descriptors)


def test_load_errors(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is not a safetensors file at all")
    with pytest.raises(FileFormatError, match="notes.safetensors") as ei:
        MotionSequence.load(bad)
    assert ei.value.path == str(bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        MotionSequence.load(tmp_path / "missing.safetensors")
    # a safetensors file that is not a motion sequence
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(FileFormatError, match="weights.safetensors.*not an X-NeMo motion sequence"):
        MotionSequence.load(other)
    # wrong version
    s = make_seq(2)
    md = {"format": FORMAT_NAME, "format_version": "99", "descriptor_dim": str(D), "fps": "25.0"}
    future = tmp_path / "future.safetensors"
    save_file({"descriptors": s.descriptors, "f_rts": s.f_rts, "boxes": s.boxes}, str(future), metadata=md)
    with pytest.raises(FileFormatError, match="future.safetensors.*version 99"):
        MotionSequence.load(future)
    # missing tensors
    md["format_version"] = "1"
    partial = tmp_path / "partial.safetensors"
    save_file({"descriptors": s.descriptors}, str(partial), metadata=md)
    with pytest.raises(FileFormatError, match="partial.safetensors.*missing tensors: f_rts, boxes"):
        MotionSequence.load(partial)
    # inconsistent content
    wrong = tmp_path / "wrong.safetensors"
    save_file({"descriptors": s.descriptors, "f_rts": torch.zeros(3, 3), "boxes": s.boxes}, str(wrong), metadata=md)
    with pytest.raises(FileFormatError, match="wrong.safetensors.*f_rts"):
        MotionSequence.load(wrong)


# ---------------------------------------------------------------------------- extraction

class FakeEncoder(torch.nn.Module):
    """Linear stand-in for the motion encoder: 8x8 average pool -> linear with f_rts."""

    def __init__(self, dim=D, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Linear(3 * 8 * 8 + 3, dim, dtype=dtype)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 3 * 8 * 8 + 3, generator=g, dtype=dtype) * 0.1)
            self.proj.bias.copy_(torch.randn(dim, generator=g, dtype=dtype))
        self.calls = []

    def descriptor(self, images, f_rts):
        self.calls.append(images.shape[0])
        assert images.ndim == 4 and images.shape[1] == 3
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)
        return self.proj(torch.cat([pooled, f_rts], dim=1))


def _crops(n, size=224, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_extract_batched_equals_per_frame_and_formula():
    enc = FakeEncoder().eval()
    crops = _crops(5)
    rts = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    seen = []
    out = extract_motion(enc, crops, rts, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert out.shape == (5, D) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert enc.calls == [2, 2, 1] and seen == [(2, 5), (4, 5), (5, 5)]
    single = torch.cat([extract_motion(enc, crops[i:i + 1], rts[i:i + 1], batch_size=1) for i in range(5)])
    assert torch.equal(out, single)
    # exact expected values: images are (u/255)*2-1, channels first
    imgs = torch.from_numpy(crops).float().div(255).mul(2).sub(1).permute(0, 3, 1, 2).double()
    feats = torch.cat([torch.nn.functional.adaptive_avg_pool2d(imgs, 8).flatten(1),
                       torch.from_numpy(rts).double()], dim=1)
    expected = (feats @ enc.proj.weight.detach().T + enc.proj.bias.detach()).float()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # torch uint8 input, float32 encoder, explicit dtype
    enc32 = FakeEncoder(dtype=torch.float32).eval()
    out32 = extract_motion(enc32, torch.from_numpy(crops), torch.from_numpy(rts), batch_size=4,
                           device="cpu", dtype=torch.float32)
    expected32 = feats @ enc32.proj.weight.detach().double().T + enc32.proj.bias.detach().double()
    torch.testing.assert_close(out32, expected32.float(), rtol=1e-5, atol=1e-5)


def test_extract_cancel_and_errors():
    enc = FakeEncoder(dim=16).eval()
    crops = _crops(6, size=32)
    rts = np.zeros((6, 3), np.float32)
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 2  # stop before the third batch

    with pytest.raises(Cancelled, match="after 4 of 6 frames"):
        extract_motion(enc, crops, rts, batch_size=2, cancel=cancel)
    assert enc.calls == [2, 2]
    assert issubclass(Cancelled, XNeMoError)
    with pytest.raises(InvalidInputError, match="uint8"):
        extract_motion(enc, crops.astype(np.float32), rts)
    with pytest.raises(InvalidInputError, match=r"\[frames, H, W, 3\]"):
        extract_motion(enc, crops[..., :2], rts)
    with pytest.raises(InvalidInputError, match=r"f_rts must have shape \[6, 3\]"):
        extract_motion(enc, crops, rts[:5])
    with pytest.raises(InvalidInputError, match="descriptor"):
        extract_motion(object(), crops, rts)
    enc.train()
    with pytest.warns(UserWarning, match="training mode"):
        extract_motion(enc, crops[:1], rts[:1])
