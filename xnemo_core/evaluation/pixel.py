"""Pixel metrics for self-reenactment: L1, PSNR and SSIM (always available, pure torch).

Images are uint8 ``[H,W,3]`` (or float in [0,1]); all metrics work in [0,1] units.

* **L1**: mean absolute difference over pixels and channels, in [0,1] (lower is better).
* **PSNR**: ``10 log10(1 / MSE)`` in dB, capped at 100 dB for identical images (higher is better).
* **SSIM**: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  data range 1, computed per RGB channel over the valid (unpadded) window positions and averaged;
  this equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)`` (higher is better, 1 = identical).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_unit_tensor(images) -> torch.Tensor:
    """uint8/float [..., H, W, 3] -> float64 [N, 3, H, W] in [0,1]."""
    x = torch.as_tensor(np.ascontiguousarray(images))
    x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
    if x.ndim == 3:
        x = x[None]
    return x.movedim(-1, 1)


def l1(a, b) -> np.ndarray:
    """Per-image mean absolute error in [0,1] units; a, b: [H,W,3] or [N,H,W,3]."""
    x, y = to_unit_tensor(a), to_unit_tensor(b)
    return (x - y).abs().mean(dim=(1, 2, 3)).numpy()


def psnr(a, b, max_db: float = 100.0) -> np.ndarray:
    x, y = to_unit_tensor(a), to_unit_tensor(b)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    out = 10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10.0)))
    return out.numpy()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a, b, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """Per-image SSIM (mean over channels and valid window positions)."""
    x, y = to_unit_tensor(a), to_unit_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    c = x.shape[1]
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} px")
    kernel = _gaussian_window(window, sigma).expand(c, 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()
