"""``clean``: no perturbation. The reference every cell is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.data import ImageSet
from benchmark.plugins import Context, Defense, Protected
from benchmark.registry import DEFENSES


@DEFENSES.register("clean")
@dataclass(frozen=True)
class Clean(Defense):
    """The identity: publishes the images unchanged."""

    title = "Clean data (no protection)"
    norm = "none"
    granularity = "none"

    def zoo_sources(self) -> frozenset[str]:
        return frozenset()  # no pretrained weights

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        return Protected(train.with_images(train.images.clone(), name=f"{train.name}+clean"), None)
