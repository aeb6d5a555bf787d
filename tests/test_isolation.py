"""Plugins are isolated and time-limited: one that writes into its input, hangs or segfaults fails only its
own cells, and the other cells compute what they compute without it."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from benchmark.child import Crashed, TimedOut, call_in_child
from benchmark.errors import UEBenchError
from benchmark.execute import LocalExecutor, run_grid
from benchmark.isolation import Handout, IsolationError
from benchmark.plan import plan
from benchmark.plugins import Attack, Defense, Fitted, Protected
from benchmark.presets import preset_from_dict
from benchmark.registry import ATTACKS, DEFENSES
from run_benchmark import main

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


@dataclass(frozen=True)
class Untrained(Attack):
    """A linear model, not trained: a cell that costs nothing."""

    title = "an untrained linear model"

    def _fit(self, train, backbone, ctx):
        return Fitted(_linear(train), train_accuracy=0.0)


@dataclass(frozen=True)
class HangsAttack(Attack):
    title = "never returns"

    def _fit(self, train, backbone, ctx):
        time.sleep(3600)


@dataclass(frozen=True)
class Hangs(Defense):
    title = "never returns"

    def _perturb(self, train, ctx):
        time.sleep(3600)


@dataclass(frozen=True)
class Segfaults(Defense):
    title = "crashes in native code"

    def _perturb(self, train, ctx):
        faulthandler.disable()  # in the cell's process only: no traceback dump in the test output
        os.kill(os.getpid(), signal.SIGSEGV)


def _linear(train) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(train.images[0].numel(), train.num_classes))


@pytest.fixture
def plugins():
    added = [(DEFENSES, "writes_input", WritesInput), (DEFENSES, "hangs", Hangs), (DEFENSES, "segfaults", Segfaults),
             (ATTACKS, "writes_input_attack", WritesInputAttack), (ATTACKS, "untrained", Untrained),
             (ATTACKS, "hangs_attack", HangsAttack)]
    for registry, name, cls in added:
        registry.register(name)(cls)
    yield
    for registry, name, _ in added:
        registry.unregister(name)


def _grid(tmp_path, name: str, defenses: list[str], attacks: list[str], timeout: float | None = None):
    out = tmp_path / name
    executor = LocalExecutor(out / "cache", device=torch.device("cpu"), progress=False, cell_timeout=timeout)
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


def test_a_hanging_plugin_times_out_and_the_run_goes_on(tmp_path, plugins):
    start = time.perf_counter()
    recs = _grid(tmp_path, "out", ["clean", "hangs", "random_noise"], ["untrained", "hangs_attack"], timeout=2)
    for key in [("hangs", "untrained"), ("hangs", "hangs_attack"), ("clean", "hangs_attack"),
                ("random_noise", "hangs_attack")]:
        assert recs[key].status == "failed" and recs[key].error.startswith("timed out after 2 s"), \
            f"{key} must time out: {recs[key].status} {recs[key].error}"
    assert "not tried again" in recs[("hangs", "hangs_attack")].error, \
        f"a defense whose generation timed out is not retried by its next cell: {recs[('hangs', 'hangs_attack')].error}"
    for key in [("clean", "untrained"), ("random_noise", "untrained")]:
        assert recs[key].status == "ok", f"{key} must run: {recs[key].error}"
        assert recs[key].defense_seconds > 0, "the first cell of a defense generates its protected set"
    assert recs[("clean", "hangs_attack")].metrics["metadata"]["attack"]["title"] == "never returns", \
        "a timed-out cell still records its plugins' metadata"
    again = _grid(tmp_path, "out", ["clean", "random_noise"], ["untrained", "scratch"], timeout=60)
    assert again[("random_noise", "scratch")].defense_seconds == 0, \
        "a protected set built in a child must reach later cells through the disk cache"
    assert time.perf_counter() - start < 90, "the hanging cells must not hold the run"


def test_a_segfault_fails_only_its_cells(tmp_path, plugins):
    recs = _grid(tmp_path, "out", ["clean", "segfaults", "random_noise"], ["untrained"], timeout=60)
    assert recs[("segfaults", "untrained")].status == "failed", recs
    assert recs[("segfaults", "untrained")].error.startswith("crashed: killed by signal 11 (SIGSEGV)"), \
        recs[("segfaults", "untrained")].error
    assert [recs[(d, "untrained")].status for d in ("clean", "random_noise")] == ["ok", "ok"], \
        [recs[(d, "untrained")].error for d in ("clean", "random_noise")]


def test_call_in_child_returns_and_reports():
    assert call_in_child(lambda: {"x": 1}, 30) == {"x": 1}, "a result must come back from the child"
    with pytest.raises(TimedOut, match=r"^timed out after 0.5 s$"):
        call_in_child(lambda: time.sleep(60), 0.5)
    with pytest.raises(Crashed, match=r"killed by signal 9 \(SIGKILL; e.g. the out-of-memory killer\)"):
        call_in_child(lambda: os.kill(os.getpid(), signal.SIGKILL), 30)
    with pytest.raises(UEBenchError, match="a bad value"):
        call_in_child(_raise_user_error, 30)


def test_a_child_can_use_the_thread_pool_the_parent_used():
    """GNU libgomp has no fork handler: without releasing the pool first, the child hangs here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.ones(1_000_000).exp().sum()  # the parent's OpenMP pool now has threads
        got = call_in_child(lambda: (torch.get_num_threads(), float(torch.ones(1_000_000).exp().sum())), 30)
        torch.ones(1_000_000).exp().sum()  # and the parent's still works
    finally:
        torch.set_num_threads(threads)
    assert got[0] == 2 and got[1] == pytest.approx(2.718281828e6, rel=1e-4), f"child: {got}"


def _raise_user_error() -> None:
    raise UEBenchError("a bad value")


def test_the_time_limit_comes_from_the_preset_or_the_command_line(tmp_path, monkeypatch, capsys):
    assert preset_from_dict({"extends": "quick", "cell_timeout": 7}).cell_timeout == 7.0
    assert preset_from_dict({"extends": "quick"}).cell_timeout is None, "built-in presets set no time limit"
    for bad in (-1, "x", True, float("nan")):
        with pytest.raises(UEBenchError, match=r"preset: cell_timeout=.* must be a number of seconds > 0"):
            preset_from_dict({"extends": "quick", "cell_timeout": bad})
    toml = tmp_path / "p.toml"
    toml.write_text('extends = "quick"\ncell_timeout = 7\ndefenses = ["clean"]\nattacks = ["scratch"]\n'
                    'backbones = ["resnet_tiny"]\n[dataset]\ntrain_size = 20\n')
    seen: list[float | None] = []

    def fake_run_grid(cells, out, executor):
        seen.append(executor.cell_timeout)
        raise UEBenchError("stopped before any work")

    def fake_submit(*args, cell_timeout, **kwargs):
        seen.append(cell_timeout)
        raise UEBenchError("stopped before any work")

    monkeypatch.setattr("benchmark.execute.run_grid", fake_run_grid)
    monkeypatch.setattr("leaderboard.cli.submit", fake_submit)
    base = ["run", "--preset", str(toml), "--out", str(tmp_path / "out"), "--device", "cpu"]
    for extra in ([], ["--cell-timeout", "3"], ["--cell-timeout", "0"]):
        assert main(base + extra) == 2
    assert main(["submit", "x.py", "--preset", str(toml), "--cell-timeout", "4", "--device", "cpu"]) == 2
    assert seen == [7.0, 3.0, None, 4.0], f"time limits reaching the executor: {seen}"
    capsys.readouterr()
    assert main(base + ["--cell-timeout", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--cell-timeout=-1.0 must be a number of seconds > 0" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--cell-timeout SECONDS" in capsys.readouterr().out, "run --help must document --cell-timeout"



SUBMISSION = '''
import time
from dataclasses import dataclass
from benchmark.plugins import Defense
from benchmark.registry import DEFENSES


@DEFENSES.register("{name}")
@dataclass(frozen=True)
class Submitted(Defense):
    title = "A test defense"
    paper = "2101.04898"
    venue = "ICLR"
    year = 2021
    norm = "linf"
    granularity = "class"
    eps: float = 8 / 255

    def _perturb(self, train, ctx):
        {body}
        return train
'''


@pytest.mark.parametrize("name, body, timeout, message", [
    ("sub_hangs", "time.sleep(3600)", 2, "perturb on a trial on a few images raised TimedOut: timed out after 2 s"),
    ("sub_writes", "train.images.zero_()", None, "defense 'sub_writes' modified its input in place (the clean "
                                                 "training images)"),
])
def test_submit_refuses_a_plugin_that_hangs_or_writes_into_its_input(tmp_path, name, body, timeout, message):
    from benchmark.presets import load_preset
    from leaderboard.submit import submit

    path = tmp_path / f"{name}.py"
    path.write_text(SUBMISSION.format(name=name, body=body))
    preset = tmp_path / "tiny.toml"
    preset.write_text('extends = "quick"\nname = "tinysub"\nbackbones = ["resnet_tiny"]\n'
                      '[dataset]\ntrain_size = 20\ntest_size = 10\nsource_size = 20\n')
    with pytest.raises(UEBenchError, match="refused") as err:
        submit(path, load_preset(str(preset)), out_dir=tmp_path / "out", entries_dir=tmp_path / "entries",
               device=torch.device("cpu"), progress=False, cell_timeout=timeout)
    assert message in str(err.value), f"the refusal must say why ({message!r}): {err.value}"
    assert name not in DEFENSES, "a refused plugin must not stay registered"
