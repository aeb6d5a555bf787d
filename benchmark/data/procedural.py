"""``shapes``: the procedurally generated data set (``benchmark/shapes.py``), no files."""

from __future__ import annotations

from benchmark import shapes
from benchmark.data.imageset import DATASETS, DatasetConfig, ImageSet, Splits


@DATASETS.register("shapes")
def _load_shapes(cfg: DatasetConfig) -> Splits:
    defaults = {"train": 10_000, "test": 2_000, "source": 20_000}
    sizes = {"train": cfg.train_size, "test": cfg.test_size, "source": cfg.source_size}
    out = {}
    for split, n in sizes.items():
        images, labels, classes = shapes.generate(split, defaults[split] if n is None else n, cfg.split_seed(split))
        out[split] = ImageSet(images, labels, classes, f"shapes-{split}")
    return Splits(out["train"], out["test"], out["source"])

