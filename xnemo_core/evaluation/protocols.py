"""The paper's two evaluation protocols (X-NeMo §4.2) on top of the engine's three calls.

* **Self-reenactment** (``protocol="self"``): for each driving video, frame 0 is the reference
  image and frames 1..F drive the model *and* are the ground truth. Generated frames live in the
  reference's appearance-crop space, so every ground-truth frame is cut with the reference's
  appearance box (``ReferenceCrop.appearance_box`` from frame 0) and resized to the output size
  exactly like the reference crop. Metrics: L1, SSIM, PSNR, LPIPS (with backbone weights).
* **Cross-reenactment** (``protocol="cross"``): every reference image x every driving video.
  Metrics: ID-SIM (reference crop vs generated frame; ArcFace with weights, dlib offline),
  AED/APD (driving frame vs generated frame, MediaPipe blendshapes / head pose) and EMO-SIM
  (EmoNet with weights, fer's 7-class model offline).

Each clip is also scored for the **repeat-reference baseline** (every output frame = the reference
crop): in self-reenactment it is the "nothing moves" floor; in cross-reenactment it has perfect
identity and shows how much expression/pose a method that does nothing would miss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .common import FaceBoxes, MetricStatus, MetricUnavailable, crop_space_face_box

MODEL_METHOD = "x-nemo"
BASELINE_METHOD = "repeat-reference"
Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------ results
@dataclass
class ClipResult:
    clip: str
    method: str
    per_frame: dict  # metric name -> np.ndarray [F] (NaN where the face analyser found no face)
    frames: int
    info: dict = field(default_factory=dict)

    def mean(self, name: str) -> float:
        values = np.asarray(self.per_frame.get(name, []), np.float64)
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else float("nan")

    def valid(self, name: str) -> int:
        return int(np.isfinite(np.asarray(self.per_frame.get(name, []), np.float64)).sum())


@dataclass
class EvaluationResult:
    protocol: str
    metrics: list  # [MetricStatus] in column order
    clips: list  # [ClipResult]
    settings: dict = field(default_factory=dict)
    media: dict = field(default_factory=dict)  # clip name -> frames for contact sheets / plots

    def methods(self) -> list[str]:
        seen = []
        for clip in self.clips:
            if clip.method not in seen:
                seen.append(clip.method)
        return seen

    def summary(self, method: str, name: str) -> float:
        """Mean over clips of the per-clip means."""
        values = [c.mean(name) for c in self.clips if c.method == method]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    def status(self, name: str) -> MetricStatus:
        return next(m for m in self.metrics if m.name == name)


# ------------------------------------------------------------------------------------------ metrics
class SelfMetrics:
    """L1 / SSIM / PSNR / LPIPS of generated vs ground-truth frames (same crop space and size)."""

    def __init__(self, lpips_backbone=None, lpips_net="vgg", lpips_heads=None, device="cpu"):
        from .lpips import LPIPSMetric, lpips_status

        self.statuses = [MetricStatus("L1", False, "mean |Δ| in [0,1]"),
                         MetricStatus("SSIM", True, "gaussian 11x11, σ 1.5"),
                         MetricStatus("PSNR", True, "dB")]
        status = lpips_status(lpips_backbone, lpips_net, lpips_heads)
        self.lpips = None
        if status.available:
            try:
                self.lpips = LPIPSMetric.create(lpips_backbone, lpips_net, lpips_heads, device)
            except MetricUnavailable as exc:  # wrong file: say so in the table
                status = MetricStatus("LPIPS", False, status.backend, absent=str(exc))
            except Exception as exc:  # noqa: BLE001 - e.g. an unreadable checkpoint
                status = MetricStatus("LPIPS", False, status.backend, absent=f"could not load: {exc}")
        self.statuses.append(status)

    def score(self, generated: np.ndarray, truth: np.ndarray) -> dict:
        from .pixel import l1, psnr, ssim

        out = {"L1": l1(generated, truth), "SSIM": ssim(generated, truth), "PSNR": psnr(generated, truth)}
        if self.lpips is not None:
            out["LPIPS"] = self.lpips(generated, truth)
        return out


class CrossMetrics:
    """ID-SIM / AED / APD / EMO-SIM; each backend is created once and reused for every clip."""

    def __init__(self, arcface=None, emonet=None, face_landmarker=None, device="cpu"):
        from . import emotion, expression, identity

        self.faces = FaceBoxes()
        self.statuses: list[MetricStatus] = []

        def make(status, factory):
            if not status.available:
                return status, None
            try:
                return status, factory()
            except MetricUnavailable as exc:
                return MetricStatus(status.name, status.higher_is_better, status.backend, absent=str(exc)), None
            except Exception as exc:  # noqa: BLE001 - a broken user file must not kill the run
                return MetricStatus(status.name, status.higher_is_better, status.backend,
                                    absent=f"could not load: {exc}"), None

        aed, self.analyzer = make(expression.aed_status(face_landmarker),
                                  lambda: expression.FaceAnalyzer(face_landmarker))
        apd = expression.apd_status(face_landmarker) if self.analyzer is not None else \
            MetricStatus("APD", False, aed.backend, absent=aed.absent)
        arc, self.arcface = make(identity.arcface_status(arcface),
                                 lambda: identity.ArcFaceIdentity(arcface, landmarks=self.analyzer, device=device))
        dl, self.dlib = make(identity.dlib_status(), lambda: identity.DlibIdentity(self.faces))
        match = MetricStatus("ID-MATCH(dlib)", True, "fraction with L2 < 0.6", absent=dl.absent)
        emo, self.emonet = make(emotion.emonet_status(emonet),
                                lambda: emotion.EmoNetValenceArousal(emonet, self.faces, device))
        fer_sim, fer_acc = emotion.fer_statuses()
        fer_sim, self.fer = make(fer_sim, lambda: emotion.FerEmotion(self.faces))
        if self.fer is None:
            fer_acc = MetricStatus(fer_acc.name, True, fer_acc.backend, absent=fer_sim.absent)
        found = MetricStatus("FACE-FOUND", True, "fraction of frames where FaceLandmarker finds a face "
                                                 "(AED/APD use only those)", absent=aed.absent)
        self.statuses = [arc, dl, match, aed, apd, found, emo, fer_sim, fer_acc]
        self._driving_cache: dict = {}

    def close(self):
        if self.analyzer is not None:
            self.analyzer.close()

    # one feature dict per image ------------------------------------------------------------
    def features(self, image: np.ndarray, fallback_box=None, *, identity: bool = False) -> dict:
        out: dict = {}
        analysis = self.analyzer.analyze(image) if self.analyzer is not None else None
        out["analysis"] = analysis
        if identity:
            if self.arcface is not None:
                out["arcface"] = self.arcface.embed(image, fallback_box)
            if self.dlib is not None:
                out["dlib"] = self.dlib.embed(image, fallback_box)
        if self.fer is not None:
            out["fer"] = self.fer.probabilities(image, fallback_box)
        if self.emonet is not None:
            out["emonet"] = self.emonet.valence_arousal(image, fallback_box)
        return out

    def driving_features(self, key: str, frames: np.ndarray) -> list[dict]:
        if key not in self._driving_cache:
            self._driving_cache[key] = [self.features(f) for f in frames]
        return self._driving_cache[key]

    def generated_features(self, frames: np.ndarray) -> list[dict]:
        box = crop_space_face_box(frames.shape[1:3])
        return [self.features(f, box, identity=True) for f in frames]

    def score(self, reference: dict, driving: list[dict], generated: list[dict]) -> dict:
        from .emotion import probability_cosine, top_agreement, va_similarity
        from .expression import expression_distance, pose_distance
        from .identity import ArcFaceIdentity, DlibIdentity

        out: dict = {}

        def column(name, fn):
            out[name] = np.array([fn(d, g) for d, g in zip(driving, generated)], np.float64)

        if self.arcface is not None:
            column("ID-SIM(ArcFace)", lambda d, g: ArcFaceIdentity.similarity(reference.get("arcface"), g.get("arcface")))
        if self.dlib is not None:
            column("ID-SIM(dlib)", lambda d, g: DlibIdentity.similarity(reference.get("dlib"), g.get("dlib")))
            column("ID-MATCH(dlib)", lambda d, g: DlibIdentity.match(reference.get("dlib"), g.get("dlib")))
        if self.analyzer is not None:
            column("AED", lambda d, g: expression_distance(d["analysis"], g["analysis"]))
            column("APD", lambda d, g: pose_distance(d["analysis"], g["analysis"]))
            column("FACE-FOUND", lambda d, g: float(g["analysis"] is not None))
        if self.emonet is not None:
            column("EMO-SIM(EmoNet)", lambda d, g: va_similarity(d.get("emonet"), g.get("emonet")))
        if self.fer is not None:
            column("EMO-SIM(fer)", lambda d, g: probability_cosine(d.get("fer"), g.get("fer")))
            column("EMO-ACC(fer)", lambda d, g: top_agreement(d.get("fer"), g.get("fer")))
        return out


# ------------------------------------------------------------------------------------------ running
@dataclass
class EvalSettings:
    frames: int = 24  # driving frames per clip (self: after the reference frame)
    stride: int = 1
    steps: int = 35
    cfg: float = 2.5
    seed: int = 0
    size: int | None = None
    context: int = 24
    overlap: int = 4
    scheduler: str = "ddim"
    closed_loop: bool = True
    decode_chunk: int = 25
    f_rts: str = "constant"
    baseline: bool = True
    start_fraction: float = 0.0  # start each driving clip this far into the video (e.g. 0.85: a held-out tail)
    init: str = "blurred_reference"  # sampler start latents (SamplingConfig.init)
    denoise: float = 1.0

    def sampling(self):
        from ..config import SamplingConfig

        return SamplingConfig(steps=self.steps, guidance_scale=self.cfg, seed=self.seed,
                              context_frames=self.context, context_overlap=self.overlap, scheduler=self.scheduler,
                              closed_loop=self.closed_loop, init=self.init, denoise=self.denoise)


def clip_name(path: str | Path) -> str:
    return Path(path).stem


def read_clip(path: str | Path, frames: int, settings: EvalSettings):
    """``frames`` frames (after ``stride``) starting ``start_fraction`` into the video."""
    from ..video import read_video

    if not 0.0 <= settings.start_fraction < 1.0:
        raise ValueError(f"start_fraction must be in [0, 1), got {settings.start_fraction}")
    if settings.start_fraction == 0.0:
        return read_video(path, max_frames=frames, stride=settings.stride)
    video = read_video(path, stride=settings.stride)
    first = int(round(len(video) * settings.start_fraction))
    video.frames = video.frames[first:first + frames]
    video.frame_indices = video.frame_indices[first:first + frames]
    return video


def ground_truth_crops(frames: np.ndarray, reference, size: int) -> np.ndarray:
    """Cut every frame with the reference's appearance box and resize it like the reference crop."""
    from ..faces import crop_with_padding, resize_antialiased

    return np.stack([resize_antialiased(crop_with_padding(np.asarray(f), reference.appearance_box), size)
                     for f in frames])


def _log(log: Log | None, text: str):
    if log is not None:
        log(text)


def run_self(models, driving: list[str], settings: EvalSettings, metrics: SelfMetrics,
             log: Log | None = None) -> EvaluationResult:
    from ..animate import animate, extract_driving_motion, prepare_reference_crop

    clips, media = [], {}
    for path in driving:
        name = clip_name(path)
        t0 = time.perf_counter()
        video = read_clip(path, settings.frames + 1, settings)
        if len(video) < 2:
            raise MetricUnavailable(f"{path}: self-reenactment needs at least 2 frames, got {len(video)}")
        reference_frame, drive = video.frames[0], video.frames[1:]
        ref = prepare_reference_crop(models, reference_frame, size=settings.size)
        size = ref.appearance.shape[0]
        motion = extract_driving_motion(models, drive, video.fps, reference=ref, f_rts_mode=settings.f_rts,
                                        source=str(path))
        t1 = time.perf_counter()
        generated = animate(models, reference_frame, motion.motion, settings.sampling(), reference=ref,
                            decode_chunk=settings.decode_chunk).uint8()
        t2 = time.perf_counter()
        truth = ground_truth_crops(drive, ref, size)
        info = {"motion_s": round(t1 - t0, 2), "sampling_s": round(t2 - t1, 2),
                "filled_frames": motion.track.filled_frames, "source": str(path),
                "source_frames": [int(i) for i in video.frame_indices[:1]] + [int(video.frame_indices[-1])]}
        clips.append(ClipResult(name, MODEL_METHOD, metrics.score(generated, truth), len(generated), info))
        if settings.baseline:
            still = np.repeat(ref.appearance[None], len(truth), axis=0)
            clips.append(ClipResult(name, BASELINE_METHOD, metrics.score(still, truth), len(still)))
        media[name] = {"reference": ref.appearance, "rows": {"ground truth": truth, MODEL_METHOD: generated},
                       "fps": video.fps}
        _log(log, f"self {name}: {len(generated)} frames, sampling {t2 - t1:.1f}s, "
                  + ", ".join(f"{k}={clips[-1 - settings.baseline].mean(k):.4f}" for k in clips[-1].per_frame))
    return EvaluationResult("self", list(metrics.statuses), clips, media=media)


def run_cross(models, references: list[str], driving: list[str], settings: EvalSettings, metrics: CrossMetrics,
              log: Log | None = None) -> EvaluationResult:
    from ..animate import animate, extract_driving_motion, prepare_reference_crop
    from ..video import read_image

    clips, media = [], {}
    tracks = {}
    for path in driving:
        video = read_clip(path, settings.frames, settings)
        motion = extract_driving_motion(models, video.frames, video.fps, f_rts_mode="constant", source=str(path))
        tracks[path] = (video, motion)
    for ref_path in references:
        image = read_image(ref_path)
        ref = prepare_reference_crop(models, image, size=settings.size)
        box = crop_space_face_box(ref.appearance.shape[:2])
        ref_feats = metrics.features(ref.appearance, box, identity=True)
        for path in driving:
            video, motion = tracks[path]
            name = f"{clip_name(ref_path)}~{clip_name(path)}"
            if settings.f_rts == "paper":
                motion = extract_driving_motion(models, video.frames, video.fps, reference=ref, f_rts_mode="paper",
                                                source=str(path))
            t0 = time.perf_counter()
            generated = animate(models, image, motion.motion, settings.sampling(), reference=ref,
                                decode_chunk=settings.decode_chunk).uint8()
            t1 = time.perf_counter()
            drv_feats = metrics.driving_features(str(path), video.frames)
            gen_feats = metrics.generated_features(generated)
            info = {"sampling_s": round(t1 - t0, 2), "metrics_s": round(time.perf_counter() - t1, 2),
                    "reference": str(ref_path), "driving": str(path),
                    "driving_faces_missing": sum(d["analysis"] is None for d in drv_feats),
                    "generated_faces_missing": sum(g["analysis"] is None for g in gen_feats)}
            clips.append(ClipResult(name, MODEL_METHOD, metrics.score(ref_feats, drv_feats, gen_feats),
                                    len(generated), info))
            if settings.baseline:
                still_feats = [metrics.features(ref.appearance, box, identity=True)] * len(generated)
                clips.append(ClipResult(name, BASELINE_METHOD, metrics.score(ref_feats, drv_feats, still_feats),
                                        len(generated)))
            media[name] = {"reference": ref.appearance, "fps": video.fps,
                           "rows": {"driving": motion.track.crops, MODEL_METHOD: generated}}
            model_clip = clips[-1 - settings.baseline]
            _log(log, f"cross {name}: {len(generated)} frames, sampling {t1 - t0:.1f}s, "
                      + ", ".join(f"{k}={model_clip.mean(k):.4f}" for k in model_clip.per_frame))
    return EvaluationResult("cross", list(metrics.statuses), clips, media=media)
