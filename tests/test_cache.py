"""Caches: a truncated, corrupted or foreign entry of any kind is detected, reported and rebuilt; nothing
is unpickled from a cache or a data file, and checkpoints load without arbitrary unpickling."""

from __future__ import annotations

import logging
import pickle
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmark.cache import Cache, load_verified, save_atomic
from benchmark.data import DatasetConfig, load_dataset
from benchmark.errors import UEBenchError
from benchmark.execute import LocalExecutor
from benchmark.plan import plan
from benchmark.presets import preset_from_dict
from benchmark.zoo import Zoo, read_checkpoint
from tests.conftest import TINY_ZOO
from tests.test_data import write_cifar
from tests.test_runner import TINY

ROOT = Path(__file__).resolve().parents[1]


def _protected(tmp_path: Path):
    """(entry path, build: -> (tensors, was it rebuilt)) of a protected set."""
    cell = plan(preset_from_dict(dict(TINY, defenses=["random_noise"])))[-1]

    def build():
        img, _, seconds = LocalExecutor(tmp_path / "cache", device=torch.device("cpu"), progress=False).protected(cell)
        return img.images, seconds > 0

    return Cache(tmp_path / "cache").path("protected", cell.protected_key()), build


def _zoo(tmp_path: Path, tiny_source):
    zoo = Zoo(tmp_path / "cache", pool=tiny_source, pool_key={"t": 1}, config=TINY_ZOO)

    def build():
        state, hit = zoo.build("resnet_tiny", "supervised")
        return state["conv1.weight"], not hit

    return zoo.cache.path("zoo", zoo.key("resnet_tiny", "supervised")), build


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data), 7):  # inside the tensor data, after the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign_entry(path: Path) -> None:
    """Another valid cache entry (its own checksum is right) copied under this name."""
    save_atomic(path, {"images": torch.zeros(60, 3, 32, 32, dtype=torch.uint8)}, {"certificate": None},
                key=f"{path.parent.name}/someone-else")


def plain_safetensors(path: Path) -> None:
    """A valid safetensors file that the cache never wrote (no checksum)."""
    save_file({"conv1.weight": torch.zeros(3)}, str(path))


@pytest.mark.parametrize("corrupt", [truncate, flip_bytes, foreign_entry, plain_safetensors],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["protected", "zoo"])
def test_a_bad_cache_entry_is_detected_and_rebuilt(tmp_path, tiny_source, caplog, kind, corrupt):
    path, build = _protected(tmp_path) if kind == "protected" else _zoo(tmp_path, tiny_source)
    original, built = build()
    assert built and path.is_file(), f"the first {kind} build must write {path}"
    corrupt(path)
    with caplog.at_level(logging.WARNING, logger="benchmark.cache"):
        rebuilt, built = build()
    assert built, f"a {corrupt.__name__} {kind} entry must be rebuilt, not used"
    assert re.search(rf"cache entry {path.name} is corrupt \(.+\); rebuilding it", caplog.text), \
        f"the {corrupt.__name__} {kind} entry must be reported: {caplog.text!r}"
    assert torch.equal(rebuilt, original), f"the rebuilt {kind} entry must equal the original"
    again, built = build()
    assert not built and torch.equal(again, original), f"the rebuilt {kind} entry must be reused"
    assert load_verified(path, f"{kind}/{path.stem}") is not None, "the rebuilt entry must verify under its name"


def test_entries_written_before_names_were_recorded_still_load(tmp_path):
    path = tmp_path / "zoo" / "abc.safetensors"
    save_atomic(path, {"w": torch.ones(2)}, {"backbone": "x"})  # no key in the header, as older versions wrote
    assert load_verified(path, "zoo/abc") is not None, "an older entry with a valid checksum must be kept"


def test_a_corrupt_checkpoint_file_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UEBenchError, match="cannot read checkpoint"):
        read_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_a_doctored_cifar_batch_is_refused_not_unpickled(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    cfg = DatasetConfig("cifar10", data_root=str(tmp_path), verify_checksums=False)
    with pytest.raises(UEBenchError, match=r"not a CIFAR pickle \(it names \w+\.exec"):
        load_dataset(cfg)


def test_no_module_unpickles():
    """Every load in the library is safetensors, ``weights_only=True`` or the CIFAR allow-list unpickler."""
    unsafe = re.compile(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)|np\.load\(|allow_pickle=True")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for folder in ("benchmark", "defenses", "attacks", "leaderboard") for p in (ROOT / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if unsafe.search(line) and "``" not in line]
    assert not hits, f"unsafe loads: {hits}"


def test_concurrent_builders_of_one_entry_build_it_once(tmp_path):
    """The second builder waits on the entry's lock, then reads what the first wrote."""
    cache, builds, results = Cache(tmp_path), [], {}

    def build():
        builds.append(1)
        time.sleep(0.5)
        return {"w": torch.arange(4)}, {"n": len(builds)}

    def worker(name: str) -> None:
        results[name] = cache.get_or_build("zoo", "shared", build)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert len(builds) == 1, f"the entry was built {len(builds)} times"
    assert sorted(hit for _, _, hit in results.values()) == [False, True], "one build, one cache hit"
    assert all(torch.equal(t["w"], torch.arange(4)) for t, _, _ in results.values()), "both see the same entry"
