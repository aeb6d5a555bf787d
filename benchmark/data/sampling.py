"""Class-balanced, seeded subsampling of labelled images."""

from __future__ import annotations

import torch

from benchmark.data.imageset import ImageSet
from benchmark.errors import UEBenchError


def balanced_indices(labels: torch.Tensor, classes: tuple[str, ...], n: int | None, seed: int,
                     exclude: torch.Tensor | None = None, name: str = "data") -> torch.Tensor:
    """Sorted indices of ``n`` items with classes as equal as possible (counts differ by at most 1)."""
    available = torch.ones(len(labels), dtype=torch.bool) if exclude is None else ~exclude
    if n is None:
        return torch.nonzero(available).flatten()
    if n < 0:
        raise UEBenchError(f"{name}: subset size must be >= 0 or None, got {n}")
    if n > int(available.sum()):
        raise UEBenchError(f"{name}: asked for {n} images but only {int(available.sum())} are available")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    order = order[available[order]]
    by_class = [order[labels[order] == c] for c in range(len(classes))]
    present = [c for c in range(len(classes)) if len(by_class[c])]
    per_class = {c: n // len(present) for c in present}
    for c in present[: n % len(present)]:
        per_class[c] += 1
    short = [c for c in present if per_class[c] > len(by_class[c])]
    if short:
        raise UEBenchError(f"{name}: class {classes[short[0]]!r} has only {len(by_class[short[0]])} available images; "
                           f"cannot draw a balanced subset of {n} ({per_class[short[0]]} per class)")
    return torch.cat([by_class[c][: per_class[c]] for c in present]).sort().values


def balanced_subset(data: ImageSet, n: int | None, seed: int, exclude: torch.Tensor | None = None,
                    ) -> tuple[ImageSet, torch.Tensor]:
    """``n`` images with classes as equal as possible, chosen deterministically from ``seed``.

    Returns the subset and the indices chosen. ``exclude`` marks indices that may not be used.
    """
    idx = balanced_indices(data.labels, data.classes, n, seed, exclude, data.name)
    return data.subset(idx), idx

