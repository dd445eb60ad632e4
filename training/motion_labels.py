"""Motion labels: what a face tracker reads from each frame, to give a from-scratch motion encoder a start.

Why this exists: the release's motion encoder is built on FAN, a landmark network, so its features
follow the face from the first step of stage 2. A motion encoder trained from scratch has no such
start. Stage 2 alone then washes out its weak dependence on the driving frame. On the demo run, the
batch spread of its FAN features fell from 0.02 to 0.001 in 150 steps, and to exactly 0 later: the
model ignored motion. Stage `motion_init` first trains the encoder to regress, from the driving
crop, the 52 MediaPipe blendshapes and the head pose (pitch, yaw, roll). Those are identity-agnostic
expression and pose numbers, the same ones AED/APD score.

Labels are computed once per source on the working-size frames and cached as JSON beside the face
boxes. Frames without a face get NaN rows, which the loss leaves out.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

BLENDSHAPES = 52
LABEL_DIM = BLENDSHAPES + 3  # + (pitch, yaw, roll)
POSE_SCALE = 30.0  # degrees per label unit: head poses in face videos span about ±30°
LABELLER_NAME = "mediapipe-blendshapes-pose"

Analyzer = Callable[[np.ndarray], "object | None"]  # image -> FaceAnalysis (blendshapes, pose) or None


def frame_labels(frames: np.ndarray, analyze: Analyzer) -> np.ndarray:
    """[F,H,W,3] uint8 -> [F, LABEL_DIM] float32: blendshapes, then pose / POSE_SCALE; NaN rows where no face."""
    out = np.full((len(frames), LABEL_DIM), np.nan, np.float32)
    for i, frame in enumerate(frames):
        face = analyze(frame)
        if face is not None:
            out[i, :BLENDSHAPES] = np.asarray(face.blendshapes, np.float32)[:BLENDSHAPES]
            out[i, BLENDSHAPES:] = np.asarray(face.pose, np.float32) / POSE_SCALE
    return out


def attach_motion_labels(videos, cache, fps: float, max_frames: int = 0, analyze: Analyzer | None = None,
                         log: Callable[[str], None] | None = None) -> None:
    """Set `video.motion_labels` on every video, from the cache or the MediaPipe FaceLandmarker."""
    for video in videos:
        h, w = video.frames.shape[1:3]
        name = f"{LABELLER_NAME}@{w}x{h}"  # labels are read on the working-size frames
        key = cache.key(video.source, fps, name, max_frames)
        labels = cache.get(key, width=LABEL_DIM, field="labels")
        if labels is None or len(labels) != len(video):
            if analyze is None:
                from xnemo_core.evaluation.expression import FaceAnalyzer

                analyze = FaceAnalyzer().analyze
            labels = frame_labels(video.frames, analyze)
            found = np.flatnonzero(~np.isnan(labels[:, 0])).tolist()
            cache.put(key, video.source, labels, found, name, field="labels")
        video.motion_labels = labels
        missing = int(np.isnan(labels[:, 0]).sum())
        if log:
            log(f"motion labels: {video.source.name}: {len(labels) - missing}/{len(labels)} frames with a face"
                + (" (the others are left out of the loss)" if missing else ""))
        if missing == len(labels):
            raise ValueError(f"{video.source.path}: the face tracker found no face in any frame, so stage "
                             "motion_init has nothing to learn from it; remove it from data.roots")


class MotionProbe(nn.Module):
    """Linear read-out descriptor -> standardised labels. Training-only: the bundle keeps the encoder.

    Labels are standardised per dimension (training frames' mean and std): raw blendshapes sit near
    their means, so an encoder predicting the mean loses little, and at a UNet learning rate the encoder
    went dead that way within 22 steps. Standardised, the mean scores 1.0 and only following the face
    pays.
    """

    def __init__(self, descriptor_dim: int):
        super().__init__()
        self.head = nn.Linear(descriptor_dim, LABEL_DIM)
        self.register_buffer("label_mean", torch.zeros(LABEL_DIM))
        self.register_buffer("label_std", torch.ones(LABEL_DIM))

    @torch.no_grad()
    def fit_label_scale(self, labels: np.ndarray) -> None:
        """Set the standardisation from the training frames' labels [N, LABEL_DIM] (NaN rows ignored)."""
        known = labels[~np.isnan(labels[:, 0])]
        if len(known) < 2:
            raise ValueError("stage motion_init needs at least two training frames with a face")
        self.label_mean.copy_(torch.from_numpy(known.mean(0)))
        self.label_std.copy_(torch.from_numpy(np.maximum(known.std(0), 1e-3)))

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        return self.head(descriptor)

    def loss(self, descriptor: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MSE to the standardised labels over the rows that have labels (a face was found)."""
        known = ~torch.isnan(labels[:, 0])
        if not bool(known.any()):
            return descriptor.sum() * 0.0
        target = (labels[known].float() - self.label_mean) / self.label_std
        return (self(descriptor[known]).float() - target).pow(2).mean()
