"""The main job as three calls: load models, extract driving motion, animate a reference.

Why a module of its own: the CLI and the ComfyUI nodes are thin shells over exactly these calls,
so both behave identically (same crops, same defaults, same errors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import SamplingConfig
from .errors import Cancelled, InvalidInputError, XNeMoError
from .faces import BlazeFaceDetector, DrivingTrack, ReferenceCrop, crop_reference, track_driving
from .models.stack import XNeMoModels
from .motion import MotionSequence, extract_motion
from .pipeline import XNeMoPipeline, clip_pixels, to_model_range

ASSETS = Path(__file__).parent / "assets"
DEMO_MODEL = ASSETS / "demo_model.safetensors"
DEMO_REFERENCE = ASSETS / "astronaut.png"
DEMO_DRIVING = ASSETS / "driving_carphone.mp4"

StepFn = Callable[[int, int, "np.ndarray | None"], None]
CancelFn = Callable[[], bool]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_models(weights: str | None = None, device: str = "auto", precision: str = "auto") -> XNeMoModels:
    """weights: None/'demo' (bundled demo model), a bundle .safetensors, or a folder of the official release.

    The official release (xnemo_*.pth) is CC BY-NC 4.0: non-commercial use only.
    """
    from .checkpoints import CheckpointError, OfficialPaths, load_bundle, load_official, resolve_dtype

    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    if weights in (None, "", "demo"):
        if not DEMO_MODEL.is_file():
            raise CheckpointError(f"the bundled demo model is missing ({DEMO_MODEL}); reinstall the pack or pass weights")
        return load_bundle(DEMO_MODEL, device=dev, dtype=dtype)
    path = Path(weights)
    if path.is_dir():
        return load_official(OfficialPaths.from_folder(path), device=dev, dtype=dtype)
    if path.suffix == ".safetensors":
        return load_bundle(path, device=dev, dtype=dtype)
    raise CheckpointError(f"{path}: expected a bundle (.safetensors) or a folder with the official xnemo_*.pth files")


def native_resolution(models: XNeMoModels) -> int:
    """The frame size the model was trained at (512 for the official model)."""
    return int(models.config.unet.sample_size * models.vae_factor)


def prepare_reference_crop(models: XNeMoModels, image: np.ndarray, *, size: int | None = None,
                           face_select="largest", detector: BlazeFaceDetector | None = None,
                           box=None) -> ReferenceCrop:
    """Detect the reference face and make the appearance crop (size px) and the motion crop."""
    size = size or native_resolution(models)
    if size % 8:
        raise InvalidInputError(f"output size must be a multiple of 8, got {size}")
    return crop_reference(np.asarray(image), detector, box=box, face_select=face_select, appearance_size=size,
                          motion_size=models.config.motion_encoder.image_size)


@torch.no_grad()
def reference_descriptor(models: XNeMoModels, reference: ReferenceCrop) -> torch.Tensor:
    """The reference image's own motion descriptor (f_rts = (0,0,1)), used by CFG's negative branch."""
    enc = models.motion_encoder
    images = to_model_range(reference.motion[None]).to(models.device, models.dtype)
    f_rts = torch.tensor([[0.0, 0.0, 1.0]], device=models.device, dtype=models.dtype)
    return enc.descriptor(images, f_rts)[0].float().cpu()


@dataclass
class DrivingMotion:
    motion: MotionSequence
    track: DrivingTrack

    @property
    def report(self) -> str:
        t = self.track
        if not t.filled_frames:
            return f"face found in all {len(t)} frames"
        shown = ", ".join(str(i) for i in t.filled_frames[:20]) + (" ..." if len(t.filled_frames) > 20 else "")
        return (f"face found in {len(t) - len(t.filled_frames)}/{len(t)} frames; "
                f"boxes interpolated for frames {shown}")


def extract_driving_motion(models: XNeMoModels, frames: np.ndarray, fps: float, *,
                           reference: ReferenceCrop | None = None, detector: BlazeFaceDetector | None = None,
                           face_select="largest", smooth_sigma: float = 5.0, box_scale: float = 1.1,
                           f_rts_mode: str = "constant", batch_size: int = 16, source: str = "the driving video",
                           progress: Callable[[int, int], None] | None = None,
                           detect_progress: Callable[[int, int], None] | None = None,
                           cancel: CancelFn | None = None) -> DrivingMotion:
    """Track the face in every frame, crop it, and run the motion encoder once per frame (batched).

    `detect_progress(done, total)` follows face detection (per frame), `progress` the encoder (per
    batch); `cancel()` is polled in both phases.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InvalidInputError(f"{source}: expected frames [F,H,W,3], got {frames.shape}")
    def detection_progress(done: int, total: int) -> None:
        if cancel is not None and cancel():
            raise Cancelled(f"face tracking cancelled at frame {done}/{total} of {source}")
        if detect_progress is not None:
            detect_progress(done, total)

    track = track_driving(frames, fps, detector, progress=detection_progress, face_select=face_select, box_scale=box_scale,
                          smooth_sigma=smooth_sigma, crop_size=models.config.motion_encoder.image_size,
                          f_rts_mode=f_rts_mode, reference_box=None if reference is None else reference.face_box,
                          source=source)
    descriptors = extract_motion(models.motion_encoder, track.crops, track.f_rts, batch_size=batch_size,
                                 progress=progress, cancel=cancel)
    motion = MotionSequence(
        descriptors=descriptors, f_rts=torch.as_tensor(track.f_rts), boxes=torch.as_tensor(track.boxes).float(),
        fps=float(fps), source_size=track.source_size, filled_frames=list(track.filled_frames),
        reference_descriptor=None if reference is None else reference_descriptor(models, reference),
        meta={"source": str(source), "f_rts_mode": f_rts_mode, "smooth_sigma": smooth_sigma, "box_scale": box_scale},
    )
    return DrivingMotion(motion=motion, track=track)


@dataclass
class Animation:
    frames: np.ndarray  # [F,H,W,3] float32 in [0,1]
    fps: float
    reference: ReferenceCrop
    offsets: list = field(default_factory=list)

    def uint8(self) -> np.ndarray:
        return (self.frames * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


@torch.no_grad()
def animate(models: XNeMoModels, reference_image: np.ndarray, motion: MotionSequence,
            settings: SamplingConfig | None = None, *, size: int | None = None, reference: ReferenceCrop | None = None,
            face_select="largest", detector: BlazeFaceDetector | None = None, progress: StepFn | None = None,
            cancel: CancelFn | None = None, decode_chunk: int = 25) -> Animation:
    """Animate the reference portrait with `motion`; returns frames at the motion's fps."""
    if len(motion) == 0:
        raise InvalidInputError("the motion sequence is empty")
    expected = models.config.motion_encoder.descriptor_dim
    if motion.descriptors.shape[1] != expected:
        raise XNeMoError(f"motion descriptors have {motion.descriptors.shape[1]} channels but this model expects "
                         f"{expected}: extract the motion with the same model you sample with")
    if reference is None:
        reference = prepare_reference_crop(models, reference_image, size=size, face_select=face_select,
                                           detector=detector)
    pipe = XNeMoPipeline(models)
    ref_tensor = to_model_range(reference.appearance[None])
    prepared = pipe.prepare_reference(ref_tensor, clip_pixels(reference.appearance), to_model_range(reference.motion[None]))
    tokens = models.motion_encoder.tokens(motion.descriptors.to(models.device, models.dtype))
    result = pipe.sample(prepared, tokens, settings or SamplingConfig(), progress=progress, cancel=cancel,
                         decode_chunk=decode_chunk)
    frames = result.video[0].permute(1, 2, 3, 0).numpy().astype(np.float32)
    return Animation(frames=frames, fps=motion.fps, reference=reference, offsets=result.offsets)
