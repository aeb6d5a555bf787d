"""Data sets as uint8 tensors: ``ImageSet`` and the loaders behind ``DatasetConfig``.

| name | source | source pool (zoo pretraining) |
|---|---|---|
| ``shapes`` | procedural (``benchmark/shapes.py``), no files | procedural glyphs, a disjoint label set |
| ``fashion-mnist`` | idx(.gz) files, default ``/usr/share/datasets/fashion-mnist`` | train images not used as protected data |
| ``cifar10``, ``cifar100``, ``svhn`` | torchvision's files in ``data_root`` (download opt-in) | none (timm ImageNet weights) |
| ``hf:<name or path>`` | Hugging Face ``datasets`` (a saved dataset folder, a local script/files, or the hub cache) | none |

CIFAR and SVHN files are read here (same layout as torchvision: ``cifar-10-batches-py/``,
``cifar-100-python/``, ``train_32x32.mat``/``test_32x32.mat``); torchvision is only used to download.
Their md5 checksums are verified against torchvision's published ones unless
``verify_checksums=False``, which accepts other files (a re-packaged copy, test fixtures) and keys
the caches apart from the official release.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import struct
from dataclasses import asdict, dataclass, field, replace
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
_INSTALL_FASHION_MNIST = ("Install the Debian package (sudo apt-get install dataset-fashion-mnist) or pass "
                          "--data-root to a folder with the idx files.")


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 N x C x H x W, labels as int64 N, plus the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise UEBenchError(f"ImageSet {self.name!r}: images must be a uint8 tensor NxCxHxW, got "
                               f"{type(self.images).__name__} {getattr(self.images, 'dtype', None)} with shape "
                               f"{tuple(getattr(self.images, 'shape', ()))}")
        if (not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64
                or self.labels.shape != (self.images.shape[0],)):
            raise UEBenchError(f"ImageSet {self.name!r}: labels must be an int64 tensor of shape "
                               f"({self.images.shape[0]},), got {type(self.labels).__name__} "
                               f"{getattr(self.labels, 'dtype', None)} {tuple(getattr(self.labels, 'shape', ()))}")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise UEBenchError(f"ImageSet {self.name!r}: labels span [{int(self.labels.min())}, "
                               f"{int(self.labels.max())}], outside [0, {len(self.classes)}) for the classes")

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
    verify_checksums: bool = True  # cifar/svhn: files must match torchvision's md5 checksums

    def key(self) -> dict:
        """The fields that decide the content (the location of files does not).

        Unverified files may differ from the official release, so ``verify_checksums=False`` enters
        the key; the default is left out, which keeps the keys of verified data unchanged.
        """
        d = asdict(self)
        d.pop("data_root")
        d.pop("download")
        if d["verify_checksums"]:
            d.pop("verify_checksums")
        return d


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
    defaults = {"train": 10_000, "test": 2_000, "source": 20_000}
    sizes = {"train": cfg.train_size, "test": cfg.test_size, "source": cfg.source_size}
    out = {}
    for split, n in sizes.items():
        images, labels, classes = shapes.generate(split, defaults[split] if n is None else n, cfg.sample_seed)
        out[split] = ImageSet(images, labels, classes, f"shapes-{split}")
    return Splits(out["train"], out["test"], out["source"])


# ---------------------------------------------------------------- Fashion-MNIST (idx files)

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


def _load_fashion_mnist(cfg: DatasetConfig) -> Splits:
    root = Path(cfg.data_root or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise UEBenchError(f"Fashion-MNIST folder {root} does not exist. {_INSTALL_FASHION_MNIST}")
    full_train, full_test = _read_fashion_split(root, "train"), _read_fashion_split(root, "t10k")
    train, used = balanced_subset(full_train, cfg.train_size, cfg.sample_seed)
    mask = torch.zeros(len(full_train), dtype=torch.bool)
    mask[used] = True
    source, _ = balanced_subset(full_train, cfg.source_size, cfg.sample_seed + 1, exclude=mask)
    test, _ = balanced_subset(full_test, cfg.test_size, cfg.sample_seed)
    return Splits(replace(train, name="fashion-mnist-train"), replace(test, name="fashion-mnist-test"),
                  replace(source, name="fashion-mnist-source") if len(source) else None)


# ---------------------------------------------------------------- CIFAR, SVHN (torchvision's files)

def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_files(cfg: DatasetConfig, root: Path, files: list[tuple[str, str]]) -> None:
    """Every ``(relative path, md5)`` must exist, and match its checksum if ``cfg.verify_checksums``."""
    missing = [name for name, _ in files if not (root / name).is_file()]
    if missing:
        raise UEBenchError(f"{cfg.name}: missing {', '.join(missing)} under {root}; pass --data-root to the "
                           f"folder that holds them, or --download where the network allows")
    if not cfg.verify_checksums:
        return
    for name, expected in files:
        actual = _md5(root / name)
        if actual != expected:
            raise UEBenchError(f"{cfg.name}: {root / name} has md5 {actual}, not the published {expected}: the "
                               f"file is corrupt or not the official release. Delete it and use --download, or set "
                               f"verify_checksums = false in the preset's [dataset] to use it anyway")


def _unpickle(path: Path) -> dict:
    # CIFAR batches are Python 2 pickles; latin1 decodes their byte strings like torchvision does.
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise UEBenchError(f"{path}: not a CIFAR pickle ({exc})") from exc


def _read_cifar(cfg: DatasetConfig, root: Path) -> tuple[ImageSet, ImageSet]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    meta = (cls.meta["filename"], cls.meta["md5"])
    if cfg.download and not all((folder / n).is_file() for n, _ in cls.train_list + cls.test_list + [meta]):
        from torchvision.datasets.utils import download_and_extract_archive
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    _check_files(cfg, folder, [tuple(f) for f in cls.train_list + cls.test_list] + [meta])
    classes = tuple(_unpickle(folder / meta[0])[cls.meta["key"]])

    def split(files: list[list[str]], role: str) -> ImageSet:
        parts, labels = [], []
        for name, _ in files:
            entry = _unpickle(folder / name)
            data = np.asarray(entry.get("data", ()), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise UEBenchError(f"{folder / name}: 'data' has shape {data.shape}, expected N x 3072")
            parts.append(data)
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        images = torch.from_numpy(np.vstack(parts).reshape(-1, 3, 32, 32))  # stored channel-major
        return ImageSet(images, torch.tensor(labels, dtype=torch.int64), classes, f"{cfg.name}-{role}")

    return split(cls.train_list, "train"), split(cls.test_list, "test")


def _read_svhn(cfg: DatasetConfig, root: Path) -> tuple[ImageSet, ImageSet]:
    import torchvision

    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise UEBenchError("svhn needs scipy to read its .mat files: pip install scipy") from exc
    table = torchvision.datasets.SVHN.split_list  # split -> (url, file name, md5)
    files = [(table[s][1], table[s][2]) for s in ("train", "test")]
    if cfg.download:
        from torchvision.datasets.utils import download_url
        for s in ("train", "test"):
            if not (root / table[s][1]).is_file():
                download_url(table[s][0], str(root), table[s][1], table[s][2])
    _check_files(cfg, root, files)
    classes = tuple(str(i) for i in range(10))

    def split(file: str, role: str) -> ImageSet:
        try:
            mat = loadmat(root / file)
        except (ValueError, OSError) as exc:
            raise UEBenchError(f"{root / file}: not a readable .mat file ({exc})") from exc
        if "X" not in mat or "y" not in mat:
            raise UEBenchError(f"{root / file}: has no 'X' and 'y' arrays (found {sorted(mat)})")
        x, y = mat["X"], mat["y"].astype(np.int64).reshape(-1)
        if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
            raise UEBenchError(f"{root / file}: X {x.shape} and y {mat['y'].shape} are not 32x32x3xN and N")
        y[y == 10] = 0  # SVHN stores the digit 0 as label 10
        images = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)), dtype=np.uint8))
        return ImageSet(images, torch.from_numpy(y), classes, f"svhn-{role}")

    return split(files[0][0], "train"), split(files[1][0], "test")


def _load_torchvision(cfg: DatasetConfig) -> Splits:
    root = Path(cfg.data_root or "data")
    try:
        train_full, test_full = (_read_svhn if cfg.name == "svhn" else _read_cifar)(cfg, root)
    except (RuntimeError, OSError) as exc:  # a failed download, an unreadable file
        raise UEBenchError(f"{cfg.name}: {exc} (folder {str(root)!r}; pass --data-root, or --download "
                           f"where the network allows)") from exc
    train, _ = balanced_subset(train_full, cfg.train_size, cfg.sample_seed)
    test, _ = balanced_subset(test_full, cfg.test_size, cfg.sample_seed)
    return Splits(train, test, None)


# ---------------------------------------------------------------- Hugging Face datasets

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
        idx = balanced_indices(labels[split], classes, n, cfg.sample_seed, name=f"{cfg.name}-{split}")
        out[split] = ImageSet(_hf_images(dd[split], cfg, idx), labels[split][idx], classes, f"{cfg.name}-{split}")
    return Splits(out["train"], out["test"], None)
