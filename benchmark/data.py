"""Data sets as uint8 tensors: ``ImageSet`` and the loaders behind ``DatasetConfig``.

| name | source | source pool (zoo pretraining) |
|---|---|---|
| ``shapes`` | procedural (``benchmark/shapes.py``), no files | procedural glyphs, a disjoint label set |
| ``fashion-mnist`` | idx(.gz) files, default ``/usr/share/datasets/fashion-mnist`` | train images not used as protected data |
| ``cifar10``, ``cifar100``, ``svhn`` | torchvision, from ``data_root`` (download opt-in) | none (timm ImageNet weights) |
| ``hf:<name or path>`` | Hugging Face ``datasets`` (a saved dataset folder, a local script/files, or the hub cache) | none |
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmark import shapes
from benchmark.errors import UEBenchError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle-boot")
TORCHVISION_SETS = ("cifar10", "cifar100", "svhn")
DATASET_NAMES = ("shapes", "fashion-mnist", *TORCHVISION_SETS, "hf:<name-or-path>")


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 N x C x H x W, labels as int64 N, plus the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise UEBenchError(f"ImageSet {self.name!r}: images must be uint8 NxCxHxW, got "
                               f"{self.images.dtype} with shape {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise UEBenchError(f"ImageSet {self.name!r}: labels must be int64 of shape ({self.images.shape[0]},), "
                               f"got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise UEBenchError(f"ImageSet {self.name!r}: labels outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor, name: str | None = None) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes, name or self.name)

    def with_images(self, images: torch.Tensor, name: str | None = None) -> ImageSet:
        return ImageSet(images, self.labels, self.classes, name or self.name)


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    test: ImageSet
    source: ImageSet | None  # the zoo's pretraining pool, disjoint from train and test


@dataclass(frozen=True)
class DatasetConfig:
    """What to load. Sizes of ``None`` mean the whole split; subsamples are class-balanced."""

    name: str = "shapes"
    train_size: int | None = None
    test_size: int | None = None
    source_size: int | None = None
    sample_seed: int = 0          # seed of generation (shapes) and of subsampling
    data_root: str | None = field(default=None, compare=False)  # where files live; not part of cache keys
    download: bool = field(default=False, compare=False)
    image_column: str = "image"   # hf: only
    label_column: str = "label"   # hf: only

    def key(self) -> dict:
        """The fields that decide the content (the location of files does not)."""
        d = asdict(self)
        d.pop("data_root")
        d.pop("download")
        return d


def balanced_subset(data: ImageSet, n: int | None, seed: int, exclude: torch.Tensor | None = None,
                    ) -> tuple[ImageSet, torch.Tensor]:
    """``n`` images with classes as equal as possible, chosen deterministically from ``seed``.

    Returns the subset and the indices chosen. ``exclude`` marks indices that may not be used.
    """
    available = torch.ones(len(data), dtype=torch.bool) if exclude is None else ~exclude
    if n is None:
        idx = torch.nonzero(available).flatten()
        return data.subset(idx), idx
    if n > int(available.sum()):
        raise UEBenchError(f"{data.name}: asked for {n} images but only {int(available.sum())} are available")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    order = order[available[order]]
    by_class = [order[data.labels[order] == c] for c in range(data.num_classes)]
    present = [c for c in range(data.num_classes) if len(by_class[c])]
    per_class = {c: n // len(present) for c in present}
    for c in present[: n % len(present)]:
        per_class[c] += 1
    short = [c for c in present if per_class[c] > len(by_class[c])]
    if short:
        raise UEBenchError(f"{data.name}: class {data.classes[short[0]]!r} has only {len(by_class[short[0]])} "
                           f"images; cannot draw a balanced subset of {n}")
    idx = torch.cat([by_class[c][: per_class[c]] for c in present]).sort().values
    return data.subset(idx), idx


def load_dataset(cfg: DatasetConfig) -> Splits:
    """Load (or generate) a data set and cut it to the configured sizes."""
    if cfg.name == "shapes":
        return _load_shapes(cfg)
    if cfg.name == "fashion-mnist":
        return _load_fashion_mnist(cfg)
    if cfg.name in TORCHVISION_SETS:
        return _load_torchvision(cfg)
    if cfg.name.startswith("hf:"):
        return _load_hf(cfg)
    raise UEBenchError(f"unknown data set {cfg.name!r}; valid names: {', '.join(DATASET_NAMES)}")


def _load_shapes(cfg: DatasetConfig) -> Splits:
    sizes = {"train": cfg.train_size or 10_000, "test": cfg.test_size or 2_000, "source": cfg.source_size or 20_000}
    out = {}
    for split, n in sizes.items():
        images, labels, classes = shapes.generate(split, n, cfg.sample_seed)
        out[split] = ImageSet(images, labels, classes, f"shapes-{split}")
    return Splits(out["train"], out["test"], out["source"])


# ---------------------------------------------------------------- Fashion-MNIST (idx files)

def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UEBenchError(f"{path} is not an unsigned-byte idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UEBenchError(f"{path}: header says {shape} but the file holds {body.size} bytes")
    return body.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise UEBenchError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install the Debian package "
        f"(sudo apt-get install dataset-fashion-mnist) or pass --data-root to a folder with the idx files."
    )


def _load_fashion_mnist(cfg: DatasetConfig) -> Splits:
    root = Path(cfg.data_root or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise UEBenchError(
            f"Fashion-MNIST folder {root} does not exist. Install the Debian package "
            f"(sudo apt-get install dataset-fashion-mnist) or pass --data-root to a folder with the idx files."
        )

    def split(prefix: str) -> ImageSet:
        x = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        images = torch.from_numpy(x.copy()).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        return ImageSet(images, torch.from_numpy(y.astype(np.int64)), FASHION_MNIST_CLASSES,
                        f"fashion-mnist-{prefix}")

    full_train, full_test = split("train"), split("t10k")
    train, used = balanced_subset(full_train, cfg.train_size, cfg.sample_seed)
    mask = torch.zeros(len(full_train), dtype=torch.bool)
    mask[used] = True
    source, _ = balanced_subset(full_train, cfg.source_size, cfg.sample_seed + 1, exclude=mask)
    test, _ = balanced_subset(full_test, cfg.test_size, cfg.sample_seed)
    return Splits(train, test, source if len(source) else None)


# ---------------------------------------------------------------- torchvision (CIFAR, SVHN)

def _load_torchvision(cfg: DatasetConfig) -> Splits:
    import torchvision

    root = cfg.data_root or "data"
    try:
        if cfg.name == "svhn":
            tr = torchvision.datasets.SVHN(root, split="train", download=cfg.download)
            te = torchvision.datasets.SVHN(root, split="test", download=cfg.download)
            arrays = [(torch.from_numpy(d.data), torch.from_numpy(d.labels.astype(np.int64))) for d in (tr, te)]
            classes = tuple(str(i) for i in range(10))
        else:
            cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
            tr = cls(root, train=True, download=cfg.download)
            te = cls(root, train=False, download=cfg.download)
            arrays = [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                       torch.tensor(d.targets, dtype=torch.int64)) for d in (tr, te)]
            classes = tuple(tr.classes)
    except RuntimeError as exc:  # torchvision raises RuntimeError when files are missing
        raise UEBenchError(f"{cfg.name}: {exc} (folder {root!r}; pass --data-root, or --download "
                           f"where the network allows)") from exc
    train_full = ImageSet(*arrays[0], classes, f"{cfg.name}-train")
    test_full = ImageSet(*arrays[1], classes, f"{cfg.name}-test")
    train, _ = balanced_subset(train_full, cfg.train_size, cfg.sample_seed)
    test, _ = balanced_subset(test_full, cfg.test_size, cfg.sample_seed)
    return Splits(train, test, None)


# ---------------------------------------------------------------- Hugging Face datasets

def _hf_split(ds, cfg: DatasetConfig, name: str, classes: tuple[str, ...] | None) -> ImageSet:
    if cfg.image_column not in ds.column_names or cfg.label_column not in ds.column_names:
        raise UEBenchError(f"{cfg.name}: split {name!r} has columns {ds.column_names}; set image_column / "
                           f"label_column (now {cfg.image_column!r}, {cfg.label_column!r})")
    arrays = [np.asarray(img.convert("RGB")) for img in ds[cfg.image_column]]
    if len({a.shape for a in arrays}) > 1:
        raise UEBenchError(f"{cfg.name}: images of different sizes {sorted({a.shape for a in arrays})[:3]}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds[cfg.label_column], dtype=torch.int64)
    if classes is None:
        feature = ds.features[cfg.label_column]
        names = getattr(feature, "names", None)
        classes = tuple(names) if names else tuple(str(i) for i in range(int(labels.max()) + 1))
    return ImageSet(images, labels, classes, f"{cfg.name}-{name}")


def _load_hf(cfg: DatasetConfig) -> Splits:
    import datasets

    target = cfg.name[3:]
    if not target:
        raise UEBenchError("hf: needs a data set name or a local path, e.g. hf:./my_dataset")
    try:
        if Path(target).is_dir() and (Path(target) / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(target)
        else:
            dd = datasets.load_dataset(target)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise UEBenchError(f"cannot load Hugging Face data set {target!r}: {exc}") from exc
    if "train" not in dd or "test" not in dd:
        raise UEBenchError(f"{cfg.name}: needs 'train' and 'test' splits, found {list(dd)}")
    full_train = _hf_split(dd["train"], cfg, "train", None)
    full_test = _hf_split(dd["test"], cfg, "test", full_train.classes)
    train, _ = balanced_subset(full_train, cfg.train_size, cfg.sample_seed)
    test, _ = balanced_subset(full_test, cfg.test_size, cfg.sample_seed)
    return Splits(train, test, None)

