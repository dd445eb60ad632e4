"""Driving-image augmentation (paper §3.3) and f_rts from face boxes.

The motion encoder must not learn appearance or where the head sits in the frame: that comes from
the reference and from f_rts. So the driving frame it sees is a face-centred square crop whose side
is randomly scaled (within ±30%), warped by a random piecewise affine mesh, and colour-jittered.
f_rts = (Δy/s_r, Δx/s_r, s_d/s_r) comes from the *un-augmented* face boxes, in the release's
y-first order (`xnemo_core.faces.compute_f_rts`, mode "paper"), so it always describes where the
target face really is relative to the reference face.

All randomness comes from a numpy Generator passed in, so a sample is a pure function of its seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xnemo_core.faces import compute_f_rts, crop_with_padding

from .config import AugmentSpec


@dataclass
class DrivingAugment:
    """One draw of augmentation parameters (shared by all frames of a clip)."""

    scale: float = 1.0
    warp: np.ndarray | None = None  # [G+1, G+1, 2] control-point displacements, fraction of the side
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # fraction of a full turn

    @classmethod
    def identity(cls) -> DrivingAugment:
        return cls()


def sample_augment(spec: AugmentSpec, rng: np.random.Generator) -> DrivingAugment:
    if not spec.enabled:
        return DrivingAugment.identity()

    def around_one(amount: float) -> float:
        return float(rng.uniform(1.0 - amount, 1.0 + amount)) if amount > 0 else 1.0

    warp = None
    if spec.warp_strength > 0 and spec.warp_grid > 0:
        g = spec.warp_grid
        warp = rng.normal(0.0, spec.warp_strength, size=(g + 1, g + 1, 2)).astype(np.float32)
        warp[0, :] = warp[-1, :] = 0.0  # the frame border stays put (no empty corners)
        warp[:, 0] = warp[:, -1] = 0.0
    return DrivingAugment(
        scale=around_one(spec.scale),
        warp=warp,
        brightness=around_one(spec.brightness),
        contrast=around_one(spec.contrast),
        saturation=around_one(spec.saturation),
        hue=float(rng.uniform(-spec.hue, spec.hue)) if spec.hue > 0 else 0.0,
    )


@dataclass
class PairAugment:
    """One draw of the paired appearance augmentation (AugmentSpec.pair_*), shared by the reference,
    its targets and (for the mirror) the driving frames of one sample."""

    flip: bool = False
    shift: tuple[float, float] = (0.0, 0.0)  # appearance crop centre offset (x, y), fraction of its side
    zoom: float = 1.0
    colour: DrivingAugment | None = None  # brightness/contrast/saturation/hue only

    @property
    def moves_crop(self) -> bool:
        return self.shift != (0.0, 0.0) or self.zoom != 1.0


def sample_pair_augment(spec: AugmentSpec, rng: np.random.Generator) -> PairAugment | None:
    """None when every pair_* amount is 0 (and then no random number is drawn, so samples of configs
    without it stay exactly as they were)."""
    if not (spec.pair_flip or spec.pair_colour or spec.pair_shift or spec.pair_zoom):
        return None
    flip = bool(rng.random() < spec.pair_flip)
    shift = tuple(float(v) for v in rng.uniform(-spec.pair_shift, spec.pair_shift, 2)) if spec.pair_shift else (0.0, 0.0)
    zoom = float(rng.uniform(1 - spec.pair_zoom, 1 + spec.pair_zoom)) if spec.pair_zoom else 1.0
    colour = None
    if spec.pair_colour:
        a = spec.pair_colour
        b, c, s = (float(v) for v in rng.uniform(1 - a, 1 + a, 3))
        colour = DrivingAugment(brightness=b, contrast=c, saturation=s, hue=float(rng.uniform(-a / 6, a / 6)))
    return PairAugment(flip, shift, zoom, colour)


def mirror_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """[..., 4] x0,y0,x1,y1 boxes of a frame `width` px wide, after mirroring the frame left-right."""
    out = np.array(boxes, dtype=np.float32, copy=True)
    out[..., 0], out[..., 2] = width - boxes[..., 2], width - boxes[..., 0]
    return out


def moved_box(box, shift: tuple[float, float], zoom: float) -> np.ndarray:
    """A square crop box moved by `shift` (fraction of its side) and scaled by `zoom` about its centre."""
    box = np.asarray(box, np.float64)
    side = max(box[2] - box[0], box[3] - box[1])
    return face_centred_box(box + side * np.array([shift[0], shift[1], shift[0], shift[1]]), 1.0, zoom)


def jitter_uint8(image: np.ndarray, colour: DrivingAugment) -> np.ndarray:
    """colour_jitter on a uint8 [H,W,3] image, back to uint8."""
    x = colour_jitter(to_unit_tensor(image), colour)
    return (x * 255).round().byte().permute(1, 2, 0).numpy()


def face_centred_box(face_box, crop_scale: float = 1.1, scale: float = 1.0) -> np.ndarray:
    """Square [x0, y0, x1, y1] of side crop_scale * scale * max(w, h) centred on the face box."""
    x0, y0, x1, y1 = (float(v) for v in face_box)
    side = max(x1 - x0, y1 - y0) * crop_scale * scale
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float64)


def crop_resize(frame: np.ndarray, box, size: int) -> np.ndarray:
    """uint8 crop of `box` (may leave the frame: zero padding), resized to size x size (bicubic)."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    side = max(x1 - x0, y1 - y0, 1)
    crop = crop_with_padding(frame, (x0, y0, x0 + side, y0 + side))
    if crop.shape[0] == size and crop.shape[1] == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC, reducing_gap=2.0))


def to_unit_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> float [3,H,W] in [0,1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


def piecewise_affine_displacement(warp: np.ndarray, size: int) -> torch.Tensor:
    """Dense displacement [size, size, 2] (x, y; fraction of the side) of a triangulated control mesh.

    The (G+1)x(G+1) control points sit on a regular grid; every grid cell is split along its
    diagonal into two triangles and the displacement is linear (barycentric) inside each triangle,
    so the warp is affine per triangle: a piecewise affine transform.
    """
    d = torch.as_tensor(warp, dtype=torch.float32)
    g = d.shape[0] - 1
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * g
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    i = gy.floor().clamp(0, g - 1).long()
    j = gx.floor().clamp(0, g - 1).long()
    fy, fx = (gy - i)[..., None], (gx - j)[..., None]
    d00, d01, d10, d11 = d[i, j], d[i, j + 1], d[i + 1, j], d[i + 1, j + 1]
    lower = d00 * (1 - fx - fy) + d01 * fx + d10 * fy
    upper = d11 * (fx + fy - 1) + d01 * (1 - fy) + d10 * (1 - fx)
    return torch.where(fx + fy <= 1, lower, upper)


def piecewise_affine_warp(image: torch.Tensor, warp: np.ndarray) -> torch.Tensor:
    """Warp [C,S,S] (or [N,C,S,S]) by the mesh `warp`: output(p) = input(p + displacement(p))."""
    batched = image.ndim == 4
    x = image if batched else image[None]
    size = x.shape[-1]
    disp = piecewise_affine_displacement(warp, size)
    base = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    by, bx = torch.meshgrid(base, base, indexing="ij")
    grid = torch.stack([bx, by], -1) + 2 * disp  # displacement is a fraction of the side; grid spans 2
    out = F.grid_sample(x, grid[None].expand(x.shape[0], -1, -1, -1).to(x), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out if batched else out[0]


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_jitter(image: torch.Tensor, aug: DrivingAugment) -> torch.Tensor:
    """Brightness, contrast, saturation and hue (a YIQ rotation) on [..., 3, H, W] in [0,1]."""
    def luma(t):
        return 0.299 * t[..., 0:1, :, :] + 0.587 * t[..., 1:2, :, :] + 0.114 * t[..., 2:3, :, :]

    x = image * aug.brightness
    mean = luma(x).mean(dim=(-2, -1), keepdim=True)
    x = (x - mean) * aug.contrast + mean
    gray = luma(x)
    x = gray + (x - gray) * aug.saturation
    if aug.hue:
        angle = 2 * math.pi * aug.hue
        c, s = math.cos(angle), math.sin(angle)
        rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
        matrix = torch.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ
        x = torch.einsum("ij,...jhw->...ihw", matrix.to(x), x)
    return x.clamp(0, 1)


def augment_driving(frame: np.ndarray, face_box, aug: DrivingAugment, size: int, crop_scale: float = 1.1) -> torch.Tensor:
    """The motion encoder's view of one driving frame: float [3,size,size] in [-1,1]."""
    crop = crop_resize(frame, face_centred_box(face_box, crop_scale, aug.scale), size)
    x = to_unit_tensor(crop)
    if aug.warp is not None:
        x = piecewise_affine_warp(x, aug.warp)
    x = colour_jitter(x, aug)
    return x * 2 - 1


def driving_f_rts(driving_boxes, reference_box, mode: str = "paper") -> np.ndarray:
    """[F,3] f_rts of driving face boxes relative to the reference face box (y-first, release order)."""
    return compute_f_rts(np.asarray(driving_boxes, np.float64).reshape(-1, 4), reference_box, mode=mode)
