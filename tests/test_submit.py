"""``submit``: a good plugin gets its entry and rank; a bad one is refused and changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import run_benchmark
from benchmark.errors import UEBenchError
from benchmark.presets import load_preset
from benchmark.registry import ATTACKS, DEFENSES, load_plugin_file
from benchmark.execute import LocalExecutor, run_grid
from benchmark.plan import plan
from benchmark.store import Store
from leaderboard.entries import read_entry
from leaderboard.submit import certificate_lines, submit

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_ue.py"

HEADER = """
from dataclasses import dataclass
import torch
from benchmark.plugins import Defense, quantize
from benchmark.registry import DEFENSES, ATTACKS
"""
META = """
    title = "A test defense"
    paper = "2101.04898"
    venue = "ICLR"
    year = 2021
    norm = "linf"
    granularity = "class"
"""
BAD_PLUGINS = {
    "no_metadata": ("""
@DEFENSES.register("bad_nometa")
@dataclass(frozen=True)
class Bad(Defense):
    eps: float = 8 / 255
    def _perturb(self, train, ctx):
        return train
""", "incomplete metadata"),
    "over_budget": ("""
@DEFENSES.register("bad_budget")
@dataclass(frozen=True)
class Bad(Defense):
    eps: float = 8 / 255
""" + META + """
    def _perturb(self, train, ctx):
        return train.with_images(quantize(train.images, train.images.float() / 255 + 2 * self.eps))
""", "linf budget check failed"),
    "over_budget_on_the_full_set_only": ("""
@DEFENSES.register("bad_sneaky")
@dataclass(frozen=True)
class Bad(Defense):
    eps: float = 8 / 255
""" + META + """
    def _perturb(self, train, ctx):
        scale = 1 if len(train) <= 30 else 3
        return train.with_images(quantize(train.images, train.images.float() / 255 + scale * self.eps))
""", "the full training set"),
    "raises": ("""
@DEFENSES.register("bad_raises")
@dataclass(frozen=True)
class Bad(Defense):
    eps: float = 8 / 255
""" + META + """
    def _perturb(self, train, ctx):
        raise RuntimeError("surrogate diverged")
""", "RuntimeError: surrogate diverged"),
    "changes_labels": ("""
@DEFENSES.register("bad_labels")
@dataclass(frozen=True)
class Bad(Defense):
    eps: float = 8 / 255
""" + META + """
    def _perturb(self, train, ctx):
        return type(train)(train.images, (train.labels + 1) % train.num_classes, train.classes, train.name)
""", "label check failed"),
    "two_defenses": ("""
@DEFENSES.register("bad_one")
@dataclass(frozen=True)
class A(Defense):
    pass
@DEFENSES.register("bad_two")
@dataclass(frozen=True)
class B(Defense):
    pass
""", "exactly one defense"),
    "http_paper": ("""
@DEFENSES.register("bad_http")
@dataclass(frozen=True)
class Bad(Defense):
    eps: float = 8 / 255
""" + META.replace('"2101.04898"', '"http://example.org/paper.pdf"') + """
    def _perturb(self, train, ctx):
        return train
""", "must be an arXiv id like '2101.04898' or an https:// URL"),
    "title_with_newline": ("""
@DEFENSES.register("bad_title")
@dataclass(frozen=True)
class Bad(Defense):
    eps: float = 8 / 255
""" + META.replace('"A test defense"', '"A test\\ndefense"') + """
    def _perturb(self, train, ctx):
        return train
""", "printable characters (no newlines or control characters)"),
    "path_as_name": ("""
@DEFENSES.register("../../x")
@dataclass(frozen=True)
class Bad(Defense):
    eps: float = 8 / 255
""" + META + """
    def _perturb(self, train, ctx):
        return train
""", "lower-case ASCII letters, digits and '_'"),
    "nothing": ("x = 1\n", "registered nothing"),
    "syntax_error": ("def broken(:\n", "failed to import"),
}


PRESET = """
extends = "quick"
name = "tinysub"
backbones = ["resnet_tiny"]
[dataset]
train_size = 40
test_size = 20
source_size = 40
[attack_protocol.scratch]
epochs = 1
"""


@pytest.fixture
def preset_file(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(PRESET)
    return path


@pytest.fixture(scope="module")
def clean_results(tmp_path_factory) -> Path:
    """A results directory where the preset's clean reference already ran (built once per module)."""
    root = tmp_path_factory.mktemp("clean")
    (root / "tiny.toml").write_text(PRESET)
    out = root / "res"
    run_grid(plan(load_preset(str(root / "tiny.toml")), defenses=["clean"]), out,
             LocalExecutor(out / "cache", device=torch.device("cpu"), progress=False))
    return out


@pytest.fixture
def store_with_clean(tmp_path, clean_results) -> Path:
    """A private copy of ``clean_results``."""
    out = tmp_path / "res"
    shutil.copytree(clean_results, out)
    return out


def snapshot(out: Path, entries: Path) -> tuple:
    with Store(out / "results.sqlite") as store:
        rows = sorted((r["key"], r["status"], r["finished_at"]) for r in store.rows())
    files = sorted((str(p.relative_to(entries)), p.read_bytes()) for p in entries.rglob("*") if p.is_file()) \
        if entries.exists() else []
    return rows, files


def test_example_is_a_valid_class_wise_plugin(tiny_train, ctx):
    added = load_plugin_file(EXAMPLE)
    try:
        assert added == ["defense:my_ue"], f"the example must register exactly my_ue, got {added}"
        plugin = DEFENSES.get("my_ue")()
        result = plugin.perturb(tiny_train, ctx)
        out = result.data
        assert result.certificate is not None and result.certificate.passed, \
            f"the example's class-wise patches must pass its shortcut certificate: {result.certificate}"
        delta = out.images.int() - tiny_train.images.int()
        assert int(delta.abs().max()) <= 8, f"L-inf 8/255 exceeded: {int(delta.abs().max())}"
        assert torch.equal(plugin.perturb(tiny_train, ctx).data.images, out.images), "same seed must give the same bytes"
        meta = plugin.metadata()
        assert (meta["norm"], meta["granularity"]) == ("linf", "class"), f"threat model wrong: {meta}"
    finally:
        DEFENSES.unregister("my_ue")


def test_submit_example_writes_entry_and_ranks(tmp_path, preset_file, store_with_clean):
    entries = tmp_path / "entries"
    with Store(store_with_clean / "results.sqlite") as store:
        clean_before = {r["key"]: r["finished_at"] for r in store.rows()}
    result = submit(EXAMPLE, load_preset(str(preset_file)), out_dir=store_with_clean, entries_dir=entries,
                    device=torch.device("cpu"), progress=False)
    assert "my_ue" not in DEFENSES, "the submitted plugin must be unregistered afterwards"
    entry = read_entry(entries / "tinysub" / "my_ue.json")
    assert entry["title"].startswith("Class-wise random sign patches"), "the entry must carry the plugin metadata"
    assert entry["threat_model"] == {"norm": "linf", "budget": pytest.approx(8 / 255), "granularity": "class"}, \
        f"threat model wrong: {entry['threat_model']}"
    assert result.rank == 1 and result.ranked == 1, f"the only ranked defense must be rank 1, got {result.rank}"
    assert "rank 1 of 1" in result.report() and "my_ue" in result.report(), f"report: {result.report()}"
    assert "my_ue (seed 0): certificate passed: shortcut_accuracy" in result.report(), \
        f"the report must show the protected set's certificate: {result.report()}"
    assert [c["passed"] for c in entry["certificates"]] == [True], f"entry certificates: {entry['certificates']}"
    assert (entries / "tinysub" / "clean.json").is_file(), "the missing clean reference entry must be written"
    with Store(store_with_clean / "results.sqlite") as store:
        after = {r["key"]: r["finished_at"] for r in store.rows() if r["defense"] == "clean"}
    assert after == clean_before, "the clean references in the store must be reused, not rerun"
    assert result.published.site.is_file(), "the leaderboard must be rebuilt"


def test_a_defense_without_certificate_is_warned_about(caplog):
    cert = {"passed": True, "checks": [{"name": "shortcut_accuracy", "value": 1.0, "threshold": 0.9, "op": ">="}]}
    lines = certificate_lines("plain", "plain(eps=1)", {1: {"certificate": None}, 0: {"certificate": cert}})
    assert lines[0] == "plain(eps=1) (seed 0): certificate passed: shortcut_accuracy 1 >= 0.9 pass", lines
    assert lines[1].startswith("WARNING: plain(eps=1) (seed 1): defense 'plain' returned no certificate: the "
                               "leaderboard cannot show whether it reached its objective"), lines
    assert "returned no certificate" in caplog.text, "the missing certificate must be logged as a warning"


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_bad_plugin_is_refused_and_changes_nothing(tmp_path, preset_file, store_with_clean, case):
    source, message = BAD_PLUGINS[case]
    path = tmp_path / f"{case}.py"
    path.write_text(HEADER + source)
    entries = tmp_path / "entries"
    (entries / "tinysub").mkdir(parents=True)
    (entries / "tinysub" / "keep.json").write_text("{}")
    before, registered = snapshot(store_with_clean, entries), (DEFENSES.names(), ATTACKS.names())
    with pytest.raises(UEBenchError, match="refused") as err:
        submit(path, load_preset(str(preset_file)), out_dir=store_with_clean, entries_dir=entries,
               device=torch.device("cpu"), progress=False)
    assert message in str(err.value), f"the refusal must say why ({message!r}): {err.value}"
    assert snapshot(store_with_clean, entries) == before, "a refused plugin must leave store and entries unchanged"
    assert (DEFENSES.names(), ATTACKS.names()) == registered, "a refused plugin must not stay registered"


def test_cli_refuses_with_exit_code_2(tmp_path, preset_file, capsys):
    path = tmp_path / "nometa.py"
    path.write_text(HEADER + BAD_PLUGINS["no_metadata"][0])
    code = run_benchmark.main(["submit", str(path), "--preset", str(preset_file), "--out", str(tmp_path / "o"),
                               "--entries", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "title is empty" in err, f"expected a clear refusal, got {code}: {err}"
    assert not (tmp_path / "e").exists(), "no entry may be written for a refused plugin"
