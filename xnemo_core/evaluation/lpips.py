"""LPIPS (Zhang et al. 2018) in plain torch, from user-provided backbone weights.

LPIPS = sum over 5 backbone layers of the spatial mean of ``w_l . (f̂_l(x) - f̂_l(y))²``, where
``f̂`` are channel-normalised features (``f / (||f||_2 + 1e-10)`` over channels) and ``w_l`` are
the learned non-negative 1x1 "linear heads". Inputs are RGB in [-1,1], first shifted/scaled by the
ImageNet-like constants of the reference implementation.

What ships offline and what does not:

* the **linear heads** (v0.1 ``vgg.pth`` / ``alex.pth``, a few kB) ship inside the ``lpips`` wheel
  (install it with ``pip install --no-deps lpips``: its own dependency on torchvision is not
  needed). They are found without importing ``lpips``; or pass ``heads_path``.
* the **backbones** (torchvision's ImageNet VGG16 ``vgg16-397923af.pth`` or AlexNet
  ``alexnet-owt-7be5be79.pth``) do **not** ship offline. Give the file with ``--lpips-backbone``
  or ``$XNEMO_LPIPS_BACKBONE`` (.pth/.pt/.safetensors; torchvision key names ``features.N.*``, with
  or without the ``features.`` prefix; ``classifier.*`` keys are ignored). Without it the LPIPS
  column says ``absent: ...``.

Layers: VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision ``features`` indices 3, 8,
15, 22, 29); AlexNet relu1..relu5 (indices 1, 4, 7, 9, 11).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import MetricStatus, MetricUnavailable, env_path, package_file, user_file

ENV_BACKBONE = "XNEMO_LPIPS_BACKBONE"
ENV_HEADS = "XNEMO_LPIPS_HEADS"
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# torchvision `features` layouts: ("C", in, out, kernel, stride, padding) | ("R",) | ("M", kernel, stride)
VGG16_LAYOUT = []
for _cin, _cout, _pool in [(3, 64, 0), (64, 64, 1), (64, 128, 0), (128, 128, 1), (128, 256, 0), (256, 256, 0),
                           (256, 256, 1), (256, 512, 0), (512, 512, 0), (512, 512, 1), (512, 512, 0),
                           (512, 512, 0), (512, 512, 1)]:
    VGG16_LAYOUT += [("C", _cin, _cout, 3, 1, 1), ("R",)] + ([("M", 2, 2)] if _pool else [])
ALEXNET_LAYOUT = [("C", 3, 64, 11, 4, 2), ("R",), ("M", 3, 2), ("C", 64, 192, 5, 1, 2), ("R",), ("M", 3, 2),
                  ("C", 192, 384, 3, 1, 1), ("R",), ("C", 384, 256, 3, 1, 1), ("R",), ("C", 256, 256, 3, 1, 1),
                  ("R",), ("M", 3, 2)]
NETS = {
    # name: (layout, feature taps (index of the ReLU whose output is used), channels per tap)
    "vgg": (VGG16_LAYOUT, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
    "alex": (ALEXNET_LAYOUT, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
}
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth (torchvision VGG16 ImageNet)",
                  "alex": "alexnet-owt-7be5be79.pth (torchvision AlexNet ImageNet)"}


def build_features(net: str) -> nn.Sequential:
    """torchvision-compatible ``features`` stack (same indices, so state-dict keys match)."""
    layout = NETS[net][0]
    layers = []
    for spec in layout:
        if spec[0] == "C":
            _, cin, cout, k, s, p = spec
            layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
        elif spec[0] == "R":
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.MaxPool2d(spec[1], spec[2]))
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Backbone features + linear heads; ``forward(x, y)`` with x, y [N,3,H,W] in [-1,1] -> [N]."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
        self.net = net
        self.features = build_features(net)
        self.taps = NETS[net][1]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in NETS[net][2])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, last = [], self.taps[-1]
        x = (x - self.shift) / self.scale
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                out.append(x)
            if index >= last:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for fx, fy, head in zip(self._taps(x), self._taps(y), self.heads):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + head((nx - ny) ** 2).mean(dim=(2, 3))
        return total.view(-1)

    # ------------------------------------------------------------------ loading
    def load_backbone(self, state: dict[str, torch.Tensor], source: str = "backbone") -> None:
        wanted = self.features.state_dict()
        found = {}
        for key, value in state.items():
            k = key[len("module."):] if key.startswith("module.") else key
            k = k[len("features."):] if k.startswith("features.") else k
            if k in wanted:
                found[k] = value
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise MetricUnavailable(
                f"{source}: not a torchvision {self.net} backbone: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''} (expected keys like 'features.0.weight')")
        for key, value in found.items():
            if tuple(value.shape) != tuple(wanted[key].shape):
                raise MetricUnavailable(f"{source}: {key} has shape {tuple(value.shape)}, "
                                        f"expected {tuple(wanted[key].shape)} for {self.net}")
        self.features.load_state_dict({k: v.float() for k, v in found.items()})

    def load_heads(self, state: dict[str, torch.Tensor], source: str = "heads") -> None:
        for i, head in enumerate(self.heads):
            key = next((k for k in (f"lin{i}.model.1.weight", f"lin{i}.model.weight", f"heads.{i}.weight")
                        if k in state), None)
            if key is None or tuple(state[key].shape) != tuple(head.weight.shape):
                raise MetricUnavailable(f"{source}: no LPIPS {self.net} linear head {i} "
                                        f"(expected 'lin{i}.model.1.weight' of shape {tuple(head.weight.shape)})")
            head.weight.data.copy_(state[key].float())


def _read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from ..checkpoints import read_state_dict

    return read_state_dict(path)


def default_heads_path(net: str) -> Path | None:
    """The v0.1 linear heads shipped inside the ``lpips`` wheel (found without importing it)."""
    return package_file("lpips", "weights", "v0.1", f"{net}.pth")


def lpips_status(backbone: str | None = None, net: str = "vgg", heads: str | None = None) -> MetricStatus:
    heads = env_path(heads, ENV_HEADS) or default_heads_path(net)
    name = "LPIPS"
    backbone, absent = user_file(backbone, ENV_BACKBONE, "--lpips-backbone",
                                 f"backbone weights file {BACKBONE_FILES[net]}", "backbone")
    if absent:
        return MetricStatus(name, False, f"lpips-{net}", absent=absent)
    if heads is None:
        return MetricStatus(name, False, f"lpips-{net}", absent="needs the LPIPS linear heads: pip install --no-deps "
                                                                f"lpips==0.1.4 (or --lpips-heads / ${ENV_HEADS})")
    return MetricStatus(name, False, f"lpips-{net} ({Path(backbone).name})")


class LPIPSMetric:
    """Per-frame LPIPS between uint8 images (batched); build with :meth:`create`."""

    def __init__(self, model: LPIPS, device="cpu", batch_size: int = 8):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def create(cls, backbone: str | None = None, net: str = "vgg", heads: str | None = None, device="cpu"):
        status = lpips_status(backbone, net, heads)
        if status.absent:
            raise MetricUnavailable(status.absent)
        backbone = env_path(backbone, ENV_BACKBONE)
        heads = env_path(heads, ENV_HEADS) or default_heads_path(net)
        model = LPIPS(net)
        model.load_backbone(_read_state(backbone), str(backbone))
        model.load_heads(_read_state(heads), str(heads))
        return cls(model, device)

    @torch.no_grad()
    def __call__(self, a, b) -> np.ndarray:
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim == 3:
            a, b = a[None], b[None]
        out = []
        for start in range(0, len(a), self.batch_size):
            x = _to_model(a[start:start + self.batch_size], self.device)
            y = _to_model(b[start:start + self.batch_size], self.device)
            out.append(self.model(x, y).float().cpu())
        return torch.cat(out).numpy().astype(np.float64)


def _to_model(images: np.ndarray, device) -> torch.Tensor:
    x = torch.as_tensor(np.ascontiguousarray(images)).float()
    x = x / 255.0 if images.dtype == np.uint8 else x
    return (x * 2 - 1).movedim(-1, 1).to(device)
