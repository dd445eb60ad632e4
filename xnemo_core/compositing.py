"""Paste the animated face square back into the full reference image with a feathered edge.

Why: X-NeMo animates a square crop (about twice the face) of the reference; artists usually want the
whole picture back. Each frame is resized to the crop box and blended over the background with a
mask that ramps up from the box edges lying inside the image (edges outside the image, where the
crop was zero-padded, are never visible and get no ramp). Works on [F,H,W,C] float images in [0,1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InvalidInputError


def _ramp(length: int, feather_px: float, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D weights over a box side: smoothstep from 0 at a feathered edge to 1 at feather_px inside."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    if feather_px <= 0:
        return weight
    if ramp_start:
        weight = torch.minimum(weight, position / feather_px)
    if ramp_end:
        weight = torch.minimum(weight, (length - position) / feather_px)
    weight = weight.clamp(0, 1)
    return weight * weight * (3 - 2 * weight)


def feather_mask(box, image_hw: tuple[int, int], feather: float) -> torch.Tensor:
    """[H,W] float mask: 1 inside the box, ramping to 0 over ``feather`` x box side at inner edges."""
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = image_hw
    bw, bh = x1 - x0, y1 - y0
    feather_px = float(feather) * min(bw, bh)
    wx = _ramp(bw, feather_px, x0 > 0, x1 < width)
    wy = _ramp(bh, feather_px, y0 > 0, y1 < height)
    box_mask = wy[:, None] * wx[None, :]
    mask = torch.zeros(height, width)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if ix1 > ix0 and iy1 > iy0:
        mask[iy0:iy1, ix0:ix1] = box_mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
    return mask


def paste_back(background: torch.Tensor, frames: torch.Tensor, box, feather: float = 0.1,
               chunk: int = 16, out_device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """background IMAGE [1 or F,H,W,C], frames IMAGE [F,S,S,C], box (x0,y0,x1,y1) -> (IMAGE [F,H,W,3], MASK [1,H,W])."""
    count = int(frames.shape[0])
    if background.shape[0] not in (1, count):
        raise InvalidInputError(f"the reference has {background.shape[0]} images but there are {count} animated "
                                "frames; use one reference image or one per frame")
    height, width = int(background.shape[1]), int(background.shape[2])
    x0, y0, x1, y1 = (int(v) for v in box)
    mask = feather_mask((x0, y0, x1, y1), (height, width), feather)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    region = mask[iy0:iy1, ix0:ix1, None]
    out = torch.empty((count, height, width, 3), dtype=torch.float32, device=out_device)
    for start in range(0, count, chunk):
        part = frames[start:start + chunk, ..., :3].float().cpu()
        size = part.shape[0]
        bg = background[start:start + size] if background.shape[0] == count else background[:1].expand(size, -1, -1, -1)
        bg = bg[..., :3].float().cpu()
        fg = F.interpolate(part.permute(0, 3, 1, 2), size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True,
                           align_corners=False).permute(0, 2, 3, 1).clamp(0, 1)
        block = bg.clone()
        if ix1 > ix0 and iy1 > iy0:
            fg = fg[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
            block[:, iy0:iy1, ix0:ix1] = bg[:, iy0:iy1, ix0:ix1] * (1 - region) + fg * region
        out[start:start + size] = block.to(out.device)
    return out, mask[None]
