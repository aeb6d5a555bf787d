"""``hf:<name or path>``: Hugging Face ``datasets`` (a saved dataset folder, a local script/files, or the hub cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmark.data.imageset import DATASETS, DatasetConfig, ImageSet, Splits
from benchmark.data.sampling import balanced_indices
from benchmark.errors import UEBenchError


def _hf_labels(ds, cfg: DatasetConfig, name: str) -> torch.Tensor:
    missing = [c for c in (cfg.image_column, cfg.label_column) if c not in ds.column_names]
    if missing:
        raise UEBenchError(f"{cfg.name}: split {name!r} has no column {', '.join(map(repr, missing))}; its "
                           f"columns are {ds.column_names}; set image_column / label_column (now "
                           f"{cfg.image_column!r}, {cfg.label_column!r})")
    return torch.tensor(list(ds[cfg.label_column]), dtype=torch.int64)


def _hf_images(ds, cfg: DatasetConfig, idx: torch.Tensor) -> torch.Tensor:
    """Decode only the selected rows to uint8 N x 3 x H x W."""
    arrays = []
    for img in ds.select(idx.tolist())[cfg.image_column]:
        if not hasattr(img, "convert"):
            raise UEBenchError(f"{cfg.name}: column {cfg.image_column!r} holds {type(img).__name__}, not images "
                               f"(it must be a datasets.Image feature)")
        arrays.append(np.asarray(img.convert("RGB")))
    if len({a.shape for a in arrays}) > 1:
        raise UEBenchError(f"{cfg.name}: images of different sizes {sorted({a.shape for a in arrays})[:3]}")
    if not arrays:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@DATASETS.register("hf:<name-or-path>")
def _load_hf(cfg: DatasetConfig) -> Splits:
    import datasets

    target = cfg.name[3:]
    if not target:
        raise UEBenchError("hf: needs a data set name or a local path, e.g. hf:./my_dataset")
    folder = Path(target)
    try:
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            dd = datasets.load_from_disk(target)  # a save_to_disk folder
        else:
            dd = datasets.load_dataset(target)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise UEBenchError(f"cannot load Hugging Face data set {target!r}: {exc}") from exc
    if not isinstance(dd, datasets.DatasetDict):
        raise UEBenchError(f"{cfg.name}: holds a single split ({type(dd).__name__}); save a DatasetDict with "
                           f"'train' and 'test' splits")
    if "train" not in dd or "test" not in dd:
        raise UEBenchError(f"{cfg.name}: needs 'train' and 'test' splits, found {list(dd)}")
    labels = {s: _hf_labels(dd[s], cfg, s) for s in ("train", "test")}
    names = getattr(dd["train"].features[cfg.label_column], "names", None)
    top = max((int(y.max()) for y in labels.values() if len(y)), default=-1)
    classes = tuple(names) if names else tuple(str(i) for i in range(top + 1))
    for split, y in labels.items():
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise UEBenchError(f"{cfg.name}: split {split!r} has labels in [{int(y.min())}, {int(y.max())}], "
                               f"outside [0, {len(classes)}) (unlabelled rows?)")
    out = {}
    for split, n in (("train", cfg.train_size), ("test", cfg.test_size)):
        idx = balanced_indices(labels[split], classes, n, cfg.split_seed(split), name=f"{cfg.name}-{split}")
        out[split] = ImageSet(_hf_images(dd[split], cfg, idx), labels[split][idx], classes, f"{cfg.name}-{split}")
    return Splits(out["train"], out["test"], None)
