"""Strong, semantics-preserving augmentations as batched tensor functions (per-image randomness).

Used by semantic-focused (SimCLR-style) pretraining in the zoo: random resized crop, colour jitter,
grayscale, blur and additive noise. Inputs and outputs are float images in [0, 1], N x C x H x W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from benchmark.errors import UEBenchError
from benchmark.training import random_flip


def _u(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, scale=(0.35, 1.0), ratio=(0.75, 1.33)) -> torch.Tensor:
    """A random box per image (area fraction in ``scale``), resized back to the input size."""
    n, _, h, w = x.shape
    area = torch.rand(n, generator=gen) * (scale[1] - scale[0]) + scale[0]
    log_r = torch.rand(n, generator=gen) * (torch.log(torch.tensor(ratio[1])) - torch.log(torch.tensor(ratio[0])))
    r = torch.exp(log_r + torch.log(torch.tensor(ratio[0])))
    bw = (torch.sqrt(area * r) * w).clamp(2, w)
    bh = (torch.sqrt(area / r) * h).clamp(2, h)
    x0 = torch.rand(n, generator=gen) * (w - bw)
    y0 = torch.rand(n, generator=gen) * (h - bh)
    boxes = torch.stack([torch.arange(n, dtype=torch.float), x0, y0, x0 + bw, y0 + bh], 1).to(x)
    return roi_align(x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def color_jitter(x: torch.Tensor, gen: torch.Generator, strength: float = 0.4, p: float = 0.8) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    apply = (torch.rand(n, generator=gen) < p).to(dev)[:, None, None, None]
    b = _u(n, 1 - strength, 1 + strength, gen, dev)[:, None, None, None]
    c = _u(n, 1 - strength, 1 + strength, gen, dev)[:, None, None, None]
    s = _u(n, 1 - strength, 1 + strength, gen, dev)[:, None, None, None]
    y = x * b
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean
    gray = grayscale(y)
    y = (y - gray) * s + gray
    return torch.where(apply, y.clamp(0, 1), x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x * w).sum(1, keepdim=True).expand_as(x)


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    apply = (torch.rand(x.shape[0], generator=gen) < p).to(x.device)[:, None, None, None]
    return torch.where(apply, grayscale(x), x)


def random_blur(x: torch.Tensor, gen: torch.Generator, p: float = 0.5, sigma=(0.1, 1.2)) -> torch.Tensor:
    """Gaussian blur (3x3 separable) with a per-image sigma, applied with probability ``p``."""
    n, c = x.shape[:2]
    s = _u(n, *sigma, gen, x.device)[:, None]
    k = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0], device=x.device)[None, :] ** 2) / (2 * s**2))
    k = k / k.sum(1, keepdim=True)                              # n x 3
    kern = (k[:, :, None] * k[:, None, :]).repeat_interleave(c, 0)[:, None]  # (n*c) x 1 x 3 x 3
    y = F.conv2d(F.pad(x.reshape(1, n * c, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"), kern, groups=n * c)
    apply = (torch.rand(n, generator=gen) < p).to(x.device)[:, None, None, None]
    return torch.where(apply, y.reshape_as(x), x)


def random_noise(x: torch.Tensor, gen: torch.Generator, p: float = 0.5, max_std: float = 16 / 255) -> torch.Tensor:
    """Additive uniform noise of random amplitude up to ``max_std`` per image (teaches noise invariance)."""
    n = x.shape[0]
    amp = _u(n, 0, max_std, gen, x.device)[:, None, None, None]
    noise = (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * amp * 3**0.5
    apply = (torch.rand(n, generator=gen) < p).to(x.device)[:, None, None, None]
    return torch.where(apply, (x + noise).clamp(0, 1), x)


def random_channel_shuffle(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """A random permutation of the colour channels per image (hue changes, shapes do not)."""
    n, c = x.shape[:2]
    perm = torch.argsort(torch.rand((n, c), generator=gen), dim=1).to(x.device)
    shuffled = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    apply = (torch.rand(n, generator=gen) < p).to(x.device)[:, None, None, None]
    return torch.where(apply, shuffled, x)


@dataclass(frozen=True)
class StrongAugment:
    """The semantic-focused view generator: crop, flip, colour, grayscale, blur, noise."""

    crop_scale: float = 0.35     # smallest crop area fraction
    jitter: float = 0.4          # brightness/contrast/saturation strength
    gray_p: float = 0.2
    blur_p: float = 0.5
    noise_p: float = 0.5
    noise_std: float = 16 / 255  # largest noise std, [0, 1] pixel units
    shuffle_p: float = 0.0       # probability of permuting the colour channels

    def __post_init__(self) -> None:
        checks = [(0 < self.crop_scale <= 1, "crop_scale", "in (0, 1]"), (self.jitter >= 0, "jitter", ">= 0"),
                  (self.noise_std >= 0, "noise_std", ">= 0")]
        checks += [(0 <= getattr(self, p) <= 1, p, "in [0, 1]") for p in ("gray_p", "blur_p", "noise_p", "shuffle_p")]
        for ok, name, rule in checks:
            if not ok:
                raise UEBenchError(f"zoo.augment: {name}={getattr(self, name)!r} must be {rule}")

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = random_resized_crop(x, gen, scale=(self.crop_scale, 1.0))
        x = random_flip(x, gen)
        if self.shuffle_p > 0:
            x = random_channel_shuffle(x, gen, self.shuffle_p)
        x = color_jitter(x, gen, self.jitter)
        x = random_grayscale(x, gen, self.gray_p)
        x = random_blur(x, gen, self.blur_p)
        return random_noise(x, gen, self.noise_p, self.noise_std)
