"""Shared fixtures: tiny data, a context with a temporary cache, and marker handling."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import attacks  # noqa: E402,F401  (built-in plugins register on import)
import defenses  # noqa: E402,F401
from benchmark.data import ImageSet  # noqa: E402
from benchmark.plugins import Context  # noqa: E402
from benchmark.shapes import generate  # noqa: E402
from benchmark.zoo import PretrainConfig, Zoo  # noqa: E402
from benchmark.training import TrainConfig  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_train() -> ImageSet:
    """40 shapes images (4 per class), 32x32 RGB."""
    images, labels, classes = generate("train", 40, seed=0)
    return ImageSet(images, labels, classes, "shapes-tiny-train")


@pytest.fixture(scope="session")
def tiny_test() -> ImageSet:
    images, labels, classes = generate("test", 20, seed=0)
    return ImageSet(images, labels, classes, "shapes-tiny-test")


@pytest.fixture(scope="session")
def tiny_source() -> ImageSet:
    images, labels, classes = generate("source", 48, seed=0)
    return ImageSet(images, labels, classes, "shapes-tiny-source")


TINY_ZOO = PretrainConfig(supervised=TrainConfig(epochs=1, batch_size=16, augment="none"),
                          sf=TrainConfig(epochs=1, batch_size=16, lr=1e-3, optimizer="adamw", augment="none"))


@pytest.fixture
def ctx(tmp_path, tiny_source) -> Context:
    """A CPU context with a fresh cache and a tiny zoo (1-epoch pretraining)."""
    zoo = Zoo(tmp_path / "cache", pool=tiny_source, pool_key={"test": "tiny"}, config=TINY_ZOO)
    return Context(device=torch.device("cpu"), seed=0, cache_dir=tmp_path / "cache", source=tiny_source,
                   dataset_key={"test": "tiny"}, zoo=zoo)
