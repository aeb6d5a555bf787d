"""``ImageSet`` (uint8 images with labels), ``Splits``, ``DatasetConfig``, and ``load_dataset``.

``load_dataset`` looks the configured name up in ``DATASETS``, the data set registry: a loader is a
function ``DatasetConfig -> Splits`` registered by name (``@DATASETS.register("shapes")``); a family
such as ``hf:<name-or-path>`` serves every name with its prefix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from benchmark.errors import UEBenchError
from benchmark.registry import Registry

SIZE_MAX = 10_000_000  # images in one split: more than any supported data set holds
SAMPLE_SEED_MAX = 2**31 - 1


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
    # seed of the training sample (the images a defense protects); None: ``sample_seed``. A cell of seed s
    # draws it with seed ``train_seed + s`` (``for_seed``); the test set and the source pool keep ``sample_seed``
    train_sample_seed: int | None = None

    def __post_init__(self) -> None:
        """Types and ranges, checked when a preset or the command line makes the config (before any work)."""
        for name in ("train_size", "test_size", "source_size"):
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= SIZE_MAX):
                raise UEBenchError(f"dataset {self.name!r}: {name}={n!r} must be an integer in [1, {SIZE_MAX}] (or "
                                   f"unset for the whole split); a class-balanced sample also needs at least one "
                                   f"image per class")
        for name in ("sample_seed", "train_sample_seed"):
            seed = getattr(self, name)
            if name == "train_sample_seed" and seed is None:
                continue
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SAMPLE_SEED_MAX:
                raise UEBenchError(f"dataset {self.name!r}: {name}={seed!r} must be an integer in [0, "
                                   f"{SAMPLE_SEED_MAX}]")
        texts = {"name": self.name, "image_column": self.image_column, "label_column": self.label_column}
        for name, value in texts.items():
            if not isinstance(value, str) or not value.strip():
                raise UEBenchError(f"dataset: {name}={value!r} must be a non-empty string")
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise UEBenchError(f"dataset {self.name!r}: data_root={self.data_root!r} must be a path (a string)")
        for name in ("download", "verify_checksums"):
            if not isinstance(getattr(self, name), bool):
                raise UEBenchError(f"dataset {self.name!r}: {name}={getattr(self, name)!r} must be true or false")

    @property
    def train_seed(self) -> int:
        """The seed the training sample is drawn (or generated) with."""
        return self.sample_seed if self.train_sample_seed is None else self.train_sample_seed

    def split_seed(self, split: str) -> int:
        """The seed a split is drawn (or generated) with: the training sample's own, else ``sample_seed``
        (the test set and the source pool are the same for every cell seed)."""
        return self.train_seed if split == "train" else self.sample_seed

    def for_seed(self, seed: int) -> DatasetConfig:
        """The data of a cell of seed ``seed``: its own training sample (seed ``train_seed + seed``), the
        same test set and source pool; seed 0 is this config's own sample."""
        if self.train_seed + seed > SAMPLE_SEED_MAX:
            raise UEBenchError(f"dataset {self.name!r}: seed {seed} draws the training sample with seed "
                               f"{self.train_seed} + {seed}, above {SAMPLE_SEED_MAX}")
        return replace(self, train_sample_seed=self.train_seed + seed)

    def seed_zero(self, seed: int) -> DatasetConfig:
        """The inverse of ``for_seed``: the config whose ``for_seed(seed)`` is this one (a cell's grid config)."""
        return replace(self, train_sample_seed=self.train_seed - seed)

    def key(self) -> dict:
        """The fields that decide the content (the location of files does not).

        Unverified files may differ from the official release, so ``verify_checksums=False`` enters
        the key; the default is left out, which keeps the keys of verified data unchanged. So is a
        training sample drawn with ``sample_seed`` itself (a seed-0 cell's): its keys are those written
        before the training sample had a seed of its own.
        """
        d = asdict(self)
        d.pop("data_root")
        d.pop("download")
        if d["verify_checksums"]:
            d.pop("verify_checksums")
        if self.train_seed == self.sample_seed:
            d.pop("train_sample_seed")
        return d

    def source_key(self) -> dict:
        """The key of the source pool (the zoo's): the training sample's seed does not change it."""
        return replace(self, train_sample_seed=None).key()


Loader = Callable[[DatasetConfig], Splits]
DATASETS: Registry[Loader] = Registry("data set")


def load_dataset(cfg: DatasetConfig) -> Splits:
    """Load (or generate) a data set and cut it to the configured sizes; ``check_splits`` refuses data that
    would otherwise crash deep in training."""
    return check_splits(cfg, DATASETS.get(cfg.name)(cfg))  # an unknown name fails with the valid names


def check_splits(cfg: DatasetConfig, splits: Splits) -> Splits:
    """At least two classes, each with training and test images; at least two images per split (batch norm
    needs two); train, test and source pool share one image size, RGB of at least 8 x 8. Raises
    ``UEBenchError`` naming what is wrong."""
    classes = splits.train.classes
    if len(classes) < 2:
        raise UEBenchError(f"{cfg.name}: {len(classes)} class(es) {list(classes)}; a classifier needs at least 2")
    for role, size in (("train", cfg.train_size), ("test", cfg.test_size)):
        if size is not None and size < len(classes):
            raise UEBenchError(f"{cfg.name}: {role}_size={size} is smaller than its {len(classes)} classes; a "
                               f"class-balanced sample needs at least one image per class (>= {len(classes)})")
    parts = {"train": splits.train, "test": splits.test, **({"source": splits.source} if splits.source else {})}
    for role, data in parts.items():
        if len(data) < 2:
            raise UEBenchError(f"{cfg.name}: the {role} split holds {len(data)} image(s); at least 2 are needed")
        if data.image_shape[0] != 3 or min(data.image_shape[1:]) < 8:
            raise UEBenchError(f"{cfg.name}: {role} images are {_shape_text(data.image_shape)} (C x H x W); "
                               f"the backbones need 3 channels (RGB) of at least 8 x 8 pixels")
    if splits.test.classes != classes:
        raise UEBenchError(f"{cfg.name}: the train and test splits name different classes")
    for role in ("train", "test"):
        counts = torch.bincount(parts[role].labels, minlength=len(classes))
        empty = [classes[i] for i in range(len(classes)) if counts[i] == 0]
        if empty:
            raise UEBenchError(f"{cfg.name}: class {empty[0]!r} has no {role} images ({len(empty)} of "
                               f"{len(classes)} classes are empty); every class needs at least one")
    shapes = {role: data.image_shape for role, data in parts.items()}
    if len(set(shapes.values())) > 1:
        raise UEBenchError(f"{cfg.name}: images of different sizes across splits ("
                           f"{', '.join(f'{r} {_shape_text(s)}' for r, s in shapes.items())}); "
                           f"resize them to one size")
    return splits


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
