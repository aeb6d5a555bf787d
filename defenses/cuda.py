"""``cuda``: convolution-based unlearnable data set, one random blur filter per class.

Sadasivan, Soltanolkotabi, Feizi, "CUDA: Convolution-based Unlearnable Datasets", CVPR 2023
(arXiv 2303.04278); reference code vinusankars/Convolution-based-Unlearnability
(``final_filter_unlearnable.py``).

Each class gets a ``kernel_size`` x ``kernel_size`` filter with weights U(0, ``blur``) and one random
tap set to ``center`` (1.0), shared by every channel (depthwise, zero padding, no bias). Every image
of the class is convolved with it and divided by its own maximum. The change is not norm-bounded
(norm ``none``): the engine reports its size but checks no budget.
Certificate: ``benchmark.certify.shortcut_check`` on the released bytes (the perturbation alone must
be a learnable shortcut: held-out accuracy of a small CNN trained on it at least 90 %).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.certify import shortcut_check
from benchmark.plugins import Context, Defense, Protected, certificate, quantize
from benchmark.registry import DEFENSES
from benchmark.training import to_float
from defenses._common import batches


def class_filters(count: int, size: int, blur: float, center: float, gen: torch.Generator) -> torch.Tensor:
    """``count`` filters (count x size x size): U(0, blur) weights, one random tap set to ``center``."""
    w = torch.rand((count, size, size), generator=gen) * blur
    taps = torch.randint(0, size * size, (count,), generator=gen)
    w.view(count, -1)[torch.arange(count), taps] = center
    return w


def convolve_normalize(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Convolve each image (N x C x H x W, floats) with its own filter (N x k x k) on every channel,
    zero padding, then divide each image by its maximum (an all-zero output stays zero)."""
    n, c, h, w = x.shape
    k = filters.shape[-1]
    weight = filters.repeat_interleave(c, 0).unsqueeze(1)                   # (N*C) x 1 x k x k
    out = F.conv2d(x.reshape(1, n * c, h, w), weight, padding=k // 2, groups=n * c).reshape(n, c, h, w)
    peak = out.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return out / peak.view(n, 1, 1, 1)


@DEFENSES.register("cuda")
@dataclass(frozen=True)
class ConvolutionUnlearnable(Defense):
    """Convolution-based unlearnable data set (Sadasivan et al., CVPR 2023)."""

    blur: float = 0.3      # filter weights ~ U(0, blur) (the reference's blur parameter pb)
    center: float = 1.0    # value of the one random tap
    kernel_size: int = 3   # filter side, pixels (odd)

    title = "CUDA: Convolution-based Unlearnable Datasets"
    paper = "2303.04278"
    venue = "CVPR"
    year = 2023
    authors = "Sadasivan, Soltanolkotabi, Feizi"
    norm = "none"
    granularity = "class"

    def __post_init__(self) -> None:
        if not self.blur >= 0:
            raise UEBenchError(f"cuda: blur={self.blur!r} must be >= 0")
        if not self.center > 0:
            raise UEBenchError(f"cuda: center={self.center!r} must be > 0")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise UEBenchError(f"cuda: kernel_size={self.kernel_size!r} must be a positive odd number")

    def zoo_sources(self) -> frozenset[str]:
        return frozenset()  # no pretrained weights

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        filters = class_filters(train.num_classes, self.kernel_size, self.blur, self.center, ctx.generator())
        out = torch.empty(train.images.shape, dtype=torch.uint8)
        for s in batches(len(train), 1024):
            x = to_float(train.images[s])
            y = convolve_normalize(x, filters[train.labels[s]])
            out[s] = quantize(train.images[s], torch.round(y * 255) / 255)
        released = train.with_images(out, name=f"{train.name}+cuda")
        return Protected(released, certificate(shortcut_check(train, released, ctx)))
