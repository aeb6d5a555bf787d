"""``lsp``: linearly separable synthetic perturbations (patch-wise, class-conditional).

Yu, Zhang, Chen, Yin, Liu, "Availability Attacks Create Shortcuts", KDD 2022 (arXiv 2111.00898);
reference code dayu11/Availability-Attacks-Create-Shortcuts and APBench ``attack/lsp_poisons.py``.

Synthetic points are drawn as scikit-learn's ``make_classification`` draws them (one Gaussian
cluster per class around a distinct vertex of the hypercube {-class_sep, +class_sep}^d, shaped by a
random matrix with entries U(-1, 1)), with d = 3 x (patches per side)^2. Each image of class k gets
its own point of cluster k, laid out as a grid of ``patch_size`` x ``patch_size`` constant patches
(one value per patch and channel), cropped to the image, and scaled to the L2 budget; APBench's
budget is sqrt((6/255)^2 x 3072) = 1.30 per 32x32 RGB image. The sampling is re-implemented in
torch (no scikit-learn); its random streams differ from scikit-learn's.
Certificate: ``benchmark.certify.shortcut_check`` on the released bytes (the perturbation alone must
be a learnable shortcut: held-out accuracy of a small CNN trained on it at least 90 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.certify import shortcut_check
from benchmark.plugins import Context, Defense, Protected, certificate
from benchmark.registry import DEFENSES
from defenses._common import normalize_l2, publish, round_l2

APBENCH_L2 = math.sqrt((6 / 255) ** 2 * 3 * 32 * 32)  # = 1.3043


def hypercube_vertices(count: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` distinct random vertices of {0, 1}^dim (as float)."""
    if dim < 63 and count > 2**dim:
        raise UEBenchError(f"lsp: cannot place {count} classes on distinct vertices of a {dim}-cube")
    while True:
        bits = torch.randint(0, 2, (count, dim), generator=gen)
        if len(torch.unique(bits, dim=0)) == count:
            return bits.float()


def make_classification(counts: list[int], dim: int, class_sep: float, gen: torch.Generator) -> list[torch.Tensor]:
    """Per class k, ``counts[k]`` points of a Gaussian cluster (``make_classification`` with all
    features informative, one cluster per class, hypercube centroids, no label noise)."""
    centroids = hypercube_vertices(len(counts), dim, gen) * 2 * class_sep - class_sep
    points = []
    for k, count in enumerate(counts):
        mix = torch.rand((dim, dim), generator=gen) * 2 - 1
        points.append(torch.randn((count, dim), generator=gen) @ mix + centroids[k])
    return points


def patch_images(points: torch.Tensor, channels: int, height: int, width: int, patch: int) -> torch.Tensor:
    """Feature vectors (N x p*p*C, laid out row, column, channel) -> N x C x H x W constant patches."""
    p = max(math.ceil(height / patch), math.ceil(width / patch))
    grid = points.view(-1, p, p, channels).permute(0, 3, 1, 2)
    big = grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return big[:, :, :height, :width].contiguous()


@DEFENSES.register("lsp")
@dataclass(frozen=True)
class LinearlySeparablePerturbation(Defense):
    """Linearly separable synthetic perturbations (Yu et al., KDD 2022)."""

    eps: float = APBENCH_L2   # L2 budget per image, [0, 1] pixel units (APBench: 6/255 x sqrt(3072))
    patch_size: int = 8       # side of the constant patches, pixels
    class_sep: float = 10.0   # make_classification's class_sep (centroid distance from the origin per axis)

    title = "Linearly Separable Perturbations (synthetic shortcuts)"
    paper = "2111.00898"
    venue = "KDD"
    year = 2022
    authors = "Yu, Zhang, Chen, Yin, Liu"
    norm = "l2"
    granularity = "class"

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise UEBenchError(f"lsp: eps={self.eps!r} must be > 0")
        if self.patch_size < 1:
            raise UEBenchError(f"lsp: patch_size={self.patch_size!r} must be >= 1")
        if not self.class_sep > 0:
            raise UEBenchError(f"lsp: class_sep={self.class_sep!r} must be > 0")

    def zoo_sources(self) -> frozenset[str]:
        return frozenset()  # no pretrained weights

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        gen = ctx.generator()
        c, h, w = train.image_shape
        p = max(math.ceil(h / self.patch_size), math.ceil(w / self.patch_size))
        counts = torch.bincount(train.labels, minlength=train.num_classes).tolist()
        points = make_classification(counts, c * p * p, self.class_sep, gen)
        delta = torch.empty(train.images.shape)
        for k, pts in enumerate(points):
            if len(pts):
                delta[train.labels == k] = normalize_l2(patch_images(pts, c, h, w, self.patch_size), self.eps)
        out = publish(train, round_l2(delta, self.eps), "lsp")
        return Protected(out, certificate(shortcut_check(train, out, ctx)))
