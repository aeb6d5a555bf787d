"""Publishing: plugin names and metadata are checked before they become file names, page text or links;
the page escapes everything; no label, preset or group name writes outside the output folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmark.errors import UEBenchError
from benchmark.plan import plan
from benchmark.plugins import Defense, info_problems, paper_url
from benchmark.presets import preset_from_dict
from benchmark.registry import DEFENSES, Registry
from benchmark.store import CellRecord, Store
from leaderboard.entries import entry_path, load_entries, read_entry, write_entries
from leaderboard.plots import write_plots
from leaderboard.scores import SLUG_MAX, cells_from_store, group_dir, score, slug
from leaderboard.site import render
from leaderboard.tables import write_tables

EVIL_TITLE = "<script>alert(1)</script>"
EVIL_META = {"title": EVIL_TITLE, "venue": "\"'><b>venue</b>", "authors": "A & <i>B</i>", "year": 2024,
             "paper": "https://example.org/p?a=1&b=2", "norm": "linf", "budget": 8 / 255, "granularity": "class",
             "interpretation": False, "version": 1}


def record(defense: str, attack: str, acc: float, preset: str = "t", metadata: dict | None = None) -> CellRecord:
    name = defense.split("(")[0] if defense.split("(")[0].isidentifier() else "x"
    return CellRecord(key=f"{preset}|{defense}|{attack}", preset=preset, dataset="shapes", defense=defense,
                      attack=attack, backbone="b1", seed=0, status="ok", accuracy=acc, train_accuracy=50.0,
                      seconds=1.0, defense_seconds=0.0, peak_memory_mb=1.0, error=None,
                      config={"defense": {"name": name, "version": 1}, "attack": {"name": attack},
                              "dataset": {"name": "shapes", "train_size": 40}, "seed": 0},
                      metrics={"perturbation": {}, "metadata": {"defense": metadata or {}}, "num_classes": 10},
                      environment={}, started_at=0.0, finished_at=1.0)


def board(tmp_path: Path, defense: str = "evil", preset: str = "t", metadata: dict | None = None):
    with Store(tmp_path / "results.sqlite") as store:
        store.put(record("clean", "scratch", 90.0, preset))
        store.put(record(defense, "scratch", 20.0, preset, metadata))
        cells = cells_from_store(store)
    meta = {(g, d): m["defense"] for g, d, m in zip(cells["group"], cells["defense"], cells["metadata"])}
    return score(cells, metadata=meta)


def files_under(root: Path) -> set[Path]:
    return {p.resolve() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- names and metadata

@pytest.mark.parametrize("name", ["../../x", "MyUE", "a" * 49, "ñu", "a-b", "a.b", "", "x y"])
def test_plugin_names_are_safe_identifiers(name):
    reg = Registry("thing", "uebench.test-group")
    with pytest.raises(UEBenchError, match="lower-case ASCII letters, digits and '_', at most 48"):
        reg.register(name)(type("X", (), {}))
    reg.register("my_ue_2")(type("Y", (), {}))


@pytest.mark.parametrize("field, value, message", [
    ("title", "two\nlines", "printable characters"),
    ("title", "t" * 201, "at most 200"),
    ("authors", "a" * 501, "at most 500"),
    ("venue", "ICLR\x1b[31m", "printable"),
    ("paper", "http://example.org/paper", "an https:// URL"),
    ("paper", "javascript:alert(1)", "an https:// URL"),
    ("paper", 'https://example.org/"onmouseover="x', "an https:// URL"),
    ("paper", "https://" + "a" * 300 + ".org", "at most 300"),
    ("year", "2024", "year='2024' must be an integer"),
    ("year", True, "year=True"),
    ("year", 3000, "year=3000"),
    ("version", -1, "version=-1"),
    ("interpretation", "yes", "True or False"),
    ("name", "../x", "name='../x'"),
])
def test_bad_metadata_is_named(field, value, message):
    good = {"name": "ok", "title": "A title", "paper": "2101.04898", "venue": "ICLR", "year": 2021, "authors": "A, B",
            "interpretation": False, "version": 1}
    assert info_problems(good) == [], info_problems(good)
    problems = info_problems({**good, field: value})
    assert any(message in p for p in problems), f"{field}={value!r}: {problems}"


def test_links_are_https_or_arxiv_only():
    assert paper_url("2101.04898") == "https://arxiv.org/abs/2101.04898"
    assert paper_url("2101.04898v2") == "https://arxiv.org/abs/2101.04898v2"
    assert paper_url("https://openreview.net/forum?id=abc") == "https://openreview.net/forum?id=abc"
    for bad in ("http://example.org", "javascript:alert(1)", "data:text/html,x", "https://a.org/<x>", "ftp://a.org",
                "21.04898", "2101.04898 x", "https://", "//example.org"):
        assert paper_url(bad) == "", f"{bad!r} must not become a link"


def test_a_plugin_with_bad_metadata_is_refused_at_plan_time():
    @dataclass(frozen=True)
    class Shouty(Defense):
        title = "line one\nline two"
        paper = "http://example.org"

        def _perturb(self, train, ctx):
            return train

    DEFENSES.register("shouty")(Shouty)
    try:
        with pytest.raises(UEBenchError, match="plugin 'shouty' .*bad metadata: title=.*paper="):
            plan(preset_from_dict({"extends": "quick", "defenses": ["shouty"], "attacks": ["scratch"],
                                   "backbones": ["resnet_tiny"]}))
    finally:
        DEFENSES.unregister("shouty")


# ---------------------------------------------------------------- the page escapes it all

def test_the_page_escapes_titles_quotes_and_labels(tmp_path):
    label = 'evil"<b>(x=../../y)'
    html = render(board(tmp_path, label, metadata=EVIL_META))
    for raw in (EVIL_TITLE, "<b>venue", "<i>B</i>", '"<b>', "'><b>"):
        assert raw not in html, f"{raw!r} reached the page unescaped"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, "the title must be shown, escaped"
    assert "&quot;&#x27;&gt;&lt;b&gt;venue" in html, "the venue's quotes must be escaped"
    assert 'href="https://example.org/p?a=1&amp;b=2"' in html, "an https link is kept, with & escaped"
    assert html.count("<script>") == 1, "only the page's own sorting script may be a script"


def test_links_that_are_not_https_are_not_made(tmp_path):
    html = render(board(tmp_path, metadata={**EVIL_META, "paper": "http://example.org/p"}))
    assert "http://example.org/p" not in html, "an http:// paper must not become a link"


# ---------------------------------------------------------------- nothing is written outside its folder

def test_slugs_are_safe_and_bounded():
    assert slug("../../x") == "x" and slug("..") == "_" and slug("a/b\\c") == "a_b_c", "separators must go"
    long_a, long_b = slug("d" * 300 + "a"), slug("d" * 300 + "b")
    assert len(long_a) <= SLUG_MAX and long_a != long_b, "long labels must stay apart and fit a file name"
    assert slug(long_a) == long_a, "a slug is its own slug"


@pytest.mark.parametrize("group", ["../x", "a/b", "..", "", "/etc", "x\\y"])
def test_group_names_that_leave_the_folder_are_refused(group, tmp_path):
    with pytest.raises(UEBenchError, match="is not a safe folder name"):
        group_dir(tmp_path, group)
    with pytest.raises(UEBenchError, match="is not a safe folder name"):
        entry_path(tmp_path, group, "em")
    assert group_dir(tmp_path, "quick-cifar10") == tmp_path / "quick-cifar10"


def test_hostile_labels_and_presets_write_inside_the_output(tmp_path):
    root = tmp_path / "inside"
    root.mkdir()
    b = board(root, defense="../../../escaped", preset="../../evil")
    assert b.groups() == ["evil"], f"the group must be the preset's slug, got {b.groups()}"
    written = write_entries(b, root / "entries") + write_tables(b, root / "out")
    written += [p for ps in write_plots(b, root / "out").values() for p in ps]
    assert written and all(root.resolve() in p.resolve().parents for p in written), written
    assert files_under(tmp_path) == files_under(root), "a file was written outside the output folder"


def test_a_board_with_a_hostile_group_writes_nothing(tmp_path):
    b = board(tmp_path / "s")
    for frame in (b.cells, b.scores, b.aggregated, b.grid):
        frame["group"] = "../../x"
    before = files_under(tmp_path)
    for write in (write_tables, write_plots, write_entries):
        with pytest.raises(UEBenchError, match="not a safe folder name"):
            write(b, tmp_path / "out")
    assert files_under(tmp_path) == before, "nothing may be written for a hostile group"


def test_a_hostile_entry_file_is_refused(tmp_path):
    good = board(tmp_path / "s")
    write_entries(good, tmp_path / "entries")
    path = tmp_path / "entries" / "t" / "clean.json"
    entry = json.loads(path.read_text())
    for change, message in (({"group": "../../x"}, "must be the name of the entry's folder"),
                            ({"title": EVIL_TITLE + "\n"}, "title="), ({"paper": "http://x.org"}, "https:// URL"),
                            ({"defense": ""}, "defense=''"), ({"results": "x"}, "results must be a list")):
        path.write_text(json.dumps({**entry, **change}))
        with pytest.raises(UEBenchError, match=message):
            read_entry(path)
        with pytest.raises(UEBenchError, match=message):
            load_entries(tmp_path / "entries")
    path.write_text(json.dumps({**entry, "results": [{"attack": "scratch"}]}))
    with pytest.raises(UEBenchError, match="malformed"):
        load_entries(tmp_path / "entries")
