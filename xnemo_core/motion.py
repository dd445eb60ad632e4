"""Motion sequences: per-frame X-NeMo motion descriptors, editing, keyframe interpolation, I/O.

X-NeMo's motion encoder maps each driving face crop (224x224) plus ``f_rts`` (a 3-vector with the
face box's relative translation and scale) to a 1-D motion descriptor (512-d in the release). The
denoising UNet only sees an affine function of that descriptor (32 tokens x 16 channels plus a
fixed sin/cos table), so blending descriptors is the same as blending what the UNet receives:
editing happens here, on small CPU tensors, and never needs the encoder again.

Conventions
-----------
* Frame ``i`` of a sequence plays at time ``i / fps`` seconds; a sequence of ``F`` frames lasts
  ``F / fps`` seconds.
* Every operation returns a new :class:`MotionSequence`; none mutates its input. Tensors are
  float32 on the CPU.
* ``f_rts`` is always interpolated linearly; descriptors linearly or spherically
  (see :func:`blend`). Easing curves re-time a segment; descriptors and ``f_rts`` share the same eased
  weight so head pose and expression stay in step.
* ``boxes`` are face boxes ``(x0, y0, x1, y1)`` in source pixels; NaN marks a frame with no
  real box (synthetic frames).
* ``filled_frames`` lists frames whose face box the tracker interpolated (no detection). The
  lists follow the frames through every operation.
* ``reference_descriptor`` (motion of the reference image itself, used by the negative CFG branch)
  is carried unchanged through every operation.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch

from .atomic import atomic_path
from .errors import Cancelled, FileFormatError, InvalidInputError

__all__ = [
    "MotionSequence",
    "Keyframe",
    "ScheduleEntry",
    "EASINGS",
    "EASING_NAMES",
    "INTERPOLATION_MODES",
    "ease",
    "blend",
    "concat",
    "interpolate_keyframes",
    "keyframes_every",
    "extract_motion",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "xnemo.motion_sequence"
FORMAT_VERSION = 1
_HISTORY_LIMIT = 32

TensorLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


# --------------------------------------------------------------------------------------------
# easing
# --------------------------------------------------------------------------------------------

def _easing(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any], Any]:
    """Lift a tensor easing to floats / numpy arrays / tensors; input is clamped to [0, 1]."""

    @functools.wraps(fn)
    def wrapper(t):
        if isinstance(t, torch.Tensor):
            x = t if t.is_floating_point() else t.to(torch.float64)
            return fn(x.clamp(0.0, 1.0))
        if isinstance(t, np.ndarray):
            x = torch.from_numpy(np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0))
            return fn(x).numpy()
        x = torch.tensor(min(max(float(t), 0.0), 1.0), dtype=torch.float64)
        return float(fn(x))

    return wrapper


@_easing
def _linear(t):
    return t.clone()


@_easing
def _ease_in(t):  # quadratic
    return t * t


@_easing
def _ease_out(t):  # quadratic
    return 1.0 - (1.0 - t) * (1.0 - t)


@_easing
def _ease_in_out(t):  # smoothstep
    return t * t * (3.0 - 2.0 * t)


@_easing
def _ease_in_out_cosine(t):
    return 0.5 - 0.5 * torch.cos(math.pi * t)


@_easing
def _ease_in_out_smoother(t):  # smootherstep (zero 1st and 2nd derivative at the ends)
    return t * t * t * (t * (6.0 * t - 15.0) + 10.0)


@_easing
def _constant(t):  # hold the start keyframe until the next one (step at t = 1)
    return torch.where(t >= 1.0, torch.ones_like(t), torch.zeros_like(t))


#: name -> easing function on [0, 1]. Each is monotone non-decreasing with f(0)=0 and f(1)=1 and
#: accepts a float, a numpy array or a torch tensor (returned in the same kind).
EASINGS: dict[str, Callable[[Any], Any]] = {
    "linear": _linear,
    "ease_in": _ease_in,
    "ease_out": _ease_out,
    "ease_in_out": _ease_in_out,
    "ease_in_out_cosine": _ease_in_out_cosine,
    "ease_in_out_smoother": _ease_in_out_smoother,
    "constant": _constant,
}
#: the easing names in display order (for a ComfyUI combo widget)
EASING_NAMES: tuple[str, ...] = tuple(EASINGS)
#: descriptor interpolation modes (for a ComfyUI combo widget)
INTERPOLATION_MODES: tuple[str, ...] = ("linear", "spherical")


def _check_easing(name: str) -> str:
    if name not in EASINGS:
        raise InvalidInputError(f"unknown easing {name!r}; choose one of {', '.join(EASING_NAMES)}")
    return name


def _check_mode(name: str) -> str:
    if name not in INTERPOLATION_MODES:
        raise InvalidInputError(
            f"unknown interpolation mode {name!r}; choose one of {', '.join(INTERPOLATION_MODES)}"
        )
    return name


def ease(name: str, t):
    """Apply the easing ``name`` (a key of :data:`EASINGS`) to ``t``."""
    return EASINGS[_check_easing(name)](t)


# --------------------------------------------------------------------------------------------
# blending
# --------------------------------------------------------------------------------------------

_SLERP_MIN_SIN = 1e-6  # below this sin(angle) the pair is treated as (anti)parallel -> lerp
_SLERP_MIN_NORM = 1e-12


def _lerp_exact(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(1-w)a + wb with w broadcast over the last dim; returns a exactly at w=0, b at w=1.

    The explicit selects also keep a NaN in the unused endpoint (e.g. a missing box) from leaking.
    """
    w = w.unsqueeze(-1)
    mixed = (1.0 - w) * a + w * b
    mixed = torch.where(w == 0, a.expand_as(mixed), mixed)
    return torch.where(w == 1, b.expand_as(mixed), mixed)


def blend(a: torch.Tensor, b: torch.Tensor, w, mode: str = "linear") -> torch.Tensor:
    """Blend descriptors ``a`` and ``b`` (``[..., D]``, broadcastable) with weights ``w``.

    ``w`` is a float or a tensor broadcastable to the leading dims (``[N]`` for ``[N, D]`` or
    ``[D]`` inputs -> ``[N, D]``). ``mode='linear'`` is ``(1-w)a + wb``; ``mode='spherical'``
    rotates the direction along the great circle from ``a`` to ``b`` by ``w`` times the angle while
    the norm goes linearly from ``|a|`` to ``|b|``. Pairs that are (anti)parallel or have a
    (near-)zero norm fall back to the linear blend. ``w=0`` gives ``a`` and ``w=1`` gives ``b``
    bit-exactly. Computed in float64, returned in ``a``'s dtype.
    """
    _check_mode(mode)
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    out_dtype = a.dtype if a.is_floating_point() else torch.float32
    a64 = torch.as_tensor(a).to(torch.float64)
    b64 = torch.as_tensor(b).to(torch.float64)
    w64 = torch.as_tensor(w, dtype=torch.float64)
    lin = _lerp_exact(a64, b64, w64)
    if mode == "linear":
        return lin.to(out_dtype)

    na = a64.norm(dim=-1, keepdim=True)
    nb = b64.norm(dim=-1, keepdim=True)
    ua = a64 / na.clamp_min(_SLERP_MIN_NORM)
    ub = b64 / nb.clamp_min(_SLERP_MIN_NORM)
    # angle via 2*atan2(|ua-ub|, |ua+ub|): accurate for tiny and near-pi angles alike
    omega = 2.0 * torch.atan2((ua - ub).norm(dim=-1, keepdim=True), (ua + ub).norm(dim=-1, keepdim=True))
    so = torch.sin(omega)
    ok = (so > _SLERP_MIN_SIN) & (na > _SLERP_MIN_NORM) & (nb > _SLERP_MIN_NORM)
    ww = w64.unsqueeze(-1)
    so_safe = torch.where(ok, so, torch.ones_like(so))
    direction = (torch.sin((1.0 - ww) * omega) * ua + torch.sin(ww * omega) * ub) / so_safe
    sph = ((1.0 - ww) * na + ww * nb) * direction
    out = torch.where(ok, sph, lin)
    out = torch.where(ww == 0, a64.expand_as(out), out)
    out = torch.where(ww == 1, b64.expand_as(out), out)
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# coercion helpers
# --------------------------------------------------------------------------------------------

def _to_f32(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc
    if t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(f"{name} must be a real float tensor, got dtype {t.dtype}")
    # always a private copy: a sequence must not change when the caller's array does
    return t.to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def _json_copy(value: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be JSON-serialisable: {exc}") from exc


def _positive_fps(fps, name: str = "fps") -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be a number, got {fps!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"{name} must be a finite number > 0, got {fps!r}")
    return value


def _as_int(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        else:
            raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidInputError(f"{name} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# MotionSequence
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False, repr=False)
class MotionSequence:
    """Per-frame motion of a driving clip (or of a synthetic timeline).

    Fields (validated and normalised in ``__post_init__``; tensors become contiguous float32 CPU):

    * ``descriptors`` ``[F, D]`` motion descriptors (``D`` = 512 for the release).
    * ``f_rts`` ``[F, 3]`` face-box relative translation/scale.
    * ``boxes`` ``[F, 4]`` ``(x0, y0, x1, y1)`` in source pixels, NaN where absent; ``None``
      means all absent.
    * ``fps`` frames per second (> 0).
    * ``source_size`` ``(width, height)`` of the source video, or ``None``.
    * ``filled_frames`` frames whose box the tracker interpolated (sorted, de-duplicated).
    * ``reference_descriptor`` ``[D]`` motion of the reference image, or ``None``.
    * ``meta`` free-form JSON-serialisable dict (deep-copied). Operations append a short note to
      ``meta['history']`` (last 32 kept) and warnings to ``meta['warnings']``.
    """

    descriptors: torch.Tensor
    f_rts: torch.Tensor
    boxes: torch.Tensor | None = None
    fps: float = 25.0
    source_size: tuple[int, int] | None = None
    filled_frames: list[int] = field(default_factory=list)
    reference_descriptor: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    # ---- validation ------------------------------------------------------------------------
    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)

        desc = _to_f32(self.descriptors, "descriptors")
        if desc.ndim != 2 or desc.shape[1] < 1:
            raise InvalidInputError(
                f"descriptors must have shape [frames, dim], got {tuple(desc.shape)}"
            )
        if not torch.isfinite(desc).all():
            raise InvalidInputError("descriptors contain NaN or infinite values")
        n, dim = desc.shape
        set_("descriptors", desc)

        rts = _to_f32(self.f_rts, "f_rts")
        if rts.shape != (n, 3):
            raise InvalidInputError(
                f"f_rts must have shape [{n}, 3] to match descriptors {tuple(desc.shape)}, "
                f"got {tuple(rts.shape)}"
            )
        if not torch.isfinite(rts).all():
            raise InvalidInputError("f_rts contains NaN or infinite values")
        set_("f_rts", rts)

        if self.boxes is None:
            boxes = torch.full((n, 4), float("nan"), dtype=torch.float32)
        else:
            boxes = _to_f32(self.boxes, "boxes")
            if boxes.shape != (n, 4):
                raise InvalidInputError(
                    f"boxes must have shape [{n}, 4] (x0, y0, x1, y1) to match descriptors, "
                    f"got {tuple(boxes.shape)}"
                )
        set_("boxes", boxes)

        set_("fps", _positive_fps(self.fps))

        if self.source_size is not None:
            try:
                w, h = (int(v) for v in self.source_size)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(
                    f"source_size must be (width, height) or None, got {self.source_size!r}"
                ) from exc
            if w <= 0 or h <= 0:
                raise InvalidInputError(f"source_size must be positive, got {self.source_size!r}")
            set_("source_size", (w, h))

        filled = sorted({_as_int(i, "filled_frames entry") for i in (self.filled_frames or [])})
        bad = [i for i in filled if not 0 <= i < n]
        if bad:
            raise InvalidInputError(f"filled_frames {bad} out of range for {n} frames")
        set_("filled_frames", filled)

        if self.reference_descriptor is not None:
            ref = _to_f32(self.reference_descriptor, "reference_descriptor")
            if ref.ndim == 2 and ref.shape[0] == 1:
                ref = ref[0]
            if ref.shape != (dim,):
                raise InvalidInputError(
                    f"reference_descriptor must have shape [{dim}] (the descriptor dim), "
                    f"got {tuple(ref.shape)}"
                )
            if not torch.isfinite(ref).all():
                raise InvalidInputError("reference_descriptor contains NaN or infinite values")
            set_("reference_descriptor", ref.contiguous())

        if not isinstance(self.meta, Mapping):
            raise InvalidInputError(f"meta must be a dict, got {type(self.meta).__name__}")
        set_("meta", _json_copy(dict(self.meta), "meta"))

    # ---- basics ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def num_frames(self) -> int:
        return len(self)

    @property
    def descriptor_dim(self) -> int:
        return int(self.descriptors.shape[1])

    @property
    def duration(self) -> float:
        """Seconds: ``num_frames / fps``."""
        return len(self) / self.fps

    def __repr__(self) -> str:
        return (
            f"MotionSequence(frames={len(self)}, dim={self.descriptor_dim}, fps={self.fps:g}, "
            f"source_size={self.source_size}, filled={len(self.filled_frames)}, "
            f"reference={'yes' if self.reference_descriptor is not None else 'no'})"
        )

    def keyframe(self, index: int) -> "Keyframe":
        """The single frame ``index`` (negative counts from the end) as a :class:`Keyframe`."""
        return Keyframe.from_sequence(self, index)

    def _meta_with(self, note: str, warning: str | None = None) -> dict:
        meta = copy.deepcopy(self.meta)
        history = list(meta.get("history", []))
        history.append(note)
        meta["history"] = history[-_HISTORY_LIMIT:]
        if warning is not None:
            meta["warnings"] = list(meta.get("warnings", [])) + [warning]
        return meta

    def _take(self, indices: torch.Tensor, note: str, fps: float | None = None) -> "MotionSequence":
        """New sequence made of frames ``indices`` (a 1-D long tensor)."""
        indices = indices.to(torch.long)
        filled = set(self.filled_frames)
        new_filled = [j for j, i in enumerate(indices.tolist()) if i in filled]
        return MotionSequence(
            descriptors=self.descriptors.index_select(0, indices),
            f_rts=self.f_rts.index_select(0, indices),
            boxes=self.boxes.index_select(0, indices),
            fps=self.fps if fps is None else fps,
            source_size=self.source_size,
            filled_frames=new_filled,
            reference_descriptor=self.reference_descriptor,
            meta=self._meta_with(note),
        )

    def _index(self, frame, name: str = "frame") -> int:
        n = len(self)
        i = _as_int(frame, name)
        if not -n <= i < n:
            raise InvalidInputError(f"{name} {i} out of range for a sequence of {n} frames")
        return i % n

    # ---- frame editing -----------------------------------------------------------------------
    def slice(self, start: int | None = None, stop: int | None = None, step: int | None = None) -> "MotionSequence":
        """Frames ``[start:stop:step]`` with Python slice semantics (negative values allowed).

        ``fps`` is kept, so a step > 1 plays faster; use :meth:`resample` to change the frame
        rate while keeping the duration.
        """
        if step is not None and _as_int(step, "step") == 0:
            raise InvalidInputError("slice step must not be zero")
        for name, v in (("start", start), ("stop", stop), ("step", step)):
            if v is not None:
                _as_int(v, name)
        idx = list(range(len(self)))[slice(start, stop, step)]
        return self._take(torch.tensor(idx, dtype=torch.long), f"slice({start}, {stop}, {step})")

    def concat(self, *others: "MotionSequence") -> "MotionSequence":
        """``concat(self, *others)``; see the module-level :func:`concat`."""
        return concat(self, *others)

    def loop(self, times: int) -> "MotionSequence":
        """The sequence played ``times`` times in a row (``times >= 1``)."""
        times = _as_int(times, "times", minimum=1)
        idx = torch.arange(len(self)).repeat(times)
        return self._take(idx, f"loop({times})")

    def ping_pong(self, loopable: bool = False) -> "MotionSequence":
        """Forward then backward without repeating the turnaround (last) frame.

        ``F`` frames give ``2F - 1`` frames ``0..F-1..0``. With ``loopable=True`` the final frame 0
        is also dropped (``2F - 2`` frames), so that :meth:`loop` of the result has no repeated
        frame at the seam. A single frame stays a single frame.
        """
        n = len(self)
        fwd = list(range(n))
        back = list(range(n - 2, 0 if loopable else -1, -1))
        idx = fwd + back
        return self._take(torch.tensor(idx, dtype=torch.long), f"ping_pong(loopable={bool(loopable)})")

    def hold(self, frame: int, count: int) -> "MotionSequence":
        """Insert ``count`` extra copies of ``frame`` right after it (the frame then shows
        ``count + 1`` times; the sequence grows by ``count``)."""
        i = self._index(frame)
        count = _as_int(count, "count", minimum=0)
        idx = list(range(i + 1)) + [i] * count + list(range(i + 1, len(self)))
        return self._take(torch.tensor(idx, dtype=torch.long), f"hold({i}, {count})")

    def reverse(self) -> "MotionSequence":
        """The frames in reverse order."""
        return self._take(torch.arange(len(self) - 1, -1, -1), "reverse()")

    def resample(self, fps: float, mode: str = "linear") -> "MotionSequence":
        """Change the frame rate keeping the duration (time-based, by interpolation).

        The output has ``round(F * fps / self.fps)`` frames (at least 1); output frame ``j`` is at
        time ``j / fps`` and is blended from the two source frames around it (descriptors with
        ``mode``, ``f_rts`` and boxes linearly). Output frames that fall exactly on a source frame
        are bit-exact copies; times past the last source frame hold it. An output frame counts as
        filled if a source frame with non-zero weight was filled.
        """
        new_fps = _positive_fps(fps)
        _check_mode(mode)
        n = len(self)
        note = f"resample({self.fps:g} -> {new_fps:g}, {mode})"
        if n == 0:
            return MotionSequence(
                self.descriptors, self.f_rts, self.boxes, new_fps, self.source_size, [],
                self.reference_descriptor, self._meta_with(note),
            )
        n_out = max(1, int(math.floor(n * new_fps / self.fps + 0.5)))
        pos = torch.arange(n_out, dtype=torch.float64) * (self.fps / new_fps)
        snapped = torch.round(pos)
        pos = torch.where((pos - snapped).abs() < 1e-9, snapped, pos).clamp(max=n - 1)
        i0 = pos.floor().to(torch.long)
        i1 = (i0 + 1).clamp(max=n - 1)
        w = pos - i0.to(torch.float64)
        desc = blend(self.descriptors[i0], self.descriptors[i1], w, mode)
        rts = _lerp_exact(self.f_rts[i0].double(), self.f_rts[i1].double(), w).float()
        boxes = _lerp_exact(self.boxes[i0].double(), self.boxes[i1].double(), w).float()
        filled = set(self.filled_frames)
        new_filled = [
            j for j in range(n_out)
            if int(i0[j]) in filled or (float(w[j]) > 0 and int(i1[j]) in filled)
        ]
        return MotionSequence(
            descriptors=desc, f_rts=rts, boxes=boxes, fps=new_fps, source_size=self.source_size,
            filled_frames=new_filled, reference_descriptor=self.reference_descriptor,
            meta=self._meta_with(note),
        )

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write a ``.safetensors`` file (tensors + JSON strings in the header; no pickle).

        The write is atomic (temporary file + rename). Returns the path written.
        """
        from safetensors.torch import save_file

        path = os.fspath(path)
        tensors = {
            "descriptors": self.descriptors.clone(),
            "f_rts": self.f_rts.clone(),
            "boxes": self.boxes.clone(),
        }
        if self.reference_descriptor is not None:
            tensors["reference_descriptor"] = self.reference_descriptor.clone()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "descriptor_dim": str(self.descriptor_dim),
            "num_frames": str(len(self)),
            "fps": json.dumps(self.fps),
            "source_size": json.dumps(list(self.source_size) if self.source_size else None),
            "filled_frames": json.dumps(self.filled_frames),
            "meta": json.dumps(self.meta),
        }
        with atomic_path(path, prefix=".motion-") as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MotionSequence":
        """Read a file written by :meth:`save`.

        Raises ``FileNotFoundError`` if the file is missing and :class:`FileFormatError` (naming
        the file) if it is not a safetensors file, is not a motion sequence, has an unsupported
        format version, or has missing/inconsistent tensors or metadata.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"motion sequence file not found: {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise FileFormatError(path, f"not a readable safetensors file ({exc})") from exc

        if metadata.get("format") != FORMAT_NAME:
            raise FileFormatError(
                path, f"not an X-NeMo motion sequence (format={metadata.get('format')!r}, "
                f"expected {FORMAT_NAME!r})"
            )
        try:
            version = int(metadata.get("format_version", ""))
        except ValueError:
            raise FileFormatError(
                path, f"bad format_version {metadata.get('format_version')!r}"
            ) from None
        if version != FORMAT_VERSION:
            raise FileFormatError(
                path, f"unsupported motion sequence format version {version} "
                f"(this build reads version {FORMAT_VERSION})"
            )
        missing = [k for k in ("descriptors", "f_rts", "boxes") if k not in keys]
        if missing:
            raise FileFormatError(path, f"missing tensors: {', '.join(missing)}")
        try:
            fps = json.loads(metadata["fps"])
            source_size = json.loads(metadata.get("source_size", "null"))
            filled = json.loads(metadata.get("filled_frames", "[]"))
            meta = json.loads(metadata.get("meta", "{}"))
            dim = int(metadata["descriptor_dim"])
        except (KeyError, ValueError) as exc:
            raise FileFormatError(path, f"missing or malformed metadata ({exc!r})") from exc
        desc = tensors["descriptors"]
        if desc.ndim != 2 or desc.shape[1] != dim:
            raise FileFormatError(
                path, f"descriptors have shape {tuple(desc.shape)} but the header says dim {dim}"
            )
        try:
            return cls(
                descriptors=desc,
                f_rts=tensors["f_rts"],
                boxes=tensors["boxes"],
                fps=fps,
                source_size=tuple(source_size) if source_size is not None else None,
                filled_frames=filled,
                reference_descriptor=tensors.get("reference_descriptor"),
                meta=meta,
            )
        except (InvalidInputError, TypeError) as exc:
            raise FileFormatError(path, f"invalid content: {exc}") from exc


# --------------------------------------------------------------------------------------------
# concatenation
# --------------------------------------------------------------------------------------------

def concat(*seqs: MotionSequence) -> MotionSequence:
    """Play the sequences one after another.

    The result takes ``fps``, ``meta`` and ``reference_descriptor`` of the first sequence (the
    first non-None reference if the first has none). Different descriptor dims are an error;
    different fps are allowed (frames are simply appended) but produce a ``UserWarning`` and a
    note in ``meta['warnings']``. ``source_size`` is kept only if all sequences agree.
    """
    if len(seqs) == 1 and isinstance(seqs[0], (list, tuple)):
        seqs = tuple(seqs[0])
    if not seqs:
        raise InvalidInputError("concat needs at least one MotionSequence")
    for k, s in enumerate(seqs):
        if not isinstance(s, MotionSequence):
            raise InvalidInputError(f"concat argument {k} is a {type(s).__name__}, not a MotionSequence")
    first = seqs[0]
    dims = [s.descriptor_dim for s in seqs]
    if len(set(dims)) > 1:
        raise InvalidInputError(
            f"cannot concatenate motion sequences with different descriptor dims {dims} "
            "(they come from different motion encoders)"
        )
    warning = None
    fps_list = [s.fps for s in seqs]
    if any(f != first.fps for f in fps_list):
        warning = (
            f"concat: sequences have different fps {fps_list}; frames were appended as they are "
            f"and play at {first.fps:g} fps (resample them first to keep their timing)"
        )
        warnings.warn(warning, UserWarning, stacklevel=2)
    offsets, filled, total = [], [], 0
    for s in seqs:
        filled.extend(i + total for i in s.filled_frames)
        offsets.append(total)
        total += len(s)
    sizes = {s.source_size for s in seqs}
    ref = next((s.reference_descriptor for s in seqs if s.reference_descriptor is not None), None)
    return MotionSequence(
        descriptors=torch.cat([s.descriptors for s in seqs]),
        f_rts=torch.cat([s.f_rts for s in seqs]),
        boxes=torch.cat([s.boxes for s in seqs]),
        fps=first.fps,
        source_size=first.source_size if len(sizes) == 1 else None,
        filled_frames=filled,
        reference_descriptor=ref,
        meta=first._meta_with(f"concat(frames={[len(s) for s in seqs]})", warning),
    )


# --------------------------------------------------------------------------------------------
# keyframes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False, repr=False)
class Keyframe:
    """One picked frame: its descriptor ``[D]``, ``f_rts`` ``[3]`` and box ``[4]`` (NaN if none),
    plus where it came from (``index``, ``fps``, ``source_size``, ``filled``,
    ``reference_descriptor``)."""

    descriptor: torch.Tensor
    f_rts: torch.Tensor
    box: torch.Tensor | None = None
    index: int = 0
    fps: float = 25.0
    source_size: tuple[int, int] | None = None
    filled: bool = False
    reference_descriptor: torch.Tensor | None = None

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        desc = _to_f32(self.descriptor, "keyframe descriptor")
        if desc.ndim != 1 or desc.numel() < 1:
            raise InvalidInputError(f"keyframe descriptor must have shape [dim], got {tuple(desc.shape)}")
        set_("descriptor", desc)
        rts = _to_f32(self.f_rts, "keyframe f_rts")
        if rts.shape != (3,):
            raise InvalidInputError(f"keyframe f_rts must have shape [3], got {tuple(rts.shape)}")
        set_("f_rts", rts)
        if self.box is None:
            box = torch.full((4,), float("nan"))
        else:
            box = _to_f32(self.box, "keyframe box")
            if box.shape != (4,):
                raise InvalidInputError(f"keyframe box must have shape [4], got {tuple(box.shape)}")
        set_("box", box)
        set_("fps", _positive_fps(self.fps))
        if self.source_size is not None:
            set_("source_size", tuple(int(v) for v in self.source_size))

    def __repr__(self) -> str:
        return (
            f"Keyframe(index={self.index}, dim={int(self.descriptor.shape[0])}, fps={self.fps:g}, "
            f"f_rts={[round(float(v), 4) for v in self.f_rts]}, filled={self.filled})"
        )

    @classmethod
    def from_sequence(cls, seq: MotionSequence, index: int) -> "Keyframe":
        i = seq._index(index, "keyframe index")
        return cls(
            descriptor=seq.descriptors[i],
            f_rts=seq.f_rts[i],
            box=seq.boxes[i],
            index=i,
            fps=seq.fps,
            source_size=seq.source_size,
            filled=i in set(seq.filled_frames),
            reference_descriptor=seq.reference_descriptor,
        )


@dataclass(frozen=True)
class ScheduleEntry:
    """Where a keyframe sits on the output timeline.

    ``frame``: output frame where the keyframe is reached. ``hold``: extra frames it is held
    afterwards (frames ``frame .. frame+hold`` are exact copies). ``easing``/``mode``: easing and
    descriptor interpolation of the segment *leaving* this keyframe (``None`` = the defaults given
    to :func:`interpolate_keyframes`; ignored on the last keyframe).
    """

    frame: int
    hold: int = 0
    easing: str | None = None
    mode: str | None = None


KeyframeLike = Union[Keyframe, tuple]  # Keyframe or (MotionSequence, frame_index)
ScheduleLike = Union[ScheduleEntry, int, tuple, Mapping]


def _as_keyframe(k, n: int) -> Keyframe:
    if isinstance(k, Keyframe):
        return k
    if isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], MotionSequence):
        return Keyframe.from_sequence(k[0], k[1])
    raise InvalidInputError(
        f"keyframe {n} must be a Keyframe or a (MotionSequence, frame_index) pair, got {type(k).__name__}"
    )


def _as_entry(e, n: int) -> ScheduleEntry:
    if isinstance(e, ScheduleEntry):
        entry = e
    elif isinstance(e, Mapping):
        unknown = set(e) - {"frame", "hold", "easing", "mode"}
        if unknown or "frame" not in e:
            raise InvalidInputError(
                f"schedule entry {n} must have 'frame' and optionally 'hold', 'easing', 'mode'; got keys {sorted(e)}"
            )
        entry = ScheduleEntry(**dict(e))
    elif isinstance(e, tuple) and 1 <= len(e) <= 4:
        entry = ScheduleEntry(*e)
    else:
        entry = ScheduleEntry(e)
    frame = _as_int(entry.frame, f"schedule entry {n} frame", minimum=0)
    hold = _as_int(entry.hold, f"schedule entry {n} hold", minimum=0)
    if entry.easing is not None:
        _check_easing(entry.easing)
    if entry.mode is not None:
        _check_mode(entry.mode)
    return ScheduleEntry(frame, hold, entry.easing, entry.mode)


def _per_segment(value, count: int, what: str) -> list:
    if isinstance(value, str):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise InvalidInputError(f"{what} needs one value per segment ({count}), got {len(values)}")
    return values


def interpolate_keyframes(
    keyframes: Sequence[KeyframeLike],
    schedule: int | Sequence[ScheduleLike],
    *,
    easing: str | Sequence[str] = "linear",
    mode: str | Sequence[str] = "linear",
    fps: float | None = None,
    reference_descriptor: TensorLike | None = None,
    meta: dict | None = None,
) -> MotionSequence:
    """Build a motion timeline that passes through ``keyframes`` at the scheduled frames.

    ``keyframes``: :class:`Keyframe` objects or ``(MotionSequence, frame_index)`` pairs, possibly
    from different clips (same descriptor dim).

    ``schedule``: an int ``N`` (keyframe ``k`` at frame ``k*N``), or one entry per keyframe: an int
    frame, a ``(frame, hold[, easing[, mode]])`` tuple, a dict with those keys, or a
    :class:`ScheduleEntry`. Frames must satisfy ``frame[k+1] > frame[k] + hold[k]``.

    Timeline: frames before the first keyframe hold it; keyframe ``k`` is copied exactly on frames
    ``frame[k] .. frame[k]+hold[k]``; frames strictly between ``s = frame[k]+hold[k]`` and
    ``e = frame[k+1]`` use ``w = easing((j - s) / (e - s))`` -- descriptors blended with ``mode``
    ('linear' or 'spherical', see :func:`blend`), ``f_rts`` always linearly with the same ``w``.
    The output has ``frame[-1] + hold[-1] + 1`` frames.

    ``easing``/``mode``: one name for all segments or a list with one per segment; schedule
    entries override them. ``fps`` defaults to the first keyframe's. ``reference_descriptor``
    defaults to the first keyframe that carries one. Boxes are interpolated only if all keyframes
    share a known ``source_size``; otherwise all boxes are NaN. Frames where a tracker-filled
    keyframe is copied are listed in ``filled_frames``.
    """
    kfs = [_as_keyframe(k, n) for n, k in enumerate(keyframes)]
    if not kfs:
        raise InvalidInputError("interpolate_keyframes needs at least one keyframe")
    if isinstance(schedule, (int, np.integer)) and not isinstance(schedule, bool):
        spacing = _as_int(schedule, "schedule spacing", minimum=1)
        entries = [ScheduleEntry(k * spacing) for k in range(len(kfs))]
    else:
        entries = [_as_entry(e, n) for n, e in enumerate(schedule)]
    if len(entries) != len(kfs):
        raise InvalidInputError(
            f"schedule has {len(entries)} entries but there are {len(kfs)} keyframes"
        )
    dims = {int(k.descriptor.shape[-1]) for k in kfs}
    if len(dims) > 1:
        raise InvalidInputError(f"keyframes have different descriptor dims {sorted(dims)}")
    for k in range(len(entries) - 1):
        a, b = entries[k], entries[k + 1]
        if b.frame <= a.frame + a.hold:
            raise InvalidInputError(
                f"keyframe {k + 1} is at frame {b.frame} but keyframe {k} is at frame {a.frame} "
                f"held for {a.hold} more frames; keyframe frames must increase past each hold"
            )
    n_seg = len(kfs) - 1
    seg_easing = [_check_easing(x) for x in _per_segment(easing, n_seg, "easing")] if n_seg else []
    seg_mode = [_check_mode(x) for x in _per_segment(mode, n_seg, "mode")] if n_seg else []
    for k in range(n_seg):
        if entries[k].easing is not None:
            seg_easing[k] = entries[k].easing
        if entries[k].mode is not None:
            seg_mode[k] = entries[k].mode

    total = entries[-1].frame + entries[-1].hold + 1
    dim = dims.pop()
    desc = torch.empty(total, dim, dtype=torch.float32)
    rts = torch.empty(total, 3, dtype=torch.float32)
    boxes = torch.full((total, 4), float("nan"), dtype=torch.float32)
    sizes = {k.source_size for k in kfs}
    common_size = sizes.pop() if len(sizes) == 1 else None
    keep_boxes = common_size is not None
    filled: list[int] = []

    def put_key(k: int, lo: int, hi: int):  # frames lo..hi-1 are exact copies of keyframe k
        kf = kfs[k]
        desc[lo:hi] = kf.descriptor.to(torch.float32)
        rts[lo:hi] = kf.f_rts.to(torch.float32)
        if keep_boxes:
            boxes[lo:hi] = kf.box.to(torch.float32)
        if kf.filled:
            filled.extend(range(lo, hi))

    put_key(0, 0, entries[0].frame + entries[0].hold + 1)
    for k in range(n_seg):
        s = entries[k].frame + entries[k].hold
        e = entries[k + 1].frame
        if e - s > 1:
            u = torch.arange(1, e - s, dtype=torch.float64) / (e - s)
            w = EASINGS[seg_easing[k]](u)
            a, b = kfs[k], kfs[k + 1]
            desc[s + 1:e] = blend(a.descriptor.float(), b.descriptor.float(), w, seg_mode[k])
            rts[s + 1:e] = _lerp_exact(a.f_rts.double(), b.f_rts.double(), w).float()
            if keep_boxes:
                boxes[s + 1:e] = _lerp_exact(a.box.double(), b.box.double(), w).float()
        put_key(k + 1, e, e + entries[k + 1].hold + 1)

    if reference_descriptor is None:
        reference_descriptor = next(
            (k.reference_descriptor for k in kfs if k.reference_descriptor is not None), None
        )
    out_meta = dict(meta or {})
    history = list(out_meta.get("history", []))
    history.append(
        f"interpolate_keyframes(n={len(kfs)}, frames={[x.frame for x in entries]}, "
        f"easing={seg_easing}, mode={seg_mode})"
    )
    out_meta["history"] = history[-_HISTORY_LIMIT:]
    return MotionSequence(
        descriptors=desc,
        f_rts=rts,
        boxes=boxes,
        fps=kfs[0].fps if fps is None else fps,
        source_size=common_size,
        filled_frames=filled,
        reference_descriptor=reference_descriptor,
        meta=out_meta,
    )


def keyframes_every(
    seq: MotionSequence,
    every: int,
    *,
    start: int = 0,
    include_last: bool = True,
    spacing: int | None = None,
) -> tuple[list[Keyframe], list[int]]:
    """Keyframes at frames ``start, start+every, ...`` of ``seq`` and a matching schedule.

    Returns ``(keyframes, frames)`` ready for ``interpolate_keyframes(keyframes, frames, ...)``.
    ``include_last`` also picks the last frame if the stride misses it. ``spacing=None`` keeps the
    source timing (schedule frame = source index - start); an int places keyframes ``spacing``
    frames apart instead (to stretch or squeeze the motion).
    """
    every = _as_int(every, "every", minimum=1)
    start = seq._index(start, "start")
    idx = list(range(start, len(seq), every))
    if include_last and idx[-1] != len(seq) - 1:
        idx.append(len(seq) - 1)
    kfs = [Keyframe.from_sequence(seq, i) for i in idx]
    if spacing is None:
        frames = [i - start for i in idx]
    else:
        spacing = _as_int(spacing, "spacing", minimum=1)
        frames = [k * spacing for k in range(len(idx))]
    return kfs, frames


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------

def _encoder_device_dtype(encoder) -> tuple[torch.device, torch.dtype]:
    params = getattr(encoder, "parameters", None)
    if callable(params):
        try:
            for p in params():
                if p.is_floating_point():
                    return p.device, p.dtype
        except TypeError:
            pass
    return torch.device("cpu"), torch.float32


def extract_motion(
    encoder,
    crops,
    f_rts,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run ``encoder.descriptor(images, f_rts)`` over all frames in batches.

    ``crops``: uint8 ``[F, H, W, 3]`` (224x224 for the release encoder), numpy or torch.
    ``f_rts``: ``[F, 3]`` float. Images are passed as ``[N, 3, H, W]`` in ``(u / 255) * 2 - 1``
    (computed in float32, then cast to ``dtype``). ``device``/``dtype`` default to those of the
    encoder's first floating parameter (CPU float32 if it has none). ``progress(done, total)`` is
    called after every batch; ``cancel()`` is polled before every batch and a true result raises
    :class:`~xnemo_core.errors.Cancelled`. The encoder's train/eval mode is left as is (a warning
    is issued if it is training: batch-norm statistics would then depend on the batch).

    Returns the ``[F, D]`` descriptors as CPU float32.
    """
    if not callable(getattr(encoder, "descriptor", None)):
        raise InvalidInputError("encoder must have a .descriptor(images, f_rts) method")
    if isinstance(crops, np.ndarray):
        if crops.dtype != np.uint8:
            raise InvalidInputError(f"crops must be uint8, got numpy {crops.dtype}")
        crops_t = torch.from_numpy(np.ascontiguousarray(crops))
    elif isinstance(crops, torch.Tensor):
        if crops.dtype != torch.uint8:
            raise InvalidInputError(f"crops must be uint8, got torch {crops.dtype}")
        crops_t = crops.detach().cpu()
    else:
        raise InvalidInputError(f"crops must be a numpy array or torch tensor, got {type(crops).__name__}")
    if crops_t.ndim != 4 or crops_t.shape[-1] != 3:
        raise InvalidInputError(f"crops must have shape [frames, H, W, 3], got {tuple(crops_t.shape)}")
    total = int(crops_t.shape[0])
    if total == 0:
        raise InvalidInputError("crops has no frames")
    rts = _to_f32(f_rts, "f_rts")
    if rts.shape != (total, 3):
        raise InvalidInputError(f"f_rts must have shape [{total}, 3], got {tuple(rts.shape)}")
    batch_size = _as_int(batch_size, "batch_size", minimum=1)
    enc_device, enc_dtype = _encoder_device_dtype(encoder)
    device = torch.device(device) if device is not None else enc_device
    dtype = dtype if dtype is not None else enc_dtype
    if isinstance(encoder, torch.nn.Module) and encoder.training:
        warnings.warn(
            "extract_motion: the encoder is in training mode; call .eval() for deterministic, "
            "batch-independent descriptors", UserWarning, stacklevel=2,
        )

    outputs: list[torch.Tensor] = []
    done = 0
    with torch.no_grad():
        while done < total:
            if cancel is not None and cancel():
                raise Cancelled(f"motion extraction cancelled after {done} of {total} frames")
            stop = min(done + batch_size, total)
            images = crops_t[done:stop].to(torch.float32).div(255.0).mul(2.0).sub(1.0)
            images = images.permute(0, 3, 1, 2).contiguous().to(device=device, dtype=dtype)
            batch_rts = rts[done:stop].to(device=device, dtype=dtype)
            out = encoder.descriptor(images, batch_rts)
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != stop - done:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InvalidInputError(
                    f"encoder.descriptor returned {shape}; expected a [{stop - done}, dim] tensor"
                )
            outputs.append(out.detach().to(device="cpu", dtype=torch.float32))
            done = stop
            if progress is not None:
                progress(done, total)
    return torch.cat(outputs).contiguous()
