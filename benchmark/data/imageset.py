"""``ImageSet`` (uint8 images with labels), ``Splits``, ``DatasetConfig``, and ``load_dataset``.

``load_dataset`` looks the configured name up in ``DATASETS``, the data set registry: a loader is a
function ``DatasetConfig -> Splits`` registered by name (``@DATASETS.register("shapes")``); a family
such as ``hf:<name-or-path>`` serves every name with its prefix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from benchmark.errors import UEBenchError
from benchmark.registry import Registry


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


Loader = Callable[[DatasetConfig], Splits]
DATASETS: Registry[Loader] = Registry("data set")


def load_dataset(cfg: DatasetConfig) -> Splits:
    """Load (or generate) a data set and cut it to the configured sizes."""
    return DATASETS.get(cfg.name)(cfg)  # an unknown name fails with the valid names
