"""``random_noise``: uniform noise in [-eps, eps], sample-wise or class-wise.

Sample-wise noise shows that the budget alone does nothing. Class-wise noise (one fixed pattern per
class) is itself a known weak UE: the pattern is a shortcut, strongest without augmentation.
Reference: the random-noise baseline of Huang et al., "Unlearnable Examples: Making Personal Data
Unexploitable", ICLR 2021 (arXiv 2101.04898).
Class mode's certificate: ``benchmark.certify.shortcut_check`` on the released bytes (the patterns must
be a learnable shortcut); sample mode has no objective and no certificate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.certify import shortcut_check
from benchmark.plugins import Context, Defense, Protected, certificate, quantize
from benchmark.registry import DEFENSES
from benchmark.training import to_float
from defenses._common import check_linf_budget


@DEFENSES.register("random_noise")
@dataclass(frozen=True)
class RandomNoise(Defense):
    eps: float = 8 / 255   # L-inf budget, [0, 1] pixel units
    mode: str = "sample"   # sample: fresh noise per image | class: one pattern per class

    title = "Random noise"
    paper = "2101.04898"
    venue = "ICLR"
    year = 2021
    authors = "Huang, Ma, Erfani, Bailey, Wang"
    norm = "linf"

    def __post_init__(self) -> None:
        if self.mode not in ("sample", "class"):
            raise UEBenchError(f"random_noise: mode={self.mode!r} must be 'sample' or 'class'")
        check_linf_budget("random_noise", self.eps)

    def zoo_sources(self) -> frozenset[str]:
        return frozenset()  # no pretrained weights

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        gen = ctx.generator()
        shape = train.images.shape[1:]
        if self.mode == "sample":
            noise = torch.rand((len(train), *shape), generator=gen)
        else:
            noise = torch.rand((train.num_classes, *shape), generator=gen)[train.labels]
        noise = (noise * 2 - 1) * self.eps
        images = quantize(train.images, to_float(train.images) + noise)
        out = train.with_images(images, name=f"{train.name}+random_noise({self.mode})")
        if self.mode == "sample":
            return Protected(out, None)  # fresh noise per image: no shortcut, nothing to certify
        return Protected(out, certificate(shortcut_check(train, out, ctx)))
