"""``ops``: one-pixel shortcut.

Wu, Chen, Xie, Huang, "One-Pixel Shortcut: on the Learning Preference of Deep Neural Networks",
ICLR 2023 (arXiv 2205.12141); reference code APBench ``attack/ops_poisons.py`` (``pixel_search``).

For each class in turn, every (pixel position, corner colour of the RGB cube) is scored by
mean / std over the class's images and channels of |colour - pixel|: a colour far from, and
uniformly far from, what the class has at that position. The best unused (position, colour) pair
is set in every image of the class (``sparsity`` pairs per class; the paper uses one). No
randomness: the result depends on the data only.
Certificate: ``benchmark.certify.shortcut_check`` on the released bytes (the perturbation alone must
be a learnable shortcut: held-out accuracy of a small CNN trained on it at least 90 %).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.certify import shortcut_check
from benchmark.plugins import Context, Defense, Protected, ThreatModel, certificate
from benchmark.registry import DEFENSES
from benchmark.training import to_float
from defenses._common import progress, publish

log = logging.getLogger(__name__)


def corner_colours(channels: int) -> torch.Tensor:
    """The 2^C corners of the colour cube, index bits most-significant first (2^C x C, values 0/1)."""
    idx = torch.arange(2**channels)
    return torch.stack([(idx >> (channels - 1 - c)) & 1 for c in range(channels)], dim=1).float()


def pixel_scores(images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Score (colours x H x W): mean / std of |colour - pixel| over images and channels.

    ``images`` are floats in [0, 1] (n x C x H x W). A zero spread with a nonzero mean scores +inf
    (a perfectly stable deviation); an undefined score (0 / 0) scores -inf.
    """
    out = []
    for colour in colours:
        dist = (colour.view(1, -1, 1, 1) - images).abs()              # n x C x H x W
        flat = dist.permute(2, 3, 0, 1).reshape(*images.shape[2:], -1)  # H x W x (n*C)
        mean, std = flat.mean(-1), flat.std(-1, unbiased=False)
        score = mean / std
        score = torch.where(torch.isnan(score), torch.full_like(score, float("-inf")), score)
        out.append(score)
    return torch.stack(out)


@DEFENSES.register("ops")
@dataclass(frozen=True)
class OnePixelShortcut(Defense):
    """One-pixel shortcut (Wu et al., ICLR 2023)."""

    sparsity: int = 1   # pixels set per class (L0 budget per image)

    title = "One-Pixel Shortcut"
    paper = "2205.12141"
    venue = "ICLR"
    year = 2023
    authors = "Wu, Chen, Xie, Huang"
    norm = "l0"
    granularity = "class"

    def __post_init__(self) -> None:
        if self.sparsity < 1:
            raise UEBenchError(f"ops: sparsity={self.sparsity!r} must be >= 1")

    def threat_model(self) -> ThreatModel:
        return ThreatModel("l0", float(self.sparsity), "class")

    def zoo_sources(self) -> frozenset[str]:
        return frozenset()  # no pretrained weights

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        c, h, w = train.image_shape
        if self.sparsity > h * w:
            raise UEBenchError(f"ops: sparsity={self.sparsity} exceeds the {h * w} pixels of an image")
        colours = corner_colours(c)
        used: set[tuple[int, int]] = set()  # (position, colour) pairs taken by earlier classes
        delta = torch.zeros(train.images.shape)
        chosen = []
        for k in progress(range(train.num_classes), ctx, "ops search"):
            mask = train.labels == k
            if not bool(mask.any()):
                continue
            x = to_float(train.images[mask])
            scores = pixel_scores(x, colours).flatten(1).t()  # (H*W) x colours
            for pos, col in used:
                scores[pos, col] = float("-inf")
            order = torch.argsort(scores.flatten(), descending=True, stable=True)
            for flat in order[: self.sparsity].tolist():
                pos, col = divmod(flat, len(colours))
                used.add((pos, col))
                row, column = divmod(pos, w)
                delta[mask, :, row, column] = colours[col].view(1, -1) - x[:, :, row, column]
                chosen.append((k, row, column, colours[col].tolist()))
        log.debug("ops pixels (class, row, column, colour): %s", chosen)
        out = publish(train, torch.round(delta * 255) / 255, "ops")
        return Protected(out, certificate(shortcut_check(train, out, ctx)))
