"""X-NeMo Animate: reference IMAGE + XNEMO_MOTION -> animated IMAGE frames (progress bar, preview, Cancel)."""
from __future__ import annotations

import math

from . import comfy_compat
from .common import (
    CATEGORY,
    CROP,
    FACE_CHOICES,
    FACE_TOOLTIP,
    MOTION,
    PIPE,
    ReferenceInfo,
    XNeMoNodeError,
    cancel_requested,
    face_select,
    first_image,
    guarded,
    preview,
    to_image,
)

SCHEDULERS = ("ddim", "dpmpp_2m", "euler")  # = xnemo_core.config.SCHEDULERS (checked by the tests)
INITS = ("blurred_reference", "reference", "noise")  # = xnemo_core.config.INITS (checked by the tests)
MAX_SEED = 0xFFFFFFFFFFFFFFFF


DECODE_CHUNK = 25  # frames per VAE decode call (the engine's default)


class _WindowProgress:
    """One progress bar over every context window of every step, then the decode chunks.

    The engine reports once per denoising step (with a latent preview) and polls ``cancel()`` before
    each context window and each decode chunk; both move the bar, so it advances every window (seconds)
    rather than every step (can be minutes for long clips on a CPU), and ComfyUI's progress hook gets a
    chance to stop the run at every window.
    """

    def __init__(self, frames: int, settings):
        from xnemo_core.windows import context_windows

        windows = context_windows(frames, settings.context_frames, settings.context_overlap, 0, settings.closed_loop)
        self.per_step = len(windows)
        self.total = settings.steps * self.per_step + math.ceil(frames / DECODE_CHUNK)
        self.ticks = 0  # calls to cancel() so far: windows (then decode chunks) started
        self.shown = 0
        self.bar = comfy_compat.progress_bar(self.total)

    def _show(self, value: int, preview_tuple=None) -> None:
        value = min(value, self.total)
        if value > self.shown or preview_tuple is not None:
            self.shown = max(self.shown, value)
            self.bar.update_absolute(value, self.total, preview_tuple)

    def cancel(self) -> bool:
        if cancel_requested():
            return True
        self._show(self.ticks)  # everything before this window/chunk is done
        self.ticks += 1
        return False

    def step(self, done: int, total: int, latent_preview) -> None:
        self.ticks = done * self.per_step
        self._show(self.ticks, preview(latent_preview))

    def done(self) -> None:
        self._show(self.total)


def check_context(context_frames, context_overlap) -> str | None:
    if context_frames is not None and context_overlap is not None and context_overlap >= context_frames:
        return (f"context_overlap ({context_overlap}) must be smaller than context_frames ({context_frames}): "
                f"windows advance by context_frames - context_overlap frames")
    return None


class XNeMoSampler:
    DESCRIPTION = (
        "Animates the reference portrait with the motion: the face is detected and cropped (square, size px), "
        "then sampled with classifier-free guidance over overlapping context windows, so clips of any length "
        "work. The progress bar moves with every window and shows a preview after each step; Cancel stops "
        "within one window. Use X-NeMo Paste "
        "Back to put the animated square back into the full reference image.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE", "FLOAT", CROP)
    RETURN_NAMES = ("frames", "fps", "crop")
    OUTPUT_TOOLTIPS = (
        "The animated face crop, one image per motion frame.",
        "Frame rate of the motion: connect it to Create Video's fps.",
        "Where the animated square sits in the reference image (for X-NeMo Paste Back).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "X-NeMo models from X-NeMo Load Model."}),
                "reference": ("IMAGE", {"tooltip": "The portrait to animate (the first image of the batch)."}),
                "motion": (MOTION, {"tooltip": "Motion from X-NeMo Extract Motion, Load Motion or the motion "
                                               "editing nodes; one output frame per motion frame."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the noise and of the context-window offsets."}),
                "steps": ("INT", {"default": 35, "min": 1, "max": 200,
                                  "tooltip": "Denoising steps (release: 35; the demo model is fine with 4-8)."}),
                "cfg": ("FLOAT", {"default": 2.5, "min": 1.0, "max": 20.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (release: 2.5). 1.0 turns guidance "
                                             "off and halves the work."}),
                "scheduler": (list(SCHEDULERS), {"default": "ddim",
                                                 "tooltip": "Sampler: ddim (the release's), dpmpp_2m or euler."}),
                "context_frames": ("INT", {"default": 24, "min": 2, "max": 128,
                                           "tooltip": "Frames per context window (release: 24; at most the "
                                                      "model's temporal length, 32 for the official model)."}),
                "context_overlap": ("INT", {"default": 4, "min": 0, "max": 127,
                                            "tooltip": "Frames shared by neighbouring windows (release: 4); more "
                                                       "overlap = smoother seams, more work."}),
                "size": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8,
                                 "tooltip": "Side of the animated square in px (multiple of 8). 0 = the model's "
                                            "native size (512 official, 64 demo)."}),
                "face": (list(FACE_CHOICES), {"default": "largest", "tooltip": FACE_TOOLTIP}),
                "init": (list(INITS), {"default": "blurred_reference",
                                       "tooltip": "Start latents: the blurred, noised reference (release), the "
                                                  "sharp noised reference (for denoise < 1) or pure noise."}),
                "closed_loop": ("BOOLEAN", {"default": True,
                                            "tooltip": "Context windows wrap from the clip's end to its start (as "
                                                       "the release). Turn off for clips whose end and start "
                                                       "should not influence each other."}),
            },
            "optional": {
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "As in KSampler: 1.0 starts from (almost) pure noise like the "
                                                 "release; lower values start part-way down the schedule from "
                                                 "the noised init latent and stay closer to the reference."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, context_frames=None, context_overlap=None, size=None):
        problem = check_context(context_frames, context_overlap)
        if problem:
            return f"X-NeMo Animate: {problem}"
        if size is not None and size % 8:
            return f"X-NeMo Animate: size must be a multiple of 8 (or 0 for the native size), got {size}"
        return True

    @guarded("X-NeMo Animate")
    def sample(self, pipe, reference, motion, seed=0, steps=35, cfg=2.5, scheduler="ddim", context_frames=24,
               context_overlap=4, size=0, face="largest", init="blurred_reference", closed_loop=True, denoise=1.0):
        from xnemo_core.animate import animate, prepare_reference_crop
        from xnemo_core.config import SamplingConfig

        problem = check_context(context_frames, context_overlap)
        if problem:
            raise XNeMoNodeError(f"X-NeMo Animate: {problem}")
        limit = pipe.models.config.unet.temporal_max_len
        if min(context_frames, len(motion)) > limit:
            raise XNeMoNodeError(f"X-NeMo Animate: context_frames {context_frames} is more than this model's "
                                 f"temporal modules see ({limit}); use {limit} or less")
        settings = SamplingConfig(steps=int(steps), guidance_scale=float(cfg), scheduler=scheduler,
                                  context_frames=int(context_frames), context_overlap=int(context_overlap),
                                  closed_loop=bool(closed_loop), init=init, denoise=float(denoise),
                                  seed=int(seed))
        image = first_image(reference)
        progress = _WindowProgress(len(motion), settings)
        with pipe.on_device() as models:
            crop = prepare_reference_crop(models, image, size=size or None, face_select=face_select(face))
            result = animate(models, image, motion, settings, reference=crop, progress=progress.step,
                             cancel=progress.cancel, decode_chunk=DECODE_CHUNK)
        progress.done()
        frames = to_image(result.frames)
        return (frames, float(result.fps), ReferenceInfo(crop=crop, size=int(frames.shape[1])))


NODE_CLASSES = {"XNeMoSampler": (XNeMoSampler, "X-NeMo Animate (Sampler)")}
