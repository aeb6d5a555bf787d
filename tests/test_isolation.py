"""Plugins are isolated: one that writes into its input fails only its own cells, and the other cells
compute what they compute without it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from benchmark.errors import UEBenchError
from benchmark.execute import LocalExecutor, run_grid
from benchmark.isolation import Handout, IsolationError
from benchmark.plan import plan
from benchmark.plugins import Attack, Defense, Protected
from benchmark.presets import preset_from_dict
from benchmark.registry import ATTACKS, DEFENSES

GRID = {
    "extends": "quick",
    "name": "tiny",
    "dataset": {"train_size": 60, "test_size": 30, "source_size": 24},
    "backbones": ["resnet_tiny"],
    "attack_protocol": {"scratch": {"epochs": 1, "batch_size": 32}},
}


@dataclass(frozen=True)
class WritesInput(Defense):
    """Zeroes the images it is handed and publishes an unchanged copy: every output check passes."""

    title = "writes into its input"

    def _perturb(self, train, ctx):
        out = train.images.clone()
        train.images.zero_()
        return Protected(train.with_images(out), None)


@dataclass(frozen=True)
class WritesInputAttack(Attack):
    """Zeroes the protected images it is handed, then returns an untrained model."""

    title = "writes into its input"

    def _fit(self, train, backbone, ctx):
        train.images.zero_()
        return _linear(train)


def _linear(train) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(train.images[0].numel(), train.num_classes))


@pytest.fixture
def plugins():
    added = [(DEFENSES, "writes_input", WritesInput), (ATTACKS, "writes_input_attack", WritesInputAttack)]
    for registry, name, cls in added:
        registry.register(name)(cls)
    yield
    for registry, name, _ in added:
        registry.unregister(name)


def _grid(tmp_path, name: str, defenses: list[str], attacks: list[str]):
    out = tmp_path / name
    executor = LocalExecutor(out / "cache", device=torch.device("cpu"), progress=False)
    summary = run_grid(plan(preset_from_dict(dict(GRID, defenses=defenses, attacks=attacks))), out, executor)
    return {(r.defense, r.attack): r for r in summary.ran}


def test_a_plugin_that_writes_into_its_input_fails_and_changes_nothing_else(tmp_path, plugins):
    bad = _grid(tmp_path, "bad", ["clean", "writes_input", "random_noise"], ["writes_input_attack", "scratch"])
    for attack in ("writes_input_attack", "scratch"):
        rec = bad[("writes_input", attack)]
        assert rec.status == "failed" and rec.error.startswith(
            "IsolationError: defense 'writes_input' modified its input in place (the clean training images)"), \
            f"the defense that zeroed its input must fail its cells naming the rule: {rec.error}"
    for defense in ("clean", "random_noise"):
        rec = bad[(defense, "writes_input_attack")]
        assert rec.status == "failed" and "attack 'writes_input_attack' modified its input in place (the " \
            "protected training images)" in rec.error, f"the attack that zeroed its input must fail: {rec.error}"
    good = _grid(tmp_path, "good", ["clean", "random_noise"], ["scratch"])
    for defense in ("clean", "random_noise"):
        got, want = bad[(defense, "scratch")], good[(defense, "scratch")]
        assert got.status == want.status == "ok", (got.error, want.error)
        assert (got.accuracy, got.train_accuracy) == (want.accuracy, want.train_accuracy), \
            f"{defense} / scratch after the bad plugins: {got.accuracy}, without them: {want.accuracy}"
        assert got.metrics["perturbation"]["linf"] == want.metrics["perturbation"]["linf"], \
            f"{defense}'s protected set changed: {got.metrics['perturbation']} != {want.metrics['perturbation']}"


def test_a_handout_notices_changed_labels_and_swapped_tensors(tiny_train):
    original = tiny_train.images.clone()
    with pytest.raises(IsolationError, match=r"defense 'x' modified its input in place \(the clean training labels\)"):
        with Handout("defense 'x'") as h:
            h.copy(tiny_train, "the clean training").labels[0] += 1
    with pytest.raises(IsolationError, match=r"\(the source pool images\)"):
        with Handout("attack 'y'") as h:
            object.__setattr__(h.copy(tiny_train, "the source pool"), "images", torch.zeros_like(original))
    with pytest.raises(IsolationError, match="modified its input in place") as caught:  # the cause named first
        with Handout("defense 'x'") as h:
            h.copy(tiny_train, "the clean training").images.zero_()
            raise UEBenchError("linf budget check failed")
    assert isinstance(caught.value.__cause__, UEBenchError), "the plugin's own error must be kept as the cause"
    with Handout("defense 'x'") as h:
        h.copy(tiny_train, "the clean training")  # untouched: no error
    assert torch.equal(tiny_train.images, original), "the original must never change"
