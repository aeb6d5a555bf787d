"""Every data loader on small files written here in the real on-disk formats (no network, no real data).

Formats: idx (Fashion-MNIST, raw and gzipped), CIFAR-10/100 python pickle batches, SVHN ``*_32x32.mat``,
a Hugging Face ``save_to_disk`` folder. The CIFAR and SVHN files are also read with torchvision's own
loaders (their md5 check patched out) to prove the layouts agree.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data import (DATASETS, FASHION_MNIST_DIR, DatasetConfig, ImageSet, balanced_subset, load_dataset,
                            read_idx)
from benchmark.errors import UEBenchError

# ---------------------------------------------------------------- writers of the real formats


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def unique_images(n: int, h: int, w: int, offset: int = 0) -> np.ndarray:
    """N x H x W uint8 images whose first two pixels encode their index, so content identifies them."""
    rng = np.random.default_rng(offset)
    x = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    index = np.arange(offset, offset + n)
    x[:, 0, 0], x[:, 0, 1] = index // 256, index % 256
    return x


def write_fashion(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 10_000)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", unique_images(n, 28, 28, offset), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)


def image_keys(images: torch.Tensor) -> set[int]:
    return {int(a) * 256 + int(b) for a, b in zip(images[:, 0, 0, 0], images[:, 0, 0, 1])}


def write_cifar(root: Path, which: str, per_batch: int = 20) -> tuple[np.ndarray, list[int]]:
    """The pickles of ``cifar-10-batches-py`` or ``cifar-100-python``; returns the training arrays."""
    rng = np.random.default_rng(1)
    k = 10 if which == "cifar10" else 100
    if which == "cifar10":
        folder, test_files = "cifar-10-batches-py", ["test_batch"]
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        meta_file, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(k)], "num_vis": 3072}
        label_key = "labels"
    else:
        folder, train_files, test_files = "cifar-100-python", ["train"], ["test"]
        meta_file = "meta"
        meta = {"fine_label_names": [f"f{i}" for i in range(k)], "coarse_label_names": [f"s{i}" for i in range(20)]}
        label_key, per_batch = "fine_labels", 2 * k
    (root / folder).mkdir(parents=True)
    train_data, train_labels = [], []
    for name in train_files + test_files:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(i % k) for i in range(per_batch)]
        entry = {"data": data, label_key: labels, "batch_label": name, "filenames": [f"{i}.png" for i in labels]}
        if which == "cifar100":
            entry["coarse_labels"] = [i % 20 for i in labels]
        (root / folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        if name in train_files:
            train_data.append(data)
            train_labels.extend(labels)
    (root / folder / meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    return np.vstack(train_data), train_labels


def write_svhn(root: Path, n: int = 30) -> np.ndarray:
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(-1, 1)  # digits 1..10, 10 meaning 0
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_fashion_mnist_loads_idx_files(tmp_path, gz):
    write_fashion(tmp_path, gz=gz)
    splits = load_dataset(DatasetConfig("fashion-mnist", train_size=20, test_size=10, source_size=30,
                                        data_root=str(tmp_path)))
    assert splits.train.images.shape == (20, 3, 28, 28), f"train shape {tuple(splits.train.images.shape)}"
    assert splits.test.images.shape == (10, 3, 28, 28), f"test shape {tuple(splits.test.images.shape)}"
    assert splits.source is not None and len(splits.source) == 30, "source pool missing or of the wrong size"
    assert torch.equal(splits.train.images[:, 0], splits.train.images[:, 2]), "grey channels should be copies"
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert raw.shape == (60, 28, 28) and raw.dtype == np.uint8, f"read_idx gave {raw.shape} {raw.dtype}"
    for name in ("train", "test", "source"):
        counts = getattr(splits, name).labels.bincount(minlength=10)
        assert int(counts.max() - counts.min()) <= 1, f"{name} not class-balanced: {counts.tolist()}"


def test_fashion_mnist_source_pool_is_disjoint_from_train(tmp_path):
    write_fashion(tmp_path, n_train=100)
    splits = load_dataset(DatasetConfig("fashion-mnist", train_size=40, test_size=10, source_size=None,
                                        data_root=str(tmp_path)))
    train, source = image_keys(splits.train.images), image_keys(splits.source.images)
    assert len(train) == 40 and len(source) == 60, f"{len(train)} train and {len(source)} source images"
    assert not train & source, f"images {sorted(train & source)[:5]} are both protected and in the source pool"
    assert max(train | source) < 100, "train/source images must come from the training file only"


def test_a_seed_draws_its_own_fashion_mnist_training_sample(tmp_path):
    """Seed 0's sample is the config's own (its keys unchanged); another seed's is drawn outside the source
    pool, which stays the same (so does the zoo pretrained on it), as does the test set."""
    write_fashion(tmp_path, n_train=100)
    cfg = DatasetConfig("fashion-mnist", train_size=20, test_size=10, source_size=30, data_root=str(tmp_path))
    assert cfg.for_seed(0).key() == cfg.key(), "seed 0's keys must be those of the config's own sample"
    base, other = load_dataset(cfg.for_seed(0)), load_dataset(cfg.for_seed(1))
    assert torch.equal(base.train.images, load_dataset(cfg).train.images)
    train0, train1 = image_keys(base.train.images), image_keys(other.train.images)
    assert len(train1) == 20 and train1 != train0, "seed 1 must protect another sample"
    assert image_keys(other.source.images) == image_keys(base.source.images), "the source pool must not move"
    assert torch.equal(other.test.images, base.test.images), "the test set must not move"
    assert not train1 & image_keys(other.source.images), "seed 1's protected images must stay out of the source pool"
    assert other.train.labels.bincount(minlength=10).tolist() == [2] * 10, "seed 1's sample must stay balanced"
    assert cfg.for_seed(1).key() != cfg.key() and cfg.for_seed(1).source_key() == cfg.source_key(), \
        "another sample needs other keys, but the same source pool key (the same zoo)"


def test_a_seed_generates_its_own_shapes_and_checks_its_range():
    cfg = DatasetConfig("shapes", train_size=20, test_size=10, source_size=24)
    base, other = load_dataset(cfg.for_seed(0)), load_dataset(cfg.for_seed(2))
    assert not torch.equal(base.train.images, other.train.images), "seed 2 must generate other training images"
    assert torch.equal(base.test.images, other.test.images) and torch.equal(base.source.images, other.source.images)
    assert cfg.for_seed(2).train_seed == 2 and DatasetConfig("shapes", sample_seed=5).for_seed(2).train_seed == 7
    with pytest.raises(UEBenchError, match=r"seed 1 draws the training sample with seed 2147483647 \+ 1"):
        DatasetConfig("shapes", sample_seed=2**31 - 1).for_seed(1)
    with pytest.raises(UEBenchError, match=r"train_sample_seed=-1 must be an integer in \[0, 2147483647\]"):
        DatasetConfig("shapes", train_sample_seed=-1)


def test_fashion_mnist_gzip_detected_by_content(tmp_path):
    write_idx(tmp_path / "x-idx1-ubyte", np.arange(5), gz=True)  # gzipped without the .gz suffix
    assert read_idx(tmp_path / "x-idx1-ubyte").tolist() == [0, 1, 2, 3, 4], "gzip without suffix not read"


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(UEBenchError) as err:
        load_dataset(DatasetConfig("fashion-mnist", data_root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert "dataset-fashion-mnist" in msg and "--data-root" in msg, f"unhelpful message: {msg}"


def test_fashion_mnist_missing_file_is_named(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UEBenchError, match="t10k-labels-idx1-ubyte") as err:
        load_dataset(DatasetConfig("fashion-mnist", data_root=str(tmp_path)))
    assert "dataset-fashion-mnist" in str(err.value), f"no install hint: {err.value}"


@pytest.mark.parametrize("payload, pattern", [
    (b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"\x00" * 8, "not an unsigned-byte idx"),  # float dtype
    (b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "not an unsigned-byte idx"),  # bad zero bytes
    (b"\x00\x00\x08\x03\x00\x00", "truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x00", "header says"),
    (b"\x00\x00", "only 2 bytes"),
], ids=["dtype", "magic", "header", "size", "short"])
def test_read_idx_rejects_bad_files(tmp_path, payload, pattern):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(UEBenchError, match=pattern):
        read_idx(path)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files():
    splits = load_dataset(DatasetConfig("fashion-mnist", train_size=1000, test_size=500, source_size=2000))
    shapes = {n: tuple(getattr(splits, n).images.shape) for n in ("train", "test", "source")}
    assert shapes == {"train": (1000, 3, 28, 28), "test": (500, 3, 28, 28), "source": (2000, 3, 28, 28)}, shapes
    for name, per_class in (("train", 100), ("test", 50), ("source", 200)):
        counts = getattr(splits, name).labels.bincount(minlength=10).tolist()
        assert counts == [per_class] * 10, f"{name} class counts {counts}"
    assert splits.train.classes[0] == "t-shirt" and len(splits.train.classes) == 10, splits.train.classes


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100


def _trust_torchvision_files(monkeypatch) -> None:
    """torchvision md5-checks even with download=False; accept the small test files."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_svhn.SVHN, "_check_integrity", lambda self: True)


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_pickles_load_like_torchvision(tmp_path, monkeypatch, which):
    import torchvision

    data, labels = write_cifar(tmp_path, which)
    splits = load_dataset(DatasetConfig(which, data_root=str(tmp_path), verify_checksums=False))
    k = 10 if which == "cifar10" else 100
    assert splits.train.num_classes == k and splits.train.classes[1] == ("c1" if k == 10 else "f1"), \
        f"classes {splits.train.classes[:3]}..."
    assert splits.train.images.shape == (len(labels), 3, 32, 32), f"train {tuple(splits.train.images.shape)}"
    assert torch.equal(splits.train.images.reshape(len(labels), -1), torch.from_numpy(data)), \
        "images differ from the pickled rows (channel-major 3x32x32)"
    assert splits.train.labels.tolist() == labels, "labels differ from the pickled ones"
    assert len(splits.test) > 0 and splits.source is None, "test split empty or an unexpected source pool"
    _trust_torchvision_files(monkeypatch)
    cls = torchvision.datasets.CIFAR10 if which == "cifar10" else torchvision.datasets.CIFAR100
    ref = cls(str(tmp_path), train=True, download=False)
    assert torch.equal(splits.train.images, torch.from_numpy(ref.data).permute(0, 3, 1, 2)), \
        "our CIFAR images disagree with torchvision's reading of the same files"
    assert tuple(ref.classes) == splits.train.classes, "class names disagree with torchvision"


def test_cifar_checksums_are_verified_by_default(tmp_path):
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(UEBenchError, match="verify_checksums") as err:
        load_dataset(DatasetConfig("cifar10", data_root=str(tmp_path)))
    assert "data_batch_1" in str(err.value) and "md5" in str(err.value), f"message names no file: {err.value}"


def test_cifar_files_matching_the_published_checksums_pass(tmp_path, monkeypatch):
    """The default check accepts files whose md5 matches the list (here: the test files' own md5s)."""
    import hashlib

    import torchvision

    write_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})
    splits = load_dataset(DatasetConfig("cifar10", data_root=str(tmp_path)))
    assert len(splits.train) == 100 and len(splits.test) == 20, "verified files did not load in full"
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:-1] + b"\x00")
    with pytest.raises(UEBenchError, match="data_batch_3 has md5"):
        load_dataset(DatasetConfig("cifar10", data_root=str(tmp_path)))


def test_cifar_missing_files_are_listed(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UEBenchError, match="test_batch") as err:
        load_dataset(DatasetConfig("cifar10", data_root=str(tmp_path), verify_checksums=False))
    assert "--data-root" in str(err.value), f"no hint how to fix: {err.value}"


def test_cifar_balanced_subsample(tmp_path):
    write_cifar(tmp_path, "cifar10", per_batch=20)
    splits = load_dataset(DatasetConfig("cifar10", train_size=30, test_size=10, data_root=str(tmp_path),
                                        verify_checksums=False))
    assert splits.train.labels.bincount(minlength=10).tolist() == [3] * 10, "train subsample not balanced"
    assert splits.test.labels.bincount(minlength=10).tolist() == [1] * 10, "test subsample not balanced"


def test_unverified_data_is_keyed_apart():
    assert "verify_checksums" not in DatasetConfig("cifar10").key(), "default key must stay unchanged"
    assert DatasetConfig("cifar10").key() != DatasetConfig("cifar10", verify_checksums=False).key(), \
        "unverified files must not share a cache key with the official release"


# ---------------------------------------------------------------- SVHN


def test_svhn_mat_files_load_like_torchvision(tmp_path, monkeypatch):
    pytest.importorskip("scipy", reason="svhn needs scipy")
    import torchvision

    write_svhn(tmp_path)
    splits = load_dataset(DatasetConfig("svhn", data_root=str(tmp_path), verify_checksums=False))
    assert splits.train.images.shape == (30, 3, 32, 32), f"train {tuple(splits.train.images.shape)}"
    assert splits.train.labels.min() == 0 and splits.train.labels.max() == 9, "label 10 must become 0"
    assert splits.train.labels[9] == 0 and splits.train.labels[0] == 1, "digit labels shifted"
    _trust_torchvision_files(monkeypatch)
    ref = torchvision.datasets.SVHN(str(tmp_path), split="test", download=False)
    assert torch.equal(splits.test.images, torch.from_numpy(ref.data)), "images disagree with torchvision"
    assert splits.test.labels.tolist() == ref.labels.tolist(), "labels disagree with torchvision"
    with pytest.raises(UEBenchError, match="md5"):
        load_dataset(DatasetConfig("svhn", data_root=str(tmp_path)))


# ---------------------------------------------------------------- Hugging Face


def write_hf(path: Path, n_train: int = 12, n_test: int = 6, as_dict: bool = True) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})

    def split(n: int, offset: int) -> datasets.Dataset:
        images = [Image.fromarray(np.full((8, 8, 3), offset + i, np.uint8)) for i in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)

    data = datasets.DatasetDict({"train": split(n_train, 0), "test": split(n_test, 100)}) if as_dict \
        else split(n_train, 0)
    data.save_to_disk(str(path))


def test_hf_saved_dataset_dict(tmp_path):
    write_hf(tmp_path / "ds")
    splits = load_dataset(DatasetConfig(f"hf:{tmp_path / 'ds'}", train_size=9))
    assert splits.train.classes == ("a", "b", "c"), f"ClassLabel names lost: {splits.train.classes}"
    assert splits.train.images.shape == (9, 3, 8, 8), f"train {tuple(splits.train.images.shape)}"
    assert splits.train.labels.bincount().tolist() == [3, 3, 3], "hf subsample not balanced"
    assert splits.test.images.shape == (6, 3, 8, 8) and splits.source is None, "test split wrong"
    values = splits.train.images[:, 0, 0, 0]
    assert torch.equal(values % 3, splits.train.labels), "decoded images do not belong to their labels"
    assert int(splits.test.images.min()) >= 100, "test images mixed with train images"


def test_hf_single_split_is_rejected(tmp_path):
    write_hf(tmp_path / "one", as_dict=False)
    with pytest.raises(UEBenchError, match="single split"):
        load_dataset(DatasetConfig(f"hf:{tmp_path / 'one'}"))


def test_hf_missing_columns_are_named(tmp_path):
    write_hf(tmp_path / "ds")
    with pytest.raises(UEBenchError) as err:
        load_dataset(DatasetConfig(f"hf:{tmp_path / 'ds'}", image_column="img", label_column="y"))
    msg = str(err.value)
    assert "'img'" in msg and "'y'" in msg and "image" in msg and "label" in msg, f"columns not named: {msg}"


def test_hf_missing_path_is_a_clean_error(tmp_path):
    with pytest.raises(UEBenchError, match="cannot load"):
        load_dataset(DatasetConfig(f"hf:{tmp_path / 'absent'}"))


# ---------------------------------------------------------------- names, balanced_subset, ImageSet


def test_unknown_name_lists_valid_names():
    with pytest.raises(UEBenchError) as err:
        load_dataset(DatasetConfig("imagenet-but-typo"))
    for name in DATASETS.names():
        assert name in str(err.value), f"valid name {name!r} missing from: {err.value}"


def _labelled(n: int, k: int) -> ImageSet:
    images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).remainder(256).to(torch.uint8)
    return ImageSet(images, torch.arange(n) % k, tuple(str(i) for i in range(k)), "toy")


@pytest.mark.parametrize("n", [0, 1, 7, 10, 23, 50])
def test_balanced_subset_is_balanced(n):
    data = _labelled(100, 5)
    subset, idx = balanced_subset(data, n, seed=0)
    assert len(subset) == n and len(set(idx.tolist())) == n, f"asked {n}, got {len(subset)}"
    counts = subset.labels.bincount(minlength=5)
    assert int(counts.max() - counts.min()) <= 1, f"class counts {counts.tolist()} differ by more than 1"
    assert torch.equal(subset.labels, data.labels[idx]), "indices do not match the subset"


def test_balanced_subset_seeded_and_exclusive():
    data = _labelled(100, 5)
    a, ia = balanced_subset(data, 20, seed=3)
    _, ib = balanced_subset(data, 20, seed=3)
    _, ic = balanced_subset(data, 20, seed=4)
    assert torch.equal(ia, ib), "same seed gave different subsets"
    assert not torch.equal(ia, ic), "another seed gave the same subset"
    mask = torch.zeros(100, dtype=torch.bool)
    mask[ia] = True
    _, rest = balanced_subset(data, 80, seed=5, exclude=mask)
    assert not set(rest.tolist()) & set(ia.tolist()), "exclude was not respected"
    _, everything_left = balanced_subset(data, None, seed=5, exclude=mask)
    assert len(everything_left) == 80, f"n=None with exclude gave {len(everything_left)}, not 80"
    with pytest.raises(UEBenchError, match="only 80"):
        balanced_subset(data, 81, seed=5, exclude=mask)
    empty, _ = balanced_subset(data, 0, seed=0, exclude=torch.ones(100, dtype=torch.bool))
    assert len(empty) == 0, "nothing available and n=0 must give an empty subset"


def test_balanced_subset_refuses_unbalanced_request():
    data = ImageSet(torch.zeros(12, 1, 2, 2, dtype=torch.uint8), torch.tensor([0] * 10 + [1] * 2),
                    ("x", "y"), "skewed")
    with pytest.raises(UEBenchError, match="class 'y' has only 2"):
        balanced_subset(data, 8, seed=0)


GOOD = dict(images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), labels=torch.tensor([0, 1, 2, 0]),
            classes=("a", "b", "c"))


@pytest.mark.parametrize("field, value, pattern", [
    ("images", torch.zeros(4, 3, 8, 8), "uint8"),
    ("images", torch.zeros(4, 8, 8, dtype=torch.uint8), "NxCxHxW"),
    ("images", np.zeros((4, 3, 8, 8), np.uint8), "tensor"),
    ("labels", torch.tensor([0, 1, 2, 0], dtype=torch.int32), "int64"),
    ("labels", torch.tensor([0, 1, 2]), r"shape \(4,\)"),
    ("labels", torch.tensor([0, 1, 3, 0]), "outside"),
    ("labels", torch.tensor([0, -1, 2, 0]), "outside"),
], ids=["float", "3d", "numpy", "int32", "length", "too-big", "negative"])
def test_imageset_rejects_bad_input(field, value, pattern):
    with pytest.raises(UEBenchError, match=pattern):
        ImageSet(**{**GOOD, field: value}, name="bad")
    assert len(ImageSet(**GOOD)) == 4, "a valid ImageSet was rejected"
