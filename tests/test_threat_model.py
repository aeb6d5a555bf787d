"""The surrogate threat model: ``white-box`` (the default, keys as before) and ``transfer`` (an independently
pretrained surrogate: the zoo seed + 1, the other half of the source pool)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmark.errors import UEBenchError
from benchmark.execute import LocalExecutor
from benchmark.plan import plan, reference_key
from benchmark.presets import preset_from_dict
from benchmark.zoo import TRANSFER_HALF, PretrainConfig, Zoo, pretrain, source_halves
from tests.conftest import TINY_ZOO

GRID = {
    "extends": "quick",
    "name": "threat",
    "dataset": {"train_size": 40, "test_size": 20, "source_size": 40},
    "defenses": ["clean", "lsp", "tap"],
    "attacks": ["scratch"],
    "backbones": ["resnet_tiny"],
    "defense_protocol": {"tap": {"surrogate_epochs": 1, "steps": 1, "batch_size": 20, "surrogate_batch_size": 20}},
    "attack_protocol": {"*": {"epochs": 1, "batch_size": 20}},
    "zoo": {"supervised": {"epochs": 1, "batch_size": 20}, "sf": {"epochs": 1, "batch_size": 20}},
}


def test_source_halves_are_disjoint_balanced_and_cover_the_pool(tiny_source):
    a, b = source_halves(tiny_source)
    assert len(a) + len(b) == len(tiny_source), "the halves must cover the pool"
    both = torch.cat([a.images, b.images]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == torch.unique(tiny_source.images.flatten(1), dim=0).shape[0], \
        "an image is in both halves, or in none"
    for k in tiny_source.labels.unique():
        na, nb = int((a.labels == k).sum()), int((b.labels == k).sum())
        assert abs(na - nb) <= 1, f"class {int(k)}: halves of {na} and {nb} images are not balanced"


def test_transfer_weights_differ_and_come_from_the_other_half_with_another_seed(tmp_path, tiny_source):
    zoo = Zoo(tmp_path, pool=tiny_source, pool_key={"t": 1}, config=TINY_ZOO)
    transfer = zoo.transfer()
    half = source_halves(tiny_source)[TRANSFER_HALF]
    assert torch.equal(transfer.pool.images, half.images), "the transfer surrogate must pretrain on the other half"
    assert transfer.config.seed == zoo.config.seed + 1, "the transfer surrogate must use another seed"
    assert transfer.key("resnet_tiny", "supervised") != zoo.key("resnet_tiny", "supervised"), \
        "transfer and white-box weights share a cache entry"
    white, _ = zoo.build("resnet_tiny", "supervised")
    got, _ = transfer.build("resnet_tiny", "supervised")
    assert not torch.equal(white["conv1.weight"], got["conv1.weight"]), "transfer weights equal the victims'"
    assert transfer.config.supervised.epochs == 2 * TINY_ZOO.supervised.epochs, \
        "on half the images the transfer surrogate must train twice the epochs (the same steps)"
    doubled = replace(TINY_ZOO.supervised, epochs=2 * TINY_ZOO.supervised.epochs,
                      warmup_epochs=2 * TINY_ZOO.supervised.warmup_epochs)
    want = pretrain("resnet_tiny", "supervised", half, replace(TINY_ZOO, seed=1, supervised=doubled),
                    device=torch.device("cpu"))
    assert torch.equal(got["conv1.weight"], want.net.state_dict()["conv1.weight"]), \
        "transfer weights are not those pretrained on the other half with seed + 1"


def test_transfer_needs_a_source_pool(tmp_path):
    with pytest.raises(UEBenchError, match="has none"):
        Zoo(tmp_path, pool=None, pool_key={"t": 1}).transfer()
    with pytest.raises(UEBenchError, match="timm"):
        Zoo(tmp_path, pool=None, pool_key={"t": 1}, config=PretrainConfig(supervised_weights="timm")).transfer()


def test_default_fields_keep_the_keys_and_transfer_changes_only_zoo_surrogates():
    preset = preset_from_dict(dict(GRID))
    default, white, transfer = plan(preset), plan(preset, threat_model="white-box"), plan(preset, threat_model="transfer")
    assert [c.key for c in default] == [c.key for c in white], "an explicit white-box changed a key"
    assert "threat_model" not in default[0].config(), "white-box must add nothing to a cell's config"
    assert "supervised_weights" not in PretrainConfig().recipe({"sf"}), "the zoo default entered the recipe"
    for w, t in zip(white, transfer):
        uses_zoo = bool(w.defense.plugin.zoo_sources())
        assert (w.key != t.key) == uses_zoo, f"{w.describe()}: the key must change exactly when the surrogate uses the zoo"
        assert (w.protected_key() != t.protected_key()) == uses_zoo, f"{w.describe()}: protected key"
        assert t.defense.label == (f"{w.defense.label}[transfer]" if uses_zoo else w.defense.label)
        assert reference_key(w.config()) == reference_key(t.config()), "transfer must keep the clean reference"
        assert t.surrogate_threat_model == ("transfer" if uses_zoo else "none")
    with pytest.raises(UEBenchError, match="threat_model"):
        plan(preset, threat_model="grey-box")


def test_a_transfer_record_carries_its_threat_model_and_the_surrogate_uses_the_transfer_zoo(tmp_path):
    cells = [c for c in plan(preset_from_dict(dict(GRID)), threat_model="transfer") if c.defense.name == "tap"]
    executor = LocalExecutor(tmp_path / "cache", device=torch.device("cpu"), progress=False)
    (record,) = executor.run(cells)
    assert record.status == "ok", record.error
    assert record.defense == "tap[transfer]"
    assert record.config["threat_model"] == "transfer", record.config.keys()
    assert record.metrics["metadata"]["surrogate_threat_model"] == "transfer"
    zoo = executor.context(cells[0]).zoo
    assert not executor.cache.path("zoo", zoo.key("resnet_tiny", "supervised")).is_file(), \
        "the defense built the victims' zoo weights"
    assert executor.cache.path("zoo", zoo.transfer().key("resnet_tiny", "supervised")).is_file(), \
        "the defense did not use the transfer zoo"
