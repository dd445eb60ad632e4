"""X-NeMo Extract Motion: driving frames (IMAGE batch or core VIDEO) -> XNEMO_MOTION, crops, report, fps, audio."""
from __future__ import annotations

import numpy as np

from . import comfy_compat
from .common import (
    CATEGORY,
    FACE_CHOICES,
    FACE_TOOLTIP,
    MOTION,
    PIPE,
    XNeMoNodeError,
    cancel_requested,
    face_select,
    first_image,
    guarded,
    to_image,
)
from .media import driving_frames

F_RTS_MODES = ("constant", "paper")


def mark_filled(crops: np.ndarray, filled: list[int], width: int = 2) -> np.ndarray:
    """Crops with a red frame around those whose face box was interpolated (no detection)."""
    if not filled:
        return crops
    out = crops.copy()
    w = max(1, min(width, crops.shape[1] // 8))
    for i in filled:
        out[i, :w], out[i, -w:], out[i, :, :w], out[i, :, -w:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    return out


class XNeMoExtractMotion:
    DESCRIPTION = (
        "Tracks the face in every driving frame, crops it and encodes its motion once (cached by ComfyUI while "
        "you edit downstream nodes). Frames where no face is found get a box interpolated from their neighbours "
        "and are listed in the report (and framed red in the crops preview). A core VIDEO input keeps its fps "
        "and audio, passed on to Create Video.")
    CATEGORY = CATEGORY
    FUNCTION = "extract"
    RETURN_TYPES = (MOTION, "IMAGE", "STRING", "FLOAT", "AUDIO")
    RETURN_NAMES = ("motion", "crops", "report", "fps", "audio")
    OUTPUT_TOOLTIPS = (
        "The driving motion (per-frame motion descriptors + f_rts + face boxes + fps).",
        "The face crops the motion encoder saw (red frame = face box interpolated, no detection).",
        "Which frames had no detected face, and the frame count / fps used.",
        "Frame rate of the extracted motion (driving fps / frame_stride): connect it to Create Video.",
        "The driving audio cut to the frames used (None when the input has no audio).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "X-NeMo models from X-NeMo Load Model (the motion encoder is used)."}),
                "smooth_sigma": ("FLOAT", {
                    "default": 5.0, "min": 0.0, "max": 50.0, "step": 0.5,
                    "tooltip": "Gaussian smoothing (in frames) of the face-crop centre over time; removes crop "
                               "jitter. 0 = off. The release uses 5."}),
                "box_scale": ("FLOAT", {
                    "default": 1.1, "min": 1.0, "max": 3.0, "step": 0.05,
                    "tooltip": "Crop side = box_scale x the first frame's face box (the release uses 1.1)."}),
                "f_rts_mode": (list(F_RTS_MODES), {
                    "default": "constant",
                    "tooltip": "Head translation/scale conditioning. constant: (0,0,1) for every frame, as the "
                               "official release feeds. paper: the face box relative to the reference's face box "
                               "(needs the reference input)."}),
                "frame_stride": ("INT", {
                    "default": 1, "min": 1, "max": 100,
                    "tooltip": "Use every N-th driving frame (the output fps is divided by N, so speed is kept)."}),
                "max_frames": ("INT", {
                    "default": 0, "min": 0, "max": 100000,
                    "tooltip": "Use at most this many frames (after start_frame and frame_stride). 0 = all."}),
                "start_frame": ("INT", {
                    "default": 0, "min": 0, "max": 1000000,
                    "tooltip": "Skip this many driving frames first."}),
                "face": (list(FACE_CHOICES), {"default": "largest", "tooltip": FACE_TOOLTIP}),
                "fps": ("FLOAT", {
                    "default": 25.0, "min": 1.0, "max": 240.0, "step": 0.001,
                    "tooltip": "Frame rate of driving_images (connect Get Video Components' fps). Ignored for "
                               "driving_video, which carries its own."}),
            },
            "optional": {
                "driving_images": ("IMAGE", {"tooltip": "Driving frames as an IMAGE batch (e.g. from Get Video "
                                                        "Components or Load Video (VHS)). Use this or driving_video."}),
                "driving_video": ("VIDEO", {"tooltip": "Driving clip from core Load Video; decoded with start, "
                                                       "stride and max frames applied (low memory), fps and audio "
                                                       "kept. Use this or driving_images."}),
                "reference": ("IMAGE", {"tooltip": "The portrait to animate (first image used). Needed for "
                                                   "f_rts_mode 'paper'; also stores the reference's own motion."}),
                "audio": ("AUDIO", {"tooltip": "Audio that belongs to driving_images; passed on, cut to the "
                                               "frames used."}),
            },
        }

    @guarded("X-NeMo Extract Motion")
    def extract(self, pipe, smooth_sigma=5.0, box_scale=1.1, f_rts_mode="constant", frame_stride=1, max_frames=0,
                start_frame=0, face="largest", fps=25.0, driving_images=None, driving_video=None, reference=None,
                audio=None):
        from xnemo_core.animate import extract_driving_motion, prepare_reference_crop
        from xnemo_core.faces import BlazeFaceDetector

        if f_rts_mode == "paper" and reference is None:
            raise XNeMoNodeError("X-NeMo Extract Motion: f_rts_mode 'paper' measures the driving face relative to "
                                 "the reference's face: connect the reference image (or use 'constant')")
        driving = driving_frames(driving_images, driving_video, fps, start_frame, frame_stride, max_frames, audio)
        count = len(driving.frames)
        bar = comfy_compat.progress_bar(2 * count)

        def detected(done, total):  # phase 1: face detection, one update per frame
            bar.update_absolute(done, 2 * count)

        def encoded(done, total):  # phase 2: motion encoder, one update per batch
            bar.update_absolute(count + done, 2 * count)

        detector = BlazeFaceDetector()
        with pipe.on_device() as models:
            ref = None
            if reference is not None:
                ref = prepare_reference_crop(models, first_image(reference), face_select=face_select(face),
                                             detector=detector)
            result = extract_driving_motion(
                models, driving.frames, driving.fps, reference=ref, detector=detector,
                face_select=face_select(face), smooth_sigma=smooth_sigma, box_scale=box_scale, f_rts_mode=f_rts_mode,
                source=driving.source, progress=encoded, detect_progress=detected, cancel=cancel_requested)
        crops = mark_filled(result.track.crops, result.track.filled_frames)
        report = (f"{result.report}\n{count} frames at {driving.fps:.3f} fps from {driving.source} "
                  f"(start frame {driving.start_frame}, stride {driving.stride})")
        return (result.motion, to_image(crops), report, float(driving.fps), driving.audio)


NODE_CLASSES = {"XNeMoExtractMotion": (XNeMoExtractMotion, "X-NeMo Extract Motion")}
