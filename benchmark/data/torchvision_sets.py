"""``cifar10``, ``cifar100``, ``svhn``: torchvision's files, read here and checked against their md5.

Same layout as torchvision: ``cifar-10-batches-py/``, ``cifar-100-python/``,
``train_32x32.mat``/``test_32x32.mat``; torchvision is only used to download. The md5 checksums are
verified against torchvision's published ones unless ``verify_checksums=False``, which accepts other
files (a re-packaged copy, test fixtures) and keys the caches apart from the official release.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from benchmark.data.imageset import DATASETS, DatasetConfig, ImageSet, Splits
from benchmark.data.sampling import balanced_subset
from benchmark.errors import UEBenchError

TORCHVISION_SETS = ("cifar10", "cifar100", "svhn")


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


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, strings, numbers, numpy arrays): any other
    global a pickle names is refused, so a doctored file cannot run code."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                         ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    # CIFAR batches are Python 2 pickles; latin1 decodes their byte strings like torchvision does.
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f, encoding="latin1").load()
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
    train, _ = balanced_subset(train_full, cfg.train_size, cfg.split_seed("train"))
    test, _ = balanced_subset(test_full, cfg.test_size, cfg.split_seed("test"))
    return Splits(train, test, None)


for _name in TORCHVISION_SETS:
    DATASETS.add(_load_torchvision, _name)
