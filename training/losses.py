"""Losses: diffusion ε-loss schedule, VGG-19 / VGGFace perceptual losses (plain torch), GAN losses, SSIM.

The perceptual networks are written out here (no torchvision) with torchvision's layer indices, so
a VGG-19 state dict (`features.N.weight/bias`) loads from a file named in the config. VGGFace is
the VGG-16 topology; its weights load from the same `features.N.*` layout or the original
`conv1_1 ... conv5_3` names. Without a weight file they can be built at random (tests only: the
config must say `random_perceptual_ok: true`, and the log says so).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VGG19_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 and the usual pix2pixHD-style weights
PERCEPTUAL_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def release_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t of the release's scaled-linear schedule (the one its DDIM sampler uses), float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def reference_start_noise(noise: torch.Tensor, x0: torch.Tensor, reference: torch.Tensor,
                          alpha_bar_start: torch.Tensor) -> torch.Tensor:
    """The noise ε' = ε + √SNR(t0)·(z_ref − x0) that makes √ᾱ(t0)·x0 + √(1−ᾱ(t0))·ε' equal the reference
    start √ᾱ(t0)·z_ref + √(1−ᾱ(t0))·ε. DDIM keeps a perfect denoiser's implied noise fixed, so noising x0
    with ε' at any t ≤ t0 gives the latents a sample started from the reference passes through."""
    snr = alpha_bar_start / (1 - alpha_bar_start)
    return noise + snr.sqrt() * (reference - x0)


class VGGFeatures(nn.Module):
    """VGG conv stack (`features.N` like torchvision) returning the relu{1..5}_1 activations."""

    def __init__(self, layout, mean, std, input_range: float = 1.0, width_divisor: int = 1):
        super().__init__()
        layers, in_ch, relu_after_pool = [], 3, True
        self.taps = []
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                relu_after_pool = True
                continue
            out = max(4, item // width_divisor)
            layers += [nn.Conv2d(in_ch, out, 3, padding=1), nn.ReLU(inplace=False)]
            if relu_after_pool:
                self.taps.append(len(layers) - 1)  # index of the first ReLU after each pool
                relu_after_pool = False
            in_ch = out
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.input_range = input_range

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image [N,3,H,W] in [-1,1] -> five feature maps."""
        x = ((image + 1) / 2 * self.input_range - self.mean) / self.std
        out = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                out.append(x)
                if len(out) == len(self.taps):
                    break
        return out

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        state = {k: v for k, v in state.items() if k.startswith("features.")}
        self.load_state_dict(state, strict=True)


def vgg19(width_divisor: int = 1) -> VGGFeatures:
    """ImageNet VGG-19 (inputs normalised with ImageNet mean/std)."""
    return VGGFeatures(VGG19_LAYOUT, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0, width_divisor)


class VGGFace(VGGFeatures):
    """VGGFace (Parkhi et al. 2015; VGG-16 topology): RGB->BGR, 0-255, minus the dataset mean."""

    def __init__(self, width_divisor: int = 1):
        super().__init__(VGG16_LAYOUT, (93.5940, 104.7624, 129.1863), (1.0, 1.0, 1.0), 255.0, width_divisor)

    def forward(self, image):
        return super().forward(image.flip(1))  # RGB -> BGR; the mean above is in BGR order

    def load_weights(self, state):
        if not any(k.startswith("features.") for k in state):  # original conv{b}_{i} naming
            convs = [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
            names = [f"conv{b}_{i}" for b, n in enumerate([2, 2, 3, 3, 3], 1) for i in range(1, n + 1)]
            state = {f"features.{idx}.{k.split('.')[-1]}": state[f"{name}.{k.split('.')[-1]}"]
                     for idx, name in zip(convs, names) for k in ("weight", "bias")}
        super().load_weights(state)


def build_perceptual(kind: str, weights: str | None, random_ok: bool, width_divisor: int = 1) -> VGGFeatures:
    """A frozen VGG-19 ('vgg') or VGGFace ('vggface'), loaded from `weights` when given."""
    net = vgg19(width_divisor) if kind == "vgg" else VGGFace(width_divisor)
    if weights:
        if width_divisor != 1:
            raise ValueError("perceptual_width_divisor must be 1 when loading real perceptual weights")
        from xnemo_core.checkpoints import read_state_dict

        net.load_weights(read_state_dict(weights))
    elif not random_ok:
        key = "vgg19_weights" if kind == "vgg" else "vggface_weights"
        raise FileNotFoundError(
            f"loss.{key} is not set: the {kind} perceptual loss needs its weight file (a state dict with "
            f"features.N.* keys). Set loss.{key}, set its loss weight to 0, or (tests only) "
            "loss.random_perceptual_ok: true.")
    return net.eval().requires_grad_(False)


def perceptual_loss(net: VGGFeatures, fake: torch.Tensor, real: torch.Tensor,
                    layer_weights=PERCEPTUAL_LAYER_WEIGHTS) -> torch.Tensor:
    with torch.no_grad():
        real_feats = net(real)
    fake_feats = net(fake)
    return sum(w * F.l1_loss(a, b) for w, a, b in zip(layer_weights, fake_feats, real_feats))


def generator_adversarial(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic loss for the generator."""
    return F.softplus(-fake_logits).mean()


def discriminator_adversarial(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def feature_matching(fake_feats: list[torch.Tensor], real_feats: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.l1_loss(a, b.detach()) for a, b in zip(fake_feats, real_feats)) / len(fake_feats)


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------- metrics

def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         reduction: str = "mean") -> torch.Tensor:
    """SSIM (Wang et al. 2004) of [N,C,H,W] images: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03,
    valid-region statistics per channel, averaged over channels and pixels. reduction: mean | none ([N])."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = gaussian_window(window, sigma).to(x.device)
    kx = g.view(1, 1, 1, -1).expand(c, 1, 1, window)
    ky = g.view(1, 1, -1, 1).expand(c, 1, window, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    per_image = s.flatten(1).mean(1)
    return per_image.mean() if reduction == "mean" else per_image


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    mse = F.mse_loss(x.double(), y.double()).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)
