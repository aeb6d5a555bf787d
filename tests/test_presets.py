"""The built-in presets: standard and paper cover every registered defense and paradigm; paper is BAIT's
protocol (timm ImageNet ResNet-18 at 32x32, SGD 1e-3, cosine, 60 epochs), its surrogates timm's too."""

from __future__ import annotations

import pytest
import torch

from benchmark.config import parse_spec
from benchmark.models import create_model
from benchmark.plan import plan
from benchmark.presets import PRESETS
from benchmark.registry import ATTACKS, DEFENSES
from benchmark.zoo import PretrainConfig, Zoo


@pytest.mark.parametrize("name", ["standard", "paper"])
def test_standard_and_paper_cover_every_defense_and_paradigm(name):
    preset = PRESETS.get(name)
    defenses = {parse_spec(s)[0] for s in preset.defenses}
    attacks = {parse_spec(s)[0] for s in preset.attacks}
    assert defenses == set(DEFENSES.names()), f"{name} misses defenses {set(DEFENSES.names()) - defenses}"
    paradigms = {n for n in ATTACKS.names() if not ATTACKS.get(n).composes}  # countermeasures are quick-cm's
    assert attacks == paradigms, f"{name} misses paradigms {paradigms - attacks}"
    assert preset.threat_model == "white-box", "the built-in presets run the papers' (white-box) setting"
    plan(preset)  # every field resolves and every (attack, backbone) pair is valid


def test_bait_and_ssc_run_at_their_published_settings_in_standard():
    cells = {c.defense.label: c.defense.plugin for c in plan(PRESETS.get("standard"), attacks=["scratch"])}
    for name in ("bait", "ssc", "em", "tap", "rem"):
        assert cells[name] == DEFENSES.get(name)(), f"standard must run {name} at its defaults (the published ones)"


def test_paper_follows_baits_protocol():
    cells = plan(PRESETS.get("paper"))
    assert {c.backbone for c in cells} == {"resnet18_in"}, "paper's victims are the ImageNet ResNet-18"
    assert cells[0].dataset.name == "cifar10" and cells[0].zoo.supervised_weights == "timm"
    for c in cells:
        a = c.attack.plugin
        assert (a.optimizer, a.schedule, a.epochs) == ("sgd", "cosine", 60), f"{c.attack.label}: not SGD cosine 60"
        if c.attack.name in ("frozen_shallow", "full_finetune", "sf_pretrain"):
            assert a.lr == pytest.approx(1e-3), f"{c.attack.label}: BAIT fine-tunes at lr 1e-3, got {a.lr}"
        if c.attack.name in ("linear_probe", "frozen_shallow", "full_finetune"):
            assert a.weights == "timm", f"{c.attack.label} must start from timm's ImageNet weights"
        if c.defense.name in ("bait", "ssc"):
            assert c.defense.plugin.surrogate_backbone == "resnet18_in", f"{c.defense.label}: surrogate"


def test_zoo_supervised_weights_from_timm_need_no_pool_and_enter_the_key(tmp_path, monkeypatch):
    net = create_model("resnet_tiny", 7, 32).net
    monkeypatch.setattr("benchmark.zoo._timm_weights", lambda backbone, path: net.state_dict())
    zoo = Zoo(tmp_path, pool=None, pool_key={"t": 1}, config=PretrainConfig(supervised_weights="timm"))
    model = zoo.get("resnet_tiny", "supervised", 5, 32)
    assert torch.equal(model.net.conv1.weight, net.conv1.weight), "the supervised weights must be timm's"
    pool = Zoo(tmp_path, pool=None, pool_key={"t": 1})
    assert zoo.key("resnet_tiny", "supervised") != pool.key("resnet_tiny", "supervised"), \
        "timm and pool weights must not share a key"


def test_fashion_is_the_quick_grid_on_fashion_mnist_with_its_own_rem_bait_and_ssc_budgets():
    quick, fashion = PRESETS.get("quick"), PRESETS.get("fashion")
    assert fashion.dataset.name == "fashion-mnist" and fashion.dataset.train_size == 10_000
    assert (fashion.defenses, fashion.attacks) == (quick.defenses, quick.attacks), "the whole quick cross product"
    assert fashion.attack_protocol == quick.attack_protocol and fashion.zoo == quick.zoo
    assert "glyphs" not in fashion.protocol_note and "Fashion-MNIST" in fashion.protocol_note
    own_budgets = ("rem", "bait", "ssc")
    for name, fields in fashion.defense_protocol.items():
        if name not in own_budgets:
            assert fields == quick.defense_protocol[name], f"{name}: fashion generates with quick's budget"
    cells = {c.defense.label: c.defense.plugin for c in plan(fashion, attacks=["scratch"])}
    quick_cells = {c.defense.label: c.defense.plugin
                   for c in plan(quick, attacks=["scratch"], backbones=["resnet_tiny"])}
    for name in own_budgets:
        assert cells[name] != quick_cells[name], f"{name}: fashion's budget is measured on Fashion-MNIST"
