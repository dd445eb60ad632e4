"""The GAN head of stage 2: it gives the motion latent a direct image-space training signal.

* `AppearanceEncoder`: a ResNet (bottleneck blocks; [3,4,6,3] x width 64 = ResNet-50) on the
  reference image -> f_app. Parameter names follow torchvision's ResNet, so an ImageNet ResNet-50
  state dict loads from a file (the classifier `fc` is replaced by a projection to f_app).
* `StyleGenerator`: StyleGAN2-style synthesis (learned 4x4 constant, modulated + demodulated 3x3
  convolutions, skip toRGB outputs) whose style vector is an MLP of [f_app, f_mot]; f_mot is the
  motion encoder's 512-d descriptor. No per-pixel noise inputs, so it is a deterministic decoder.
* `Discriminator`: StyleGAN2-style residual discriminator that also returns its intermediate
  features (for the feature-matching loss).

Everything uses equalised learning rate (weights stored at unit scale, multiplied at run time).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GanSpec

# ----------------------------------------------------------------------------------------- ResNet

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or in_ch != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class AppearanceEncoder(nn.Module):
    """ResNet on the reference image ([-1,1]) -> f_app [N, dim]."""

    def __init__(self, dim: int = 512, width: int = 64, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_ch = width
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(in_ch, planes, stride=2 if (b == 0 and index > 0) else 1))
                in_ch = planes * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        self.num_layers = len(layers)
        self.fc = nn.Linear(in_ch, dim)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = ((image + 1) / 2 - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for index in range(self.num_layers):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(x.mean(dim=(2, 3)))

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision-layout ResNet state dict (its `fc` is ignored: ours projects to f_app)."""
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise ValueError(f"ResNet weights do not fit the appearance encoder: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")


# ----------------------------------------------------------------------------------------- StyleGAN2 pieces

class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x):
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activate else out


class ModulatedConv2d(nn.Module):
    """Conv whose input channels are scaled per sample by a style, then (optionally) demodulated."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel, kernel))
        self.scale = 1 / math.sqrt(in_ch * kernel * kernel)
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel // 2

    def forward(self, x, style):
        n, c, h, w = x.shape
        s = self.modulation(style).view(n, 1, c, 1, 1)
        weight = self.scale * self.weight * s
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            h, w = h * 2, w * 2
        out_ch = weight.shape[1]
        out = F.conv2d(x.reshape(1, n * c, h, w), weight.reshape(n * out_ch, c, *weight.shape[-2:]),
                       padding=self.padding, groups=n)
        return out.view(n, out_ch, h, w)


class StyledConv(nn.Module):
    def __init__(self, in_ch, out_ch, style_dim, upsample=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample)
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x, style):
        return F.leaky_relu(self.conv(x, style) + self.bias, 0.2) * math.sqrt(2)


class ToRGB(nn.Module):
    def __init__(self, in_ch, style_dim):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return out


def _channels(resolution: int, base: int, cap: int) -> int:
    return int(min(cap, max(8, base // resolution)))


class StyleGenerator(nn.Module):
    """[f_app, f_mot] -> image [N,3,R,R] in about [-1,1]."""

    def __init__(self, spec: GanSpec, motion_dim: int = 512):
        super().__init__()
        res = spec.resolution
        if res < 8 or res & (res - 1):
            raise ValueError(f"gan.resolution must be a power of two >= 8, got {res}")
        layers = [EqualLinear(spec.appearance_dim + motion_dim, spec.style_dim, lr_mul=0.01, activate=True)]
        layers += [EqualLinear(spec.style_dim, spec.style_dim, lr_mul=0.01, activate=True)
                   for _ in range(spec.mapping_layers - 1)]
        self.mapping = nn.Sequential(*layers)
        ch = {r: _channels(r, spec.channel_base, spec.channel_max) for r in [2**i for i in range(2, int(math.log2(res)) + 1)]}
        self.const = nn.Parameter(torch.randn(1, ch[4], 4, 4))
        self.conv1 = StyledConv(ch[4], ch[4], spec.style_dim)
        self.to_rgb1 = ToRGB(ch[4], spec.style_dim)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        r = 8
        while r <= res:
            self.convs.append(StyledConv(ch[r // 2], ch[r], spec.style_dim, upsample=True))
            self.convs.append(StyledConv(ch[r], ch[r], spec.style_dim))
            self.to_rgbs.append(ToRGB(ch[r], spec.style_dim))
            r *= 2

    def forward(self, f_app: torch.Tensor, f_mot: torch.Tensor) -> torch.Tensor:
        z = torch.cat([f_app, f_mot], dim=1)
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)  # pixel norm of the input code
        style = self.mapping(z)
        x = self.conv1(self.const.expand(z.shape[0], -1, -1, -1), style)
        rgb = self.to_rgb1(x, style)
        for i, to_rgb in enumerate(self.to_rgbs):
            x = self.convs[2 * i + 1](self.convs[2 * i](x, style), style)
            rgb = to_rgb(x, style, rgb)
        return rgb


class EqualConv2d(nn.Module):
    def __init__(self, in_ch, out_ch, kernel, stride=1, bias=True, activate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1 / math.sqrt(in_ch * kernel * kernel)
        self.stride, self.padding, self.activate = stride, kernel // 2, activate

    def forward(self, x):
        out = F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activate else out


class DiscBlock(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv1 = EqualConv2d(in_ch, in_ch, 3)
        self.conv2 = EqualConv2d(in_ch, out_ch, 3)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False, activate=False)

    def forward(self, x):
        y = self.conv2(F.avg_pool2d(self.conv1(x), 2))
        return (y + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


class Discriminator(nn.Module):
    """Image -> (logit [N], features [list of maps]) with a minibatch-stddev channel at 4x4."""

    def __init__(self, spec: GanSpec):
        super().__init__()
        res = spec.resolution
        ch = lambda r: _channels(r, spec.disc_channel_base, spec.disc_channel_max)
        self.from_rgb = EqualConv2d(3, ch(res), 1)
        blocks, r = [], res
        while r > 4:
            blocks.append(DiscBlock(ch(r), ch(r // 2)))
            r //= 2
        self.blocks = nn.ModuleList(blocks)
        self.final_conv = EqualConv2d(ch(4) + 1, ch(4), 3)
        self.final_linear = nn.Sequential(EqualLinear(ch(4) * 16, ch(4), activate=True), EqualLinear(ch(4), 1))

    def forward(self, image: torch.Tensor, groups: int = 1):
        """`groups` contiguous chunks of the batch (e.g. real ‖ fake) get their own minibatch-stddev."""
        x = self.from_rgb(image)
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        chunks = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        std = torch.sqrt(chunks.var(dim=1, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))
        std = std.repeat_interleave(x.shape[0] // groups).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
        x = self.final_conv(torch.cat([x, std], dim=1))
        features.append(x)
        return self.final_linear(x.flatten(1)).squeeze(1), features


class GanHead(nn.Module):
    """Appearance encoder + generator (trained with the motion encoder) and the discriminator."""

    def __init__(self, spec: GanSpec, motion_dim: int = 512):
        super().__init__()
        self.spec = spec
        self.appearance = AppearanceEncoder(spec.appearance_dim, spec.appearance_width, tuple(spec.appearance_layers))
        self.generator = StyleGenerator(spec, motion_dim)
        self.discriminator = Discriminator(spec)

    def generate(self, reference: torch.Tensor, f_mot: torch.Tensor) -> torch.Tensor:
        reference = resize_to(reference, self.spec.resolution)
        return self.generator(self.appearance(reference), f_mot)


def resize_to(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
