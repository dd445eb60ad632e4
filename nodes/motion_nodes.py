"""Motion editing nodes on XNEMO_MOTION: keyframe interpolation, slice, concat, loop, resample, info.

All of them are cheap CPU edits of per-frame motion descriptors (no model needed); each returns a
new motion and never changes its input, so ComfyUI's cache stays valid.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from xnemo_core.motion import EASING_NAMES, INTERPOLATION_MODES, MotionSequence

from .common import CATEGORY, MOTION, XNeMoNodeError, guarded

CLIPS = ("a", "b", "c", "d")
F_RTS_CHOICES = ("follow", "linear", "constant", "first_keyframe")
DEFAULT_SCHEDULE = "0: a[0]\n12: b[0] hold=4\n28: a[-1]"
_LINE = re.compile(r"^(\d+)\s*:\s*([A-Za-z])\s*\[\s*(-?\d+)\s*\]\s*(.*)$")
_MODE_ALIASES = {"linear": "linear", "spherical": "spherical", "slerp": "spherical", "lerp": "linear"}


def _with(seq: MotionSequence, **changes) -> MotionSequence:
    fields = {"descriptors": seq.descriptors, "f_rts": seq.f_rts, "boxes": seq.boxes, "fps": seq.fps,
              "source_size": seq.source_size, "filled_frames": seq.filled_frames,
              "reference_descriptor": seq.reference_descriptor, "meta": seq.meta}
    fields.update(changes)
    return MotionSequence(**fields)


# ------------------------------------------------------------------------------------------ schedule text

@dataclass
class ScheduleLine:
    frame: int
    clip: str
    index: int
    hold: int = 0
    easing: str | None = None
    mode: str | None = None

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("hold", self.hold), ("easing", self.easing), ("mode", self.mode))
                        if v)
        return f"{self.frame}: {self.clip}[{self.index}]{extra}"


SCHEDULE_HELP = ("one keyframe per line (or separated by ';'): OUTPUT_FRAME: CLIP[FRAME] [hold=N] [easing] [mode], "
                 "e.g. '24: b[10] hold=6 ease_in_out spherical'. CLIP is a-d (the motion inputs), FRAME counts from "
                 "0 (negative from the end). easing: " + ", ".join(EASING_NAMES) + "; mode: linear or spherical. "
                 "Easing and mode apply to the move that leaves the keyframe; '#' starts a comment.")


def parse_schedule(text: str) -> list[ScheduleLine]:
    entries: list[ScheduleLine] = []
    pieces = [p for raw in text.splitlines() for p in raw.split("#", 1)[0].split(";")]
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        match = _LINE.match(piece)
        if not match:
            raise XNeMoNodeError(f"X-NeMo Motion Keyframes: cannot read keyframe {piece!r}. Expected {SCHEDULE_HELP}")
        entry = ScheduleLine(int(match.group(1)), match.group(2).lower(), int(match.group(3)))
        tokens = re.sub(r"\s*=\s*", "=", match.group(4).strip()).lower().split()
        while tokens:
            token = tokens.pop(0)
            key, _, value = token.partition("=")
            if key == "hold" and not value and tokens and tokens[0].isdigit():
                value = tokens.pop(0)  # 'hold 4' as well as 'hold=4'
            if key == "hold" and value.isdigit():
                entry.hold = int(value)
            elif key == "easing" and value in EASING_NAMES:
                entry.easing = value
            elif key == "mode" and value in _MODE_ALIASES:
                entry.mode = _MODE_ALIASES[value]
            elif not value and key in EASING_NAMES:
                entry.easing = key
            elif not value and key in _MODE_ALIASES:
                entry.mode = _MODE_ALIASES[key]
            else:
                raise XNeMoNodeError(f"X-NeMo Motion Keyframes: unknown option {token!r} in {piece!r}. "
                                     f"Expected {SCHEDULE_HELP}")
        entries.append(entry)
    if not entries:
        raise XNeMoNodeError(f"X-NeMo Motion Keyframes: the schedule is empty. Expected {SCHEDULE_HELP}")
    return entries


def interpolate_schedule(clips: dict[str, MotionSequence], entries: list[ScheduleLine], easing: str = "linear",
                         mode: str = "linear", f_rts: str = "follow", fps: float = 0.0) -> MotionSequence:
    from xnemo_core.motion import Keyframe, ScheduleEntry, interpolate_keyframes

    keyframes = []
    for entry in entries:
        if entry.clip not in clips:
            available = ", ".join(sorted(clips)) or "none"
            raise XNeMoNodeError(f"X-NeMo Motion Keyframes: keyframe '{entry.describe()}' uses motion_{entry.clip}, "
                                 f"which is not connected (connected: {available})")
        keyframes.append(Keyframe.from_sequence(clips[entry.clip], entry.index))
    schedule = [ScheduleEntry(e.frame, e.hold, e.easing, e.mode) for e in entries]
    kwargs = {"fps": fps if fps and fps > 0 else None}
    result = interpolate_keyframes(keyframes, schedule, easing=easing, mode=mode, **kwargs)
    if f_rts == "follow":
        return result
    if f_rts == "linear":  # head translation/scale moves at constant speed, independent of the easing
        plain = [ScheduleEntry(e.frame, e.hold, "linear", "linear") for e in entries]
        rts = interpolate_keyframes(keyframes, plain, easing="linear", mode="linear", **kwargs).f_rts
    elif f_rts == "constant":  # the release's (0, 0, 1)
        rts = torch.zeros_like(result.f_rts)
        rts[:, 2] = 1.0
    elif f_rts == "first_keyframe":
        rts = keyframes[0].f_rts[None].expand_as(result.f_rts).clone()
    else:
        raise XNeMoNodeError(f"X-NeMo Motion Keyframes: unknown f_rts choice {f_rts!r}")
    return _with(result, f_rts=rts)


class XNeMoMotionKeyframes:
    DESCRIPTION = (
        "Builds a motion timeline from keyframes picked in up to four motions (a-d): each keyframe is one motion "
        "frame placed at an output frame, optionally held, and the moves between them are eased (per segment) "
        "and blended linearly or spherically in X-NeMo's motion space. Head translation/scale (f_rts) is handled "
        "separately. Schedule syntax: " + SCHEDULE_HELP)
    CATEGORY = CATEGORY
    FUNCTION = "interpolate"
    RETURN_TYPES = (MOTION, "STRING")
    RETURN_NAMES = ("motion", "summary")
    OUTPUT_TOOLTIPS = ("The interpolated motion timeline.", "The keyframes as read, and the output length.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion_a": (MOTION, {"tooltip": "Motion 'a' of the schedule."}),
                "schedule": ("STRING", {"default": DEFAULT_SCHEDULE, "multiline": True,
                                        "tooltip": "Keyframes, " + SCHEDULE_HELP}),
                "easing": (list(EASING_NAMES), {"default": "ease_in_out",
                                                "tooltip": "Default easing of every move (a keyframe line can set "
                                                           "its own)."}),
                "mode": (list(INTERPOLATION_MODES), {"default": "linear",
                                                     "tooltip": "Default blend of motion descriptors: linear, or "
                                                                "spherical (keeps the descriptor's magnitude on the "
                                                                "way; a line can set its own)."}),
                "f_rts": (list(F_RTS_CHOICES), {"default": "follow",
                                                "tooltip": "Head translation/scale: follow (same easing as the "
                                                           "motion), linear (constant speed), constant ((0,0,1) as "
                                                           "the release), first_keyframe (held)."}),
                "fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.001,
                                  "tooltip": "Frame rate of the result; 0 = that of the first keyframe's motion."}),
            },
            "optional": {name: (MOTION, {"tooltip": f"Motion '{name[-1]}' of the schedule."})
                         for name in ("motion_b", "motion_c", "motion_d")},
        }

    @guarded("X-NeMo Motion Keyframes")
    def interpolate(self, motion_a, schedule=DEFAULT_SCHEDULE, easing="ease_in_out", mode="linear", f_rts="follow",
                    fps=0.0, motion_b=None, motion_c=None, motion_d=None):
        clips = {k: v for k, v in zip(CLIPS, (motion_a, motion_b, motion_c, motion_d)) if v is not None}
        entries = parse_schedule(schedule)
        result = interpolate_schedule(clips, entries, easing, mode, f_rts, fps)
        summary = "\n".join(e.describe() for e in entries)
        summary += f"\n-> {len(result)} frames at {result.fps:g} fps (default easing {easing}, mode {mode}, f_rts {f_rts})"
        return (result, summary)


# ------------------------------------------------------------------------------------------ slice / concat / loop

class XNeMoMotionSlice:
    DESCRIPTION = "Keeps part of a motion: frames start .. start+length-1, every step-th frame."
    CATEGORY = CATEGORY
    FUNCTION = "slice"
    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The selected frames (same fps: a step above 1 plays faster).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "motion": (MOTION, {"tooltip": "The motion to cut."}),
            "start": ("INT", {"default": 0, "min": -1000000, "max": 1000000,
                              "tooltip": "First frame (negative counts from the end)."}),
            "length": ("INT", {"default": 0, "min": 0, "max": 1000000,
                               "tooltip": "Number of source frames to keep. 0 = up to the end."}),
            "step": ("INT", {"default": 1, "min": 1, "max": 1000, "tooltip": "Keep every step-th frame."}),
        }}

    @guarded("X-NeMo Motion Slice")
    def slice(self, motion, start=0, length=0, step=1):
        n = len(motion)
        first = max(0, n + start) if start < 0 else start
        stop = min(n, first + length) if length else n
        if first >= n:
            raise XNeMoNodeError(f"X-NeMo Motion Slice: start {start} is past the end of the {n}-frame motion")
        return (motion.slice(first, stop, step),)


class XNeMoMotionConcat:
    DESCRIPTION = "Plays motions one after another (a, then b, then c, then d)."
    CATEGORY = CATEGORY
    FUNCTION = "concat"
    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The joined motion (fps of motion_a).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion_a": (MOTION, {"tooltip": "Plays first; sets the fps of the result."}),
                "motion_b": (MOTION, {"tooltip": "Plays second."}),
                "fps_mismatch": (["resample", "append"], {
                    "default": "resample",
                    "tooltip": "When the clips have different fps: resample them to motion_a's fps (keeps their "
                               "speed) or append the frames as they are."}),
            },
            "optional": {
                "motion_c": (MOTION, {"tooltip": "Plays third."}),
                "motion_d": (MOTION, {"tooltip": "Plays fourth."}),
            },
        }

    @guarded("X-NeMo Motion Concat")
    def concat(self, motion_a, motion_b, fps_mismatch="resample", motion_c=None, motion_d=None):
        import warnings

        from xnemo_core.motion import concat

        parts = [m for m in (motion_a, motion_b, motion_c, motion_d) if m is not None]
        if fps_mismatch == "resample":
            parts = [p if abs(p.fps - motion_a.fps) < 1e-6 else p.resample(motion_a.fps) for p in parts]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # noted in the motion's meta['warnings']
            return (concat(*parts),)


class XNeMoMotionLoop:
    DESCRIPTION = ("Repeats a motion: as it is, forward-and-back (ping-pong, seamless) or reversed; either a number "
                   "of times or until an exact frame count (to drive long videos from a short clip).")
    CATEGORY = CATEGORY
    FUNCTION = "loop"
    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The looped motion.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "motion": (MOTION, {"tooltip": "The motion to repeat."}),
            "mode": (["repeat", "ping_pong", "reverse"], {
                "default": "ping_pong",
                "tooltip": "repeat: play again from the start. ping_pong: forward then backward, no jump at the "
                           "seams. reverse: the motion played backwards, repeated."}),
            "times": ("INT", {"default": 2, "min": 1, "max": 10000,
                              "tooltip": "How many times to play it (ping_pong: forward+back counts once)."}),
            "frames": ("INT", {"default": 0, "min": 0, "max": 1000000,
                               "tooltip": "If above 0: loop until exactly this many frames (times is ignored)."}),
        }}

    @guarded("X-NeMo Motion Loop")
    def loop(self, motion, mode="ping_pong", times=2, frames=0):
        if mode == "ping_pong":
            unit = motion.ping_pong(loopable=True) if len(motion) > 1 else motion
        elif mode == "reverse":
            unit = motion.reverse()
        elif mode == "repeat":
            unit = motion
        else:
            raise XNeMoNodeError(f"X-NeMo Motion Loop: unknown mode {mode!r}")
        if frames and frames > 0:
            return (unit.loop(math.ceil(frames / len(unit))).slice(0, frames),)
        return (unit.loop(times),)


class XNeMoMotionResample:
    DESCRIPTION = "Changes a motion's frame rate keeping its duration (frames are blended in between)."
    CATEGORY = CATEGORY
    FUNCTION = "resample"
    RETURN_TYPES = (MOTION, "FLOAT")
    RETURN_NAMES = ("motion", "fps")
    OUTPUT_TOOLTIPS = ("The motion at the new frame rate.", "The new frame rate (for Create Video).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "motion": (MOTION, {"tooltip": "The motion to retime."}),
            "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 240.0, "step": 0.001,
                              "tooltip": "The new frame rate."}),
            "mode": (list(INTERPOLATION_MODES), {"default": "linear",
                                                 "tooltip": "How in-between descriptors are blended."}),
        }}

    @guarded("X-NeMo Motion Resample")
    def resample(self, motion, fps=25.0, mode="linear"):
        result = motion.resample(fps, mode)
        return (result, float(result.fps))


class XNeMoMotionInfo:
    DESCRIPTION = "Shows a motion's length, frame rate, filled (no-face) frames and edit history."
    CATEGORY = CATEGORY
    FUNCTION = "info"
    RETURN_TYPES = ("STRING", "INT", "FLOAT")
    RETURN_NAMES = ("info", "frames", "fps")
    OUTPUT_TOOLTIPS = ("A readable summary.", "Number of frames.", "Frame rate.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"motion": (MOTION, {"tooltip": "The motion to describe."})}}

    @guarded("X-NeMo Motion Info")
    def info(self, motion):
        return (describe(motion), len(motion), float(motion.fps))


def describe(motion: MotionSequence) -> str:
    head = f"{len(motion)} frames at {motion.fps:g} fps ({motion.duration:.2f} s), descriptor dim {motion.descriptor_dim}"
    lines = [head]
    if motion.source_size:
        lines.append(f"source: {motion.meta.get('source', '?')} ({motion.source_size[0]}x{motion.source_size[1]})")
    if motion.filled_frames:
        shown = ", ".join(map(str, motion.filled_frames[:20])) + (" ..." if len(motion.filled_frames) > 20 else "")
        lines.append(f"{len(motion.filled_frames)} frame(s) without a detected face: {shown}")
    for note in motion.meta.get("history", [])[-8:]:
        lines.append(f"edit: {note}")
    for note in motion.meta.get("warnings", []):
        lines.append(f"warning: {note}")
    return "\n".join(lines)


NODE_CLASSES = {
    "XNeMoMotionKeyframes": (XNeMoMotionKeyframes, "X-NeMo Motion Keyframes (Interpolate)"),
    "XNeMoMotionSlice": (XNeMoMotionSlice, "X-NeMo Motion Slice"),
    "XNeMoMotionConcat": (XNeMoMotionConcat, "X-NeMo Motion Concat"),
    "XNeMoMotionLoop": (XNeMoMotionLoop, "X-NeMo Motion Loop"),
    "XNeMoMotionResample": (XNeMoMotionResample, "X-NeMo Motion Resample (fps)"),
    "XNeMoMotionInfo": (XNeMoMotionInfo, "X-NeMo Motion Info"),
}
