"""The procedural ``shapes`` data set: deterministic, nested, balanced, with a disjoint source label set."""

from __future__ import annotations

import pytest
import torch

from benchmark.data import DatasetConfig, load_dataset
from benchmark.shapes import SHAPE_CLASSES, generate


@pytest.mark.parametrize("split", ["train", "test", "source"])
def test_same_seed_same_bytes(split):
    a, la, _ = generate(split, 12, seed=7)
    b, lb, _ = generate(split, 12, seed=7)
    assert a.dtype == torch.uint8 and a.shape == (12, 3, 32, 32), f"{split}: {a.dtype} {tuple(a.shape)}"
    assert torch.equal(a, b) and torch.equal(la, lb), f"{split}: same seed gave different images"


@pytest.mark.parametrize("split", ["train", "test", "source"])
def test_other_seed_other_images(split):
    a, _, _ = generate(split, 12, seed=7)
    b, _, _ = generate(split, 12, seed=8)
    same = sum(torch.equal(x, y) for x, y in zip(a, b))
    assert same == 0, f"{split}: {same} of 12 images identical under another seed"


def test_splits_differ_for_one_seed():
    train, _, _ = generate("train", 10, seed=0)
    test, _, _ = generate("test", 10, seed=0)
    assert not any(torch.equal(x, y) for x, y in zip(train, test)), "train and test share images"


@pytest.mark.parametrize("split", ["train", "source"])
def test_smaller_generation_is_a_prefix_of_a_larger_one(split):
    small, ls, cs = generate(split, 9, seed=3)
    large, ll, cl = generate(split, 30, seed=3)
    assert torch.equal(small, large[:9]) and torch.equal(ls, ll[:9]), f"{split}: first 9 images changed with n"
    assert cs == cl, "classes changed with n"


def test_ten_balanced_classes():
    _, labels, classes = generate("train", 35, seed=0)
    assert classes == SHAPE_CLASSES and len(classes) == 10, f"classes {classes}"
    counts = labels.bincount(minlength=10)
    assert int(counts.max() - counts.min()) <= 1, f"unbalanced labels {counts.tolist()}"


def test_load_dataset_source_has_a_disjoint_label_set():
    splits = load_dataset(DatasetConfig("shapes", train_size=20, test_size=10, source_size=24))
    assert splits.train.num_classes == 10 and splits.test.classes == splits.train.classes, "target classes wrong"
    assert splits.source is not None, "shapes must provide a source pool"
    overlap = set(splits.source.classes) & set(splits.train.classes)
    assert not overlap, f"source pool shares classes {overlap} with the target task"
    assert len(splits.source.classes) >= 10, f"only {len(splits.source.classes)} source classes"
    assert splits.source.labels.bincount(minlength=24).tolist() == [1] * 24, "source labels not balanced"
    assert (len(splits.train), len(splits.test), len(splits.source)) == (20, 10, 24), "sizes not honoured"


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split must be one of"):
        generate("validation", 1, seed=0)
