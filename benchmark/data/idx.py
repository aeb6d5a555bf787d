"""``fashion-mnist``: idx(.gz) files, by default those of the Debian package ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmark.data.imageset import DATASETS, DatasetConfig, ImageSet, Splits
from benchmark.data.sampling import balanced_subset
from benchmark.errors import UEBenchError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle-boot")
_INSTALL_FASHION_MNIST = ("Install the Debian package (sudo apt-get install dataset-fashion-mnist) or pass "
                          "--data-root to a folder with the idx files.")


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte idx file (plain or gzipped), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UEBenchError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4:
        raise UEBenchError(f"{path} is not an idx file: only {len(data)} bytes")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise UEBenchError(f"{path} is not an unsigned-byte idx file (magic {data[:4].hex()}, "
                           f"expected 000008 followed by the number of dimensions)")
    if len(data) < 4 + 4 * ndim:
        raise UEBenchError(f"{path}: truncated idx header ({len(data)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UEBenchError(f"{path}: header says {shape} but the file holds {body.size} bytes")
    return body.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")
    names = (stem, stem + ".gz", dotted, dotted + ".gz")
    for name in names:
        if (root / name).is_file():
            return root / name
    raise UEBenchError(f"Fashion-MNIST file {stem}(.gz) not found in {root} (tried {', '.join(names)}). "
                       f"{_INSTALL_FASHION_MNIST}")


def _read_fashion_split(root: Path, prefix: str) -> ImageSet:
    x = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UEBenchError(f"Fashion-MNIST {prefix} files in {root}: images {x.shape} and labels {y.shape} "
                           f"do not match (expected N x H x W and N)")
    images = torch.from_numpy(x.copy()).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return ImageSet(images, torch.from_numpy(y.astype(np.int64)), FASHION_MNIST_CLASSES, f"fashion-mnist-{prefix}")


def _mask(data: ImageSet, indices: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(len(data), dtype=torch.bool)
    mask[indices] = True
    return mask


@DATASETS.register("fashion-mnist")
def _load_fashion_mnist(cfg: DatasetConfig) -> Splits:
    root = Path(cfg.data_root or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise UEBenchError(f"Fashion-MNIST folder {root} does not exist. {_INSTALL_FASHION_MNIST}")
    full_train, full_test = _read_fashion_split(root, "train"), _read_fashion_split(root, "t10k")
    # the source pool avoids the training sample of sample_seed; a training sample of another seed (a cell's
    # seed moves it) is drawn from the images outside the source pool, so the zoo is the same for all seeds
    train, used = balanced_subset(full_train, cfg.train_size, cfg.sample_seed)
    source, in_source = balanced_subset(full_train, cfg.source_size, cfg.sample_seed + 1,
                                        exclude=_mask(full_train, used))
    if cfg.train_seed != cfg.sample_seed:
        train, _ = balanced_subset(full_train, cfg.train_size, cfg.train_seed, exclude=_mask(full_train, in_source))
    test, _ = balanced_subset(full_test, cfg.test_size, cfg.sample_seed)
    return Splits(replace(train, name="fashion-mnist-train"), replace(test, name="fashion-mnist-test"),
                  replace(source, name="fashion-mnist-source") if len(source) else None)

