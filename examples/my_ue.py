"""An example UE generator plugin: class-wise random sign patches within L-inf 8/255.

Submit it with ``python run_benchmark.py submit examples/my_ue.py`` (see docs/submit.md).

The method is a simple L-inf variant of the linearly separable patches (LSP) of Yu et al.,
"Availability Attacks Create Shortcuts", KDD 2022 (arXiv 2111.00898): every class gets one random
pattern of ``patch`` x ``patch`` pixel squares, each square +eps or -eps per channel, added to every
image of that class. The pattern is a shortcut a victim trained from scratch learns before the real
task; a frozen pretrained feature extractor may ignore it. It is an example of the plugin format, not
a published method: it cites LSP because it follows LSP's idea, with an L-inf instead of an L2 budget.

Its objective is a class-wise shortcut, so its certificate is ``shortcut_check``: a small CNN trained on
the released perturbations alone must predict the labels of held-out images (at least 90 %).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.certify import shortcut_check
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Context, Defense, Protected, certificate, quantize
from benchmark.registry import DEFENSES
from benchmark.training import to_float


def class_patterns(num_classes: int, channels: int, size: tuple[int, int], patch: int, eps: float,
                   generator: torch.Generator) -> torch.Tensor:
    """``num_classes`` x C x H x W patterns of +-eps squares of ``patch`` pixels (the last ones cropped)."""
    h, w = size
    grid = (-(-h // patch), -(-w // patch))  # ceil
    signs = torch.randint(0, 2, (num_classes, channels, *grid), generator=generator).float() * 2 - 1
    return F.interpolate(signs, scale_factor=patch, mode="nearest")[:, :, :h, :w] * eps


@DEFENSES.register("my_ue")
@dataclass(frozen=True)
class MyUE(Defense):
    eps: float = 8 / 255  # L-inf budget, [0, 1] pixel units
    patch: int = 8        # side of one square of the pattern, pixels

    title = "Class-wise random sign patches (example plugin, after LSP)"
    paper = "2111.00898"
    venue = "KDD"
    year = 2022
    authors = "Da Yu et al."
    norm = "linf"
    granularity = "class"

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise UEBenchError(f"my_ue: eps={self.eps!r} must be in (0, 1]")
        if self.patch < 1:
            raise UEBenchError(f"my_ue: patch={self.patch!r} must be >= 1 pixel")

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        c, h, w = train.image_shape
        patterns = class_patterns(train.num_classes, c, (h, w), self.patch, self.eps, ctx.generator())
        images = quantize(train.images, to_float(train.images) + patterns[train.labels])
        out = train.with_images(images, name=f"{train.name}+my_ue")
        # measured on the released uint8 images: is the perturbation alone a learnable shortcut?
        return Protected(out, certificate(shortcut_check(train, out, ctx)))
