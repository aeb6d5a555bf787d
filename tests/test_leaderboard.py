"""The leaderboard: scores, entries, tables, plots, the site and the ``leaderboard`` command.

Stores are built by writing ``CellRecord``s directly (numbers chosen by the test), plus one tiny real
run through the command line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from benchmark.config import configure
from benchmark.data import DatasetConfig
from benchmark.plan import plan
from benchmark.plugins import Check, certificate
from benchmark.presets import load_preset
from benchmark.registry import DEFENSES
from benchmark.store import CellRecord, Store
from leaderboard.build import board_from_store
from leaderboard.entries import (ENTRIES_DIR, grid_dataset_config, load_entries, make_entries, read_entry, store_metadata,
                                  write_entries)
from leaderboard.plots import write_plots
from leaderboard.scores import cells_from_store, protection, score
from leaderboard.site import render
from leaderboard.tables import (group_markdown, latex, markdown, ranking_frame, scores_csv, uninformative_columns,
                               write_tables)

ATTACK_CONFIGS = {"scratch": {"name": "scratch"}, "linear_probe": {"name": "linear_probe"},
                  "frozen_shallow": {"name": "frozen_shallow", "k": 1},
                  "frozen_shallow(k=2)": {"name": "frozen_shallow", "k": 2}}


def record(defense: str, attack: str, backbone: str, seed: int, acc: float | None, *, status: str = "ok",
           preset: str = "t", dataset: str = "shapes", name: str | None = None, t: float = 0.0,
           cert: dict | None = None, metadata: dict | None = None, env: dict | None = None) -> CellRecord:
    """A cell as the executor would record it; ``name`` is the registered defense behind the label, ``cert``
    the certificate of its protected set (``Certificate.to_dict()``), ``metadata`` the defense's metadata
    (default: the registered defense's), ``env`` where it ran."""
    name = name or defense.split("(")[0]
    if metadata is None and name in DEFENSES:
        metadata = DEFENSES.get(name)().metadata()
    config = {"defense": {"name": name, "version": 1}, "attack": ATTACK_CONFIGS.get(attack, {"name": attack}),
              "dataset": {"name": dataset, "train_size": 40}, "seed": seed}
    key = f"{preset}|{dataset}|{defense}|{attack}|{backbone}|{seed}|{t}"
    return CellRecord(key=key, preset=preset, dataset=dataset, defense=defense, attack=attack, backbone=backbone,
                      seed=seed, status=status, accuracy=acc if status == "ok" else None, train_accuracy=50.0,
                      seconds=1.0, defense_seconds=0.0, peak_memory_mb=1.0, error=None if status == "ok" else "boom",
                      config=config, metrics={"perturbation": {"linf": 8.0, "certificate": cert},
                                              "metadata": {"defense": metadata} if metadata else {},
                                              "num_classes": 10},
                      environment={"torch": "x"} if env is None else env,
                      started_at=t, finished_at=t + 1)


# clean 90/80, random_noise worst 70 (scratch/b1), random_noise(mode=class) worst 60 but mean higher
GRID = {
    ("clean", "scratch", "b1"): 90.0, ("clean", "linear_probe", "b1"): 80.0,
    ("random_noise", "scratch", "b1"): 70.0, ("random_noise", "linear_probe", "b1"): 50.0,
    ("random_noise(mode=class)", "scratch", "b1"): 20.0, ("random_noise(mode=class)", "linear_probe", "b1"): 60.0,
}


def make_store(path: Path, rows: dict | None = None, extra: list[CellRecord] | None = None) -> Path:
    with Store(path / "results.sqlite") as store:
        for (d, a, b), acc in (GRID if rows is None else rows).items():
            store.put(record(d, a, b, 0, acc))
        for rec in extra or []:
            store.put(rec)
    return path


def board_of(path: Path):
    with Store(path / "results.sqlite") as store:
        cells = cells_from_store(store)
    return score(cells, metadata=store_metadata(cells, None))


def row(board, defense: str) -> pd.Series:
    s = board.scores
    return s[s["defense"] == defense].iloc[0]


def test_protection_formula():
    assert protection(10.0, 90.0, 10.0) == pytest.approx(1.0), "accuracy at chance must give protection 1"
    assert protection(90.0, 90.0, 10.0) == pytest.approx(0.0), "accuracy at the clean level must give 0"
    assert protection(50.0, 90.0, 10.0) == pytest.approx(0.5), "half way must give 0.5"
    assert math.isnan(protection(5.0, 10.0, 10.0)), "a clean reference at chance leaves protection undefined"
    assert math.isnan(protection(10.0, 19.5, 10.0)), \
        "a clean reference below twice chance (an uninformative column) must leave protection undefined"
    assert protection(10.0, 20.0, 10.0) == pytest.approx(1.0), "at twice chance the column is informative"


def test_worst_case_mean_and_rank(tmp_path):
    board = board_of(make_store(tmp_path))
    rn, rc = row(board, "random_noise"), row(board, "random_noise(mode=class)")
    assert rn["worst_accuracy"] == pytest.approx(70.0), f"worst case must be the highest accuracy, got {rn['worst_accuracy']}"
    assert (rn["worst_attack"], rn["worst_backbone"]) == ("scratch", "b1"), "worst case must name its attack/backbone"
    assert rn["mean_accuracy"] == pytest.approx(60.0), f"mean must be over the grid, got {rn['mean_accuracy']}"
    assert rc["worst_accuracy"] == pytest.approx(60.0), f"class-wise worst case wrong: {rc['worst_accuracy']}"
    assert (rc["rank"], rn["rank"]) == (1, 2), "the lower worst case must rank first, whatever the mean"
    assert rn["min_protection"] == pytest.approx((90 - 70) / 80), "min protection uses the same cell's clean ref"
    clean = row(board, "clean")
    assert clean["reference"] and math.isnan(clean["rank"]), "clean must be shown as a reference, not ranked"
    assert list(board.ranked()["defense"]) == ["random_noise(mode=class)", "random_noise", "clean"], \
        "display order must be ranked defenses, then the reference"


def test_a_column_whose_clean_reference_is_below_twice_chance_is_named_uninformative(tmp_path):
    rows = dict(GRID)
    rows[("clean", "linear_probe", "b1")] = 19.5  # 10 classes: chance 10 %, twice chance 20 %
    rows[("clean", "scratch", "b1")] = 20.0
    board = board_of(make_store(tmp_path, rows))
    assert uninformative_columns(board, "b1", ["scratch", "linear_probe"]) == {"linear_probe": 19.5}
    text = group_markdown(board)
    assert "Uninformative here: linear_probe (19.5 %)" in text and "scratch (" not in text, text
    assert "Uninformative here: linear_probe (19.5 %)" in render(board)
    assert "Uninformative" not in group_markdown(board_of(make_store(tmp_path / "fine"))), \
        "a grid whose clean references are all far above chance has no such note"


def test_mean_breaks_ties(tmp_path):
    rows = dict(GRID)
    rows[("random_noise(mode=class)", "linear_probe", "b1")] = 70.0
    rows[("random_noise(mode=class)", "scratch", "b1")] = 60.0
    board = board_of(make_store(tmp_path, rows))
    assert row(board, "random_noise(mode=class)")["rank"] == 2, "equal worst cases must be ordered by the mean"
    assert row(board, "random_noise")["rank"] == 1, "the lower mean must win a tie"


def test_seeds_are_averaged_before_the_worst_case(tmp_path):
    extra = [record("random_noise", "scratch", "b1", 1, 30.0), record("random_noise", "linear_probe", "b1", 1, 40.0),
             record("clean", "scratch", "b1", 1, 90.0), record("clean", "linear_probe", "b1", 1, 80.0),
             record("random_noise(mode=class)", "scratch", "b1", 1, 20.0),
             record("random_noise(mode=class)", "linear_probe", "b1", 1, 60.0)]
    board = board_of(make_store(tmp_path, extra=extra))
    rn = row(board, "random_noise")
    assert rn["worst_accuracy"] == pytest.approx(50.0), "seeds 70 and 30 must average to 50 before the max"
    assert rn["worst_std"] == pytest.approx(pd.Series([70.0, 30.0]).std()), "std must be over seeds"
    assert rn["cells_expected"] == 4, f"2 attacks x 2 seeds expected, got {rn['cells_expected']}"


def test_a_preset_grid_leaves_out_extra_cells_of_the_store(tmp_path):
    """Extra seeds or control attacks run into the same store do not enter the preset's board."""
    extra = [record("random_noise", "scratch", "b1", 1, 10.0), record("clean", "scratch", "b1", 1, 90.0),
             record("random_noise", "frozen_shallow(weights=random)", "b1", 0, 11.0)]
    make_store(tmp_path, extra=extra)
    grid = pd.DataFrame([{"group": "t", "attack": a, "backbone": "b1", "seed": 0}
                         for a in ("scratch", "linear_probe")])
    board = board_from_store(tmp_path, preset="t", grid=grid, presets={}, metadata_fallback=None)
    assert set(board.cells["seed"]) == {0}, "cells of seeds outside the grid entered the board"
    assert set(board.cells["attack"]) == {"scratch", "linear_probe"}, "an attack outside the grid entered the board"
    assert row(board, "random_noise")["worst_accuracy"] == pytest.approx(70.0), "extra cells changed the score"


def test_a_preset_plan_leaves_out_the_stores_other_defenses(tmp_path):
    """A variant or another threat model's row run into the same store is not the preset's (its plan names
    the defenses); without the plan's defenses the store's rows all count."""
    extra = [record("random_noise[transfer]", a, "b1", 0, 5.0) for a in ("scratch", "linear_probe")]
    make_store(tmp_path, extra=extra)
    grid = pd.DataFrame([{"group": "t", "attack": a, "backbone": "b1", "seed": 0}
                         for a in ("scratch", "linear_probe")])
    planned = {"clean", "random_noise", "random_noise(mode=class)"}
    board = board_from_store(tmp_path, preset="t", grid=grid, presets={}, metadata_fallback=None, defenses=planned)
    assert set(board.cells["defense"]) == planned, f"a defense outside the plan entered: {set(board.cells['defense'])}"
    everything = board_from_store(tmp_path, preset="t", grid=grid, presets={}, metadata_fallback=None)
    assert "random_noise[transfer]" in set(everything.cells["defense"]), "without a plan the store's rows all count"


def test_unfinished_grids_are_flagged_not_ranked(tmp_path):
    rows = dict(GRID)
    del rows[("random_noise", "linear_probe", "b1")]
    failed = record("random_noise(mode=class)", "scratch", "b2", 0, None, status="failed")
    board = board_of(make_store(tmp_path, rows, extra=[failed]))
    rn, rc = row(board, "random_noise"), row(board, "random_noise(mode=class)")
    # its own missing linear_probe/b1 cell, plus scratch/b2 that another defense (failed) put in the grid
    assert math.isnan(rn["rank"]) and "2 missing" in rn["flag"], f"missing cells must be flagged: {rn['flag']!r}"
    assert math.isnan(rc["rank"]) and "1 failed" in rc["flag"], f"a failed cell must be flagged: {rc['flag']!r}"
    md = markdown(ranking_frame(board))
    assert "incomplete" in md, "the table must show the flag"
    assert "incomplete" in row(board, "clean")["flag"], "the reference misses the b2 cell too and must say so"


def test_latest_row_wins_and_clean_reference_stays_in_its_preset(tmp_path):
    extra = [record("random_noise", "scratch", "b1", 0, 10.0, t=5.0),  # a later rerun of the same label
             record("clean", "scratch", "b1", 0, 30.0, preset="other")]  # same data set, another preset
    board = board_of(make_store(tmp_path, extra=extra))
    t = board.cells[(board.cells["preset"] == "t") & (board.cells["defense"] == "random_noise")
                    & (board.cells["attack"] == "scratch")]
    assert list(t["accuracy"]) == [10.0], f"the latest row of a label must count, got {list(t['accuracy'])}"
    assert list(t["clean_accuracy"]) == [90.0], "the clean reference must come from the same preset"


def test_entries_round_trip_reproduces_the_tables(tmp_path):
    board = board_of(make_store(tmp_path, extra=[record("random_noise", "scratch", "b1", 1, 65.0)]))
    paths = write_entries(board, tmp_path / "entries")
    assert sorted(p.name for p in paths) == ["clean.json", "random_noise.json", "random_noise_mode=class.json"], \
        f"one entry per defense expected, got {[p.name for p in paths]}"
    entry = json.loads((tmp_path / "entries" / "t" / "random_noise.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"entries must not contain {c}"))
    assert isinstance(entry["year"], int) and entry["year"] == 2021, f"year must be a number: {entry['year']!r}"
    assert isinstance(entry["threat_model"]["budget"], float), "the budget must be a number"
    assert all(isinstance(r["accuracy"], float) for r in entry["results"]), "accuracies must be numbers"
    assert entry["paper_url"] == "https://arxiv.org/abs/2101.04898", f"paper link wrong: {entry['paper_url']}"
    again = load_entries(tmp_path / "entries")
    assert group_markdown(again) == group_markdown(board), "tables from entries must equal tables from the store"
    assert latex(ranking_frame(again)) == latex(ranking_frame(board)), "LaTeX from entries must match the store's"
    pd.testing.assert_frame_equal(again.ranked().drop(columns=["version"]), board.ranked().drop(columns=["version"]),
                                  check_dtype=False, obj="scores from entries")


def test_an_entry_names_the_machine_of_each_result(tmp_path):
    xeon = {"cpu": "Intel(R) Xeon(R)", "cpu_capability": "AMX", "git_commit": "a"}
    epyc = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "git_commit": "b"}
    envs = {("random_noise", "scratch"): epyc, ("random_noise", "linear_probe"): xeon,
            ("random_noise", "frozen_shallow"): epyc}
    extra = [record(d, a, "b1", 0, 50.0, env=env) for (d, a), env in envs.items()]
    board = board_of(make_store(tmp_path, rows={("clean", a, "b1"): 90.0 for _, a in envs}, extra=extra))
    entry = make_entries(board)[("t", "random_noise")]
    assert entry["environments"] == [epyc, xeon], f"the distinct environments, in result order: {entry['environments']}"
    shown = {r["attack"]: entry["environments"][r["environment"]] for r in entry["results"]}
    assert shown == {a: env for (_, a), env in envs.items()}, f"each result must name its own machine: {shown}"
    assert entry["environment"] == epyc, "the entry's environment must be the one most of its cells ran in"
    write_entries(board, tmp_path / "entries")
    again = load_entries(tmp_path / "entries").cells
    again = again[again["defense"] == "random_noise"]
    got = dict(zip(again["attack"], again["environment"]))
    assert got == shown, f"loading the entry back must give each cell its own environment: {got}"


PASSED = certificate(Check("shortcut_accuracy", 0.97, 0.9, ">=")).to_dict()
FAILED = certificate(Check("surrogate_error", 0.3, 0.01, "<="), rounds=3).to_dict()


def certified_store(path: Path, failed_seed: int = 1) -> Path:
    """Two seeds: random_noise passes both; random_noise(mode=class) fails on ``failed_seed``; clean has none."""
    extra = []
    for seed in (0, 1):
        for (d, a, b), acc in GRID.items():
            cert = None if d == "clean" else FAILED if (d != "random_noise" and seed == failed_seed) else PASSED
            extra.append(record(d, a, b, seed, acc, cert=cert))
    return make_store(path, rows={}, extra=extra)


def test_certificates_reach_scores_entries_and_tables(tmp_path):
    board = board_of(certified_store(tmp_path))
    assert row(board, "random_noise")["certified"] is True, "every seed passed: certified must be True"
    assert row(board, "random_noise(mode=class)")["certified"] is False, "one seed failed: certified must be False"
    assert row(board, "clean")["certified"] is None, "no certificate: certified must be None"
    assert "seed 1: surrogate_error=0.3<=0.01" in row(board, "random_noise(mode=class)")["certificate_checks"], \
        f"the checks of every seed must be listed: {row(board, 'random_noise(mode=class)')['certificate_checks']}"
    assert math.isnan(row(board, "random_noise(mode=class)")["rank"]), "a failed certificate must not be ranked"
    assert row(board, "random_noise")["rank"] == 1, "a passed certificate is ranked"
    table = ranking_frame(board).set_index("defense")
    assert table["certificate"].to_dict() == {"random_noise(mode=class)": "FAILED", "random_noise": "pass",
                                              "clean": "-"}, f"certificate column: {table['certificate'].to_dict()}"
    assert "certificate failed" in table.loc["random_noise(mode=class)", "note"], "the note must say it failed"
    assert "certificate failed" not in table.loc["random_noise", "note"], "a passed certificate needs no note"
    assert "FAILED" in latex(ranking_frame(board)), "the LaTeX table must show the failure"
    assert scores_csv(board).set_index("defense").loc["random_noise(mode=class)", "certificate"] == "FAILED", \
        "the CSV must show the failure"
    entries = make_entries(board)
    failed = entries[("t", "random_noise(mode=class)")]["certificates"]
    assert [(c["seed"], c["passed"]) for c in failed] == [(0, True), (1, False)], f"per-seed certificates: {failed}"
    assert failed[1]["info"] == {"rounds": 3.0} and failed[1]["checks"][0]["name"] == "surrogate_error", failed[1]
    assert entries[("t", "clean")]["certificates"] == [], "a defense without a certificate has an empty list"
    html = render(board)
    assert ">FAILED</span>" in html and "surrogate_error=0.3&lt;=0.01" in html, \
        "the page must show FAILED with the escaped checks as the tooltip"


def test_certificates_survive_the_entries_and_old_entries_load(tmp_path):
    board = board_of(certified_store(tmp_path))
    write_entries(board, tmp_path / "entries")
    again = load_entries(tmp_path / "entries")
    assert group_markdown(again) == group_markdown(board), "tables from entries must show the same certificates"
    for path in (tmp_path / "entries" / "t").glob("*.json"):  # as the schema was before certificates
        entry = json.loads(path.read_text())
        entry.pop("certificates")
        entry["score"].pop("certified")
        for p in entry["perturbation"]:
            p.pop("certificate", None)
        path.write_text(json.dumps(entry))
    old = load_entries(tmp_path / "entries")
    assert old.scores["certified"].isna().all(), f"old entries carry no certificate: {old.scores['certified'].tolist()}"
    assert set(ranking_frame(old)["certificate"]) == {"-"}, "old entries must show '-' in the certificate column"
    only_top = json.loads((tmp_path / "entries" / "t" / "random_noise.json").read_text())
    only_top["certificates"] = [{"seed": 0, **FAILED}]  # the explicit list alone restores the flag
    (tmp_path / "entries" / "t" / "random_noise.json").write_text(json.dumps(only_top))
    assert row(load_entries(tmp_path / "entries"), "random_noise")["certified"] is False, \
        "load_entries must read the top-level certificates"


def test_committed_entries_load():
    board = load_entries(ENTRIES_DIR)
    assert len(board.scores) > 0, f"no committed entries under {ENTRIES_DIR}"
    assert board.scores["certified"].map(lambda c: c in (None, True, False)).all(), \
        f"certified must be True, False or None: {board.scores['certified'].tolist()}"
    assert set(ranking_frame(board)["certificate"]) <= {"pass", "FAILED", "-"}, "bad certificate column values"


def test_the_readme_leaderboards_rest_on_three_seeds():
    readme = (ENTRIES_DIR.parents[1] / "README.md").read_text()
    groups = re.findall(r"^<!-- leaderboard:(\S+) -->$", readme, flags=re.M)
    assert groups, "the README shows no leaderboard block"
    scores = load_entries(ENTRIES_DIR).scores
    for group in groups:
        seeds = scores.loc[scores["group"] == group, ["defense", "seeds"]]
        assert len(seeds) > 0, f"the README shows group {group!r}, which has no committed entries"
        few = seeds[seeds["seeds"] < 3]
        assert few.empty, f"{group}: the README leaderboard must rest on >= 3 seeds; fewer for {few.to_dict('records')}"


def test_seeds_counts_the_seeds_measured_not_those_planned(tmp_path):
    """A defense missing a seed of the grid shows the seeds it has: an incomplete row must not claim the grid's."""
    extra = [record("random_noise", "scratch", "b1", 1, 30.0), record("random_noise", "linear_probe", "b1", 1, 40.0),
             record("clean", "scratch", "b1", 1, 90.0), record("clean", "linear_probe", "b1", 1, 80.0)]
    board = board_of(make_store(tmp_path, extra=extra))
    assert row(board, "random_noise")["seeds"] == 2, "both seeds were measured"
    partial = row(board, "random_noise(mode=class)")
    assert partial["cells_expected"] == 4 and not partial["complete"], "seed 1 is planned for every defense"
    assert partial["seeds"] == 1, f"only seed 0 was measured, the row says {partial['seeds']}"


def test_incomplete_grid_survives_the_entries(tmp_path):
    rows = dict(GRID)
    del rows[("random_noise", "linear_probe", "b1")]
    board = board_of(make_store(tmp_path, rows))
    write_entries(board, tmp_path / "entries")
    again = load_entries(tmp_path / "entries")
    assert "1 missing" in row(again, "random_noise")["flag"], "a missing cell must stay flagged after the entries"


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_registered_defense_makes_a_typed_entry(tmp_path, name):
    configured = configure(DEFENSES, name)
    cfg = configured.config()
    rec = record(name, "scratch", "b1", 0, 42.0, metadata=configured.plugin.metadata())
    rec = CellRecord(**{**rec.__dict__, "config": {**rec.config, "defense": cfg}})
    with Store(tmp_path / "results.sqlite") as store:
        store.put(rec)
        cells = cells_from_store(store)
    board = score(cells, metadata=store_metadata(cells, None))
    (entry,) = make_entries(board).values()
    json.dumps(entry, allow_nan=False)
    assert entry["title"], f"defense {name!r} has no title for the leaderboard"
    assert entry["threat_model"]["norm"] in ("linf", "l2", "l0", "none"), f"{name}: bad norm"
    assert isinstance(entry["year"], int), f"{name}: year must be an int, got {entry['year']!r}"


GHOST = {"name": "ghost_ue", "title": "Ghost perturbations", "paper": "2101.04898", "venue": "ICLR", "year": 2021,
         "authors": "A. Nobody", "interpretation": False, "version": 3, "norm": "linf", "budget": 4 / 255,
         "granularity": "sample"}


def test_the_board_needs_no_registered_plugin(tmp_path):
    """Metadata and class counts come from the records: a defense that is not loaded still shows them."""
    assert "ghost_ue" not in DEFENSES, "the test needs a defense name that is not registered"
    extra = []
    for (d, a, b), acc in GRID.items():
        label = d.replace("random_noise", "ghost_ue")
        rec = record(label, a, b, 0, acc, dataset="unseen-data", metadata=None if label == "clean" else GHOST)
        extra.append(CellRecord(**{**rec.__dict__, "metrics": {**rec.metrics, "num_classes": 7}}))
    make_store(tmp_path, rows={}, extra=extra)
    board = board_from_store(tmp_path, presets={}, metadata_fallback=None)
    ghost = row(board, "ghost_ue")
    assert (ghost["title"], ghost["paper"], ghost["year"]) == ("Ghost perturbations", "2101.04898", 2021), \
        f"the recorded metadata must reach the scores: {ghost[['title', 'paper', 'year']].to_dict()}"
    assert ghost["budget"] == pytest.approx(4 / 255) and ghost["norm"] == "linf", "the recorded budget must show"
    assert ghost["chance"] == pytest.approx(100 / 7), f"the recorded class count must give chance, got {ghost['chance']}"
    assert "4/255" in markdown(ranking_frame(board)), "the table must show the recorded budget"


def test_records_without_metadata_take_it_from_the_entries(tmp_path):
    """Records written before cells carried metadata: the committed entry of the same label fills in."""
    board = board_of(make_store(tmp_path / "old"))
    write_entries(board, tmp_path / "entries")
    rows = [record(d, a, b, 0, acc, metadata={}) for (d, a, b), acc in GRID.items()]
    store_dir = make_store(tmp_path / "new", rows={}, extra=rows)
    old = board_from_store(store_dir, presets={}, metadata_fallback=tmp_path / "entries")
    assert row(old, "random_noise")["title"] == row(board, "random_noise")["title"] != "", \
        "metadata must come from the entries when the records have none"
    bare = board_from_store(store_dir, presets={}, metadata_fallback=None)
    assert row(bare, "random_noise")["title"] == "", "without records or entries there is no metadata to show"


def test_markdown_and_latex_escape(tmp_path):
    df = pd.DataFrame({"defense": ["a|b", "x_y&z%"]})
    assert "a\\|b" in markdown(df), "a | inside a markdown cell must be escaped"
    tex = latex(df)
    assert "x\\_y\\&z\\%" in tex and "\\toprule" in tex, f"LaTeX must escape _ & %: {tex}"


def test_tables_plots_and_site_are_written(tmp_path):
    extra = [record(d, "frozen_shallow(k=2)", "b1", 0, acc) for d, acc in
             (("clean", 85.0), ("random_noise", 65.0), ("random_noise(mode=class)", 40.0))]
    extra += [record(d, "frozen_shallow", "b1", 0, acc) for d, acc in
              (("clean", 88.0), ("random_noise", 75.0), ("random_noise(mode=class)", 45.0))]
    board = board_of(make_store(tmp_path, extra=extra))
    tables = write_tables(board, tmp_path / "out")
    assert {p.name for p in tables} == {"leaderboard.md", "leaderboard.tex", "leaderboard.csv", "cells.csv"}, \
        f"tables missing: {tables}"
    csv = pd.read_csv(tmp_path / "out" / "t" / "leaderboard.csv")
    assert csv["worst_accuracy"].dtype.kind == "f", "the CSV must hold numbers"
    plots = write_plots(board, tmp_path / "out")["t"]
    names = {p.name for p in plots}
    assert {"heatmap.png", "worst_case.png", "freeze_depth.png", "heatmap.pdf"} <= names, f"plots missing: {names}"
    for p in plots:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{p.name} is not a PNG"
    html = render(board, {"t": plots})
    assert "<link" not in html and 'src="http' not in html, "the page must not load external assets"
    assert html.count('src="data:image/png;base64,') == 3, "the three PNGs must be inlined"


def test_site_escapes_plugin_text(tmp_path):
    evil = "evil<script>alert(1)</script>"
    board = board_of(make_store(tmp_path, extra=[record(evil, "scratch", "b1", 0, 5.0, name="evil")]))
    meta = {("t", evil): {"title": '<img src=x onerror="alert(2)">', "paper": "javascript:alert(3)"}}
    board = score(board.cells, metadata=meta)
    html = render(board)
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html, "a label must be escaped"
    assert "<img src=x" not in html, "a title must be escaped"
    assert "javascript:" not in html, "only http(s) and arXiv papers may become links"


def test_cli_run_ends_with_the_leaderboard_and_entries_rebuild_it(tmp_path, capsys):
    import run_benchmark

    preset = tmp_path / "tiny.toml"
    preset.write_text('extends = "quick"\nname = "tinylb"\nbackbones = ["resnet_tiny"]\n'
                      'defenses = ["clean", "random_noise", "random_noise:mode=class"]\nattacks = ["scratch"]\n'
                      '[dataset]\ntrain_size = 40\ntest_size = 20\nsource_size = 40\n'
                      '[attack_protocol.scratch]\nepochs = 1\n')
    out = tmp_path / "res"
    code = run_benchmark.main(["run", "--preset", str(preset), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, f"the tiny run failed: {printed[-2000:]}"
    assert "## tinylb: shapes" in printed and "worst-case acc." in printed, "run must end with the leaderboard"
    lb = out / "leaderboard"
    assert (lb / "index.html").is_file() and (lb / "tinylb" / "heatmap.png").is_file(), "site and plots missing"
    entries = sorted(p.name for p in (lb / "entries" / "tinylb").glob("*.json"))
    assert entries == ["clean.json", "random_noise.json", "random_noise_mode=class.json"], f"entries: {entries}"
    assert read_entry(lb / "entries" / "tinylb" / "clean.json")["protocol"]["protocol_note"], \
        "the preset's protocol note must travel with the entries"
    md_store = (lb / "tinylb" / "leaderboard.md").read_text()
    code = run_benchmark.main(["leaderboard", "--entries", str(lb / "entries"), "--out", str(tmp_path / "from_entries")])
    assert code == 0, "leaderboard from entries failed"
    md_entries = (tmp_path / "from_entries" / "tinylb" / "leaderboard.md").read_text()
    assert md_entries == md_store, "the leaderboard from entries must equal the one from the store"


def test_cli_leaderboard_writes_the_readme_section(tmp_path, capsys):
    import run_benchmark

    board = board_of(make_store(tmp_path))
    write_entries(board, tmp_path / "entries")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- leaderboard:t -->\nold table\n<!-- /leaderboard:t -->\n\nafter\n")
    args = ["leaderboard", "--entries", str(tmp_path / "entries"), "--out", str(tmp_path / "lb"), "--preset", "t"]
    assert run_benchmark.main([*args, "--readme", str(readme)]) == 0, capsys.readouterr().err
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title") and text.endswith("\nafter\n"), text
    assert "worst-case acc. (%)" in text and "random_noise(mode=class)" in text, "the ranking is missing"
    assert "](docs/leaderboard/t-heatmap.png)" in text and (tmp_path / "docs/leaderboard/t-heatmap.png").is_file()
    # a second run rewrites the section from the entries (a stale section is replaced) and keeps the rest
    readme.write_text(text.replace("worst-case acc. (%)", "stale ranking").replace("\nafter\n", "\nafter, edited\n"))
    assert run_benchmark.main([*args, "--readme", str(readme)]) == 0, capsys.readouterr().err
    assert readme.read_text() == text.replace("\nafter\n", "\nafter, edited\n"), \
        "a second run must give the same section and keep the text around it"
    readme.write_text("no markers\n")
    assert run_benchmark.main([*args, "--readme", str(readme)]) == 2, "a file without markers must be refused"
    assert "<!-- leaderboard:t -->" in capsys.readouterr().err


def test_cli_leaderboard_without_entries_fails_clearly(tmp_path, capsys):
    import run_benchmark

    code = run_benchmark.main(["leaderboard", "--entries", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no leaderboard entries" in err, f"expected a one-line error, got {code}: {err}"


FIGURE_PRESET = """
extends = "quick"
name = "tinyfig"
backbones = ["resnet_tiny"]
[dataset]
train_size = 40
test_size = 20
source_size = 40
[attack_protocol."*"]
epochs = 1
[attack_protocol.scratch]
epochs = 1
[zoo.supervised]
epochs = 1
[zoo.sf]
epochs = 1
"""


# kept small: the trained figures share the clean cells; only paradigm-gap also trains a UE
FIGURE_DEFENSES = {"paradigm-gap": ["random_noise:mode=class"], "freeze-depth": ["clean"],
                   "finetune-table": ["clean"], "gallery": ["random_noise:mode=class"]}


@pytest.fixture(scope="module")
def figures_dir(tmp_path_factory):
    """Every figure reproduced once on a tiny preset, sharing one results directory."""
    import torch

    from benchmark.presets import load_preset
    from leaderboard.figures import FIGURES, reproduce

    root = tmp_path_factory.mktemp("figures")
    (root / "tiny.toml").write_text(FIGURE_PRESET)
    preset = load_preset(str(root / "tiny.toml"))
    written = {name: reproduce(name, preset, out_dir=root, device=torch.device("cpu"), progress=False,
                               defenses=FIGURE_DEFENSES[name]) for name in FIGURES}
    return root, written


@pytest.mark.parametrize("name", ["paradigm-gap", "freeze-depth", "finetune-table", "gallery"])
def test_reproduce_writes_png_pdf_and_csv(figures_dir, name):
    root, written = figures_dir
    suffixes = {p.suffix for p in written[name]}
    assert {".png", ".pdf", ".csv"} <= suffixes, f"{name} must write PNG, PDF and CSV, wrote {written[name]}"
    png = root / "figures" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    csv = pd.read_csv(root / "figures" / f"{name}.csv")
    expected = {"clean"} | {"random_noise(mode=class)" for d in FIGURE_DEFENSES[name] if d != "clean"}
    assert len(csv) > 0 and set(csv["defense"]) == expected, \
        f"{name}: the CSV must hold the plotted defenses {expected}, got {sorted(set(csv['defense']))}"


def test_paradigm_gap_numbers(figures_dir):
    root, _ = figures_dir
    csv = pd.read_csv(root / "figures" / "paradigm-gap.csv")
    assert sorted(csv["attack"].unique()) == sorted(["scratch", "linear_probe", "frozen_shallow", "full_finetune",
                                                     "sf_pretrain"]), f"paradigms wrong: {csv['attack'].unique()}"
    assert len(csv) == 2 * 5, f"2 defenses x 5 paradigms x 1 backbone expected, got {len(csv)} rows"
    assert (csv.loc[csv["attack"] == "scratch", "gap_vs_scratch"] == 0).all(), "scratch has no gap to itself"
    assert csv["accuracy_mean"].between(0, 100).all(), "accuracies must be percentages"


def test_freeze_depth_sweeps_every_stage(figures_dir):
    root, _ = figures_dir
    csv = pd.read_csv(root / "figures" / "freeze-depth.csv")
    assert sorted(csv["k"].unique()) == [0, 1, 2, 3, 4], f"resnet_tiny has 4 stages: k 0..4, got {csv['k'].unique()}"


def test_gallery_measures_the_budget(figures_dir):
    root, _ = figures_dir
    csv = pd.read_csv(root / "figures" / "gallery.csv").set_index("defense")
    assert csv.loc["clean", "linf_255"] == 0 and csv.loc["clean", "ssim"] == pytest.approx(1.0), "clean is unchanged"
    assert 0 < csv.loc["random_noise(mode=class)", "linf_255"] <= 8, "the L-inf 8/255 budget must show"


def test_reproduce_reuses_finished_cells(figures_dir):
    import torch

    from benchmark.presets import load_preset
    from leaderboard.figures import reproduce

    root, _ = figures_dir
    with Store(root / "results.sqlite") as store:
        before = len(store.frame())
    reproduce("paradigm-gap", load_preset(str(root / "tiny.toml")), out_dir=root, device=torch.device("cpu"),
              progress=False, defenses=["random_noise:mode=class"])
    with Store(root / "results.sqlite") as store:
        assert len(store.frame()) == before, "a second reproduce must reuse every finished cell"


def test_publishing_a_grid_run_in_parts_keeps_the_cells_of_each_part(tmp_path, capsys, caplog):
    """A grid run in two stores (two sessions, two machines) and published from each in turn: the entries
    hold both parts and state the plan's protocol; an entry's cell that is not the planned computation (its
    key differs) is dropped."""
    import run_benchmark

    preset = tmp_path / "parts.toml"
    preset.write_text('extends = "quick"\nname = "parts"\nbackbones = ["resnet_tiny"]\n'
                      'protocol_note = "the current protocol"\n'
                      'defenses = ["clean", "random_noise"]\nattacks = ["scratch", "scratch:epochs=2"]\n'
                      '[dataset]\ntrain_size = 40\ntest_size = 20\nsource_size = 40\n'
                      '[attack_protocol.scratch]\nepochs = 1\n')
    entries = tmp_path / "entries"

    def run_and_publish(store: str, attack: str) -> None:
        out = str(tmp_path / store)
        assert run_benchmark.main(["run", "--preset", str(preset), "--out", out, "--attacks", attack,
                                   "--no-progress"]) == 0, capsys.readouterr().err[-2000:]
        assert run_benchmark.main(["leaderboard", "--results", out, "--preset", str(preset), "--publish",
                                   "--entries", str(entries), "--out", str(tmp_path / f"{store}-lb")]) == 0
        capsys.readouterr()

    run_and_publish("first", "scratch")
    first = {d: read_entry(entries / "parts" / f"{d}.json")["results"] for d in ("clean", "random_noise")}
    assert all(len(r) == 1 for r in first.values()), first
    for d in ("clean", "random_noise"):  # the first part as published before the note was reworded (same keys)
        e = json.loads((entries / "parts" / f"{d}.json").read_text())
        e["protocol"]["protocol_note"] = "an older wording"
        (entries / "parts" / f"{d}.json").write_text(json.dumps(e))
    run_and_publish("second", "scratch:epochs=2")
    for d in ("clean", "random_noise"):
        e = read_entry(entries / "parts" / f"{d}.json")
        by_attack = {r["attack"]: r for r in e["results"]}
        assert sorted(by_attack) == ["scratch", "scratch(epochs=2)"], f"{d}: both parts must be published"
        assert by_attack["scratch"] == first[d][0], f"{d}: the first part's cell must be kept as it was"
        assert e["score"]["complete"] and e["score"]["cells_ok"] == 2, e["score"]
        assert by_attack["scratch"]["clean_accuracy"] is not None, "the kept cell keeps its clean reference"
        assert e["protocol"]["protocol_note"] == "the current protocol", f"{d}: the plan's, not an older cell's"
        assert list(e["protocol"]) == sorted(e["protocol"]), "the stored key order: republishing changes no byte"

    # a cell of another configuration (its key is not the plan's) is not carried over
    path = entries / "parts" / "random_noise.json"
    e = json.loads(path.read_text())
    stale = next(r for r in e["results"] if r["attack"] == "scratch")
    stale["key"] = "0" * 24
    path.write_text(json.dumps(e))
    caplog.set_level("WARNING")
    assert run_benchmark.main(["leaderboard", "--results", str(tmp_path / "second"), "--preset", str(preset),
                               "--publish", "--entries", str(entries), "--out", str(tmp_path / "third-lb")]) == 0
    e = read_entry(path)
    assert [r["attack"] for r in e["results"]] == ["scratch(epochs=2)"], "a stale cell must be dropped"
    assert not e["score"]["complete"] and e["score"]["cells_missing"] == 1, e["score"]
    assert "not in the plan" in caplog.text, "dropping published cells must be said"
    assert len(read_entry(entries / "parts" / "clean.json")["results"]) == 2, "the other entry is unchanged"

    # a part trained on another protected set of the same defense and seed (its generator gave other
    # bytes, e.g. on another CPU) is not joined with the store's cells of that set
    run_and_publish("first", "scratch")  # the entry is whole again
    e = json.loads(path.read_text())
    assert len(e["results"]) == 2
    e["perturbation"][0]["l2_mean"] *= 1.01
    path.write_text(json.dumps(e))
    caplog.clear()
    assert run_benchmark.main(["leaderboard", "--results", str(tmp_path / "second"), "--preset", str(preset),
                               "--publish", "--entries", str(entries), "--out", str(tmp_path / "fourth-lb")]) == 0
    assert [r["attack"] for r in read_entry(path)["results"]] == ["scratch(epochs=2)"], \
        "cells of another protected set must be dropped"
    assert "another protected set" in caplog.text, caplog.text
    assert len(read_entry(entries / "parts" / "clean.json")["results"]) == 2, \
        "clean's protected set is the same everywhere: its cells are kept"

    # an entry of a defense the preset does not run (a submitted plugin's) is left as it is, unmentioned
    other = entries / "parts" / "mine.json"
    e = json.loads((entries / "parts" / "clean.json").read_text())
    e.update(defense="mine", name="clean")
    for i, r in enumerate(e["results"]):
        r["key"] = f"{i:024d}"  # its own cells: not the plan's
    other.write_text(json.dumps(e))
    caplog.clear()
    assert run_benchmark.main(["leaderboard", "--results", str(tmp_path / "second"), "--preset", str(preset),
                               "--publish", "--entries", str(entries), "--out", str(tmp_path / "fifth-lb")]) == 0
    assert json.loads(other.read_text()) == e and "mine" not in caplog.text, caplog.text


def test_leaderboard_seeds_widen_the_preset_grid(tmp_path, capsys):
    """A store run with more seeds than its preset's is published whole with ``leaderboard --seeds``;
    without it, the preset's own seeds are the grid."""
    import run_benchmark

    preset = tmp_path / "seeds.toml"
    preset.write_text('extends = "quick"\nname = "seeds"\nbackbones = ["resnet_tiny"]\n'
                      'defenses = ["clean", "random_noise"]\nattacks = ["scratch"]\n'
                      '[dataset]\ntrain_size = 40\ntest_size = 20\nsource_size = 40\n'
                      '[attack_protocol.scratch]\nepochs = 1\n')
    out = str(tmp_path / "results")
    assert run_benchmark.main(["run", "--preset", str(preset), "--out", out, "--seeds", "0", "1",
                               "--no-progress"]) == 0, capsys.readouterr().err[-2000:]
    # a variant the preset does not run, in the same store: not the preset's entry
    assert run_benchmark.main(["run", "--preset", str(preset), "--out", out, "--defenses", "random_noise:mode=class",
                               "--no-progress"]) == 0, capsys.readouterr().err[-2000:]

    def published_seeds(*seeds: str) -> list[int]:
        entries = tmp_path / f"entries{len(seeds)}"
        args = ["leaderboard", "--results", out, "--preset", str(preset), "--publish", "--entries", str(entries),
                "--out", str(tmp_path / f"lb{len(seeds)}")]
        assert run_benchmark.main(args + (["--seeds", *seeds] if seeds else [])) == 0
        capsys.readouterr()
        return sorted(r["seed"] for r in read_entry(entries / "seeds" / "random_noise.json")["results"])

    assert published_seeds() == [0], "without --seeds the preset's seeds are the grid"
    assert published_seeds("0", "1") == [0, 1], "--seeds 0 1 must publish both seeds"
    assert sorted(p.name for p in (tmp_path / "entries2" / "seeds").glob("*.json")) == \
        ["clean.json", "random_noise.json"], "only the preset's defenses are its entries"
    assert run_benchmark.main(["leaderboard", "--results", out, "--seeds", "0"]) == 2
    assert "--seeds needs --preset" in capsys.readouterr().err
    assert run_benchmark.main(["leaderboard", "--results", out, "--preset", str(preset), "--seeds", "0", "-1"]) == 2
    assert "seeds must be one or more integers" in capsys.readouterr().err


def test_committed_entries_hold_only_cells_their_preset_plans():
    """A committed entry whose preset has since changed a budget would show a computation that
    ``run --preset`` no longer makes; its cells must be run again and the entry republished."""
    plans = {}  # the entries of one preset share its plan: made once per (preset, data set, seeds)
    for path in sorted(ENTRIES_DIR.glob("*/*.json")):
        entry = read_entry(path)
        seeds = tuple(sorted({r["seed"] for r in entry["results"]}))
        grid = (entry["preset"], json.dumps(entry["dataset_config"], sort_keys=True), seeds)
        if grid not in plans:
            plans[grid] = {c.key for c in plan(load_preset(entry["preset"]),
                                               dataset=DatasetConfig(**entry["dataset_config"]), seeds=list(seeds))}
        planned = plans[grid]
        stale = [f"{r['attack']} / {r['backbone']} / seed {r['seed']}" for r in entry["results"]
                 if r["key"] not in planned]
        assert not stale, (f"{path.relative_to(ENTRIES_DIR)}: {len(stale)} of {len(entry['results'])} cells are not "
                           f"the computation preset {entry['preset']!r} plans now (another configuration), e.g. "
                           f"{stale[0]}; run them again and --publish")


@pytest.mark.parametrize("base", [DatasetConfig("shapes", sample_seed=3), DatasetConfig("shapes", train_sample_seed=7)])
def test_an_entry_names_its_grid_data_whatever_seed_its_first_cell_has(base):
    """A cell of seed s carries its own training sample's seed; the entry's data set is the grid's, the one
    ``run --preset`` plans every seed from (a store's first cell may be of seed 1 when seed 0 came from an entry)."""
    for seed in (0, 1, 2):
        cell = base.for_seed(seed).key()
        assert grid_dataset_config(cell, seed) == base.key(), f"seed {seed}: {cell} does not map back to the grid's"
