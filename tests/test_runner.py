"""Planning, executing and reporting end to end: results, reuse, failing cells, caches, certificates, the
metadata each record carries (kills and concurrent runners: ``test_crash.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from benchmark.cache import load_verified, save_atomic
from benchmark.presets import preset_from_dict
from benchmark.plugins import Attack
from benchmark.registry import ATTACKS
from benchmark.execute import LocalExecutor, RunSummary, run_grid
from benchmark.plan import Cell, plan, zoo_recipe
from leaderboard.build import board_from_store
from leaderboard.entries import entry_path, load_entries, read_entry, write_entries
from leaderboard.tables import markdown, ranking_frame

TINY = {
    "extends": "quick",
    "name": "tiny",
    "dataset": {"train_size": 60, "test_size": 30, "source_size": 24},
    "defenses": ["clean", "random_noise", "random_noise:mode=class"],
    "attacks": ["scratch"],
    "backbones": ["resnet_tiny"],
    "attack_protocol": {"scratch": {"epochs": 1, "batch_size": 32}},
}


def _executor(tmp_path) -> LocalExecutor:
    return LocalExecutor(tmp_path / "out" / "cache", device=torch.device("cpu"), progress=False)


def _run(tmp_path, cells: list[Cell], executor: LocalExecutor | None = None) -> RunSummary:
    return run_grid(cells, tmp_path / "out", executor or _executor(tmp_path))


def test_end_to_end_and_reuse(tmp_path):
    cells = plan(preset_from_dict(dict(TINY)))
    assert len(cells) == 3, [c.describe() for c in cells]
    summary = _run(tmp_path, cells)
    assert len(summary.ran) == 3 and not summary.failed, [r.error for r in summary.failed]
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(df["status"]) == ["ok"] * 3, df
    assert set(df["defense"]) == {"clean", "random_noise", "random_noise(mode=class)"}, df["defense"]
    clean_acc = float(df.loc[df["defense"] == "clean", "accuracy"].iloc[0])
    assert (df["clean_accuracy"] == clean_acc).all(), "clean reference not joined to every row"
    pert = pd.read_csv(tmp_path / "out" / "perturbations.csv").set_index("defense")
    assert set(pert.index) == set(df["defense"]), pert
    assert pert.loc["clean", "linf_255"] == 0 and pert.loc["clean", "ssim"] == pytest.approx(1.0)
    noisy = pert.loc["random_noise"]
    assert 0 < noisy["linf_255"] <= 8 and 0 < noisy["l2_mean"] and 20 < noisy["psnr_db"] < 60, noisy
    assert 0.5 < noisy["ssim"] < 1 and noisy["generation_seconds"] >= 0, noisy
    again = _run(tmp_path, cells)
    assert again.skipped == 3 and not again.ran, "a finished cell was recomputed"
    assert len(list((tmp_path / "out" / "cache" / "protected").glob("*.safetensors"))) == 3
    for rec in summary.ran:  # the leaderboard reads these instead of rebuilding the plugins
        meta = rec.metrics["metadata"]
        assert meta["defense"]["title"] and meta["defense"]["norm"] in ("linf", "none"), f"defense metadata: {meta}"
        assert meta["defense"]["budget"] == (0.0 if rec.defense == "clean" else pytest.approx(8 / 255)), meta
        assert meta["attack"]["title"] == "Training from scratch", f"attack metadata: {meta['attack']}"
        assert meta["preset"]["description"] == plan(preset_from_dict(dict(TINY)))[0].preset_info.description, meta
        assert rec.metrics["num_classes"] == 10, f"class count: {rec.metrics.get('num_classes')}"


def test_changed_field_recomputes_only_that_cell(tmp_path):
    executor = _executor(tmp_path)
    _run(tmp_path, plan(preset_from_dict(dict(TINY))), executor)
    changed = dict(TINY, defenses=["clean", "random_noise:eps=4/255"])
    summary = _run(tmp_path, plan(preset_from_dict(changed)), executor)
    assert [r.defense for r in summary.ran] == ["random_noise(eps=4/255)"], [r.defense for r in summary.ran]


def test_a_zoo_recipe_change_reruns_only_the_cells_that_use_it():
    base = dict(TINY, defenses=["clean", "tap"], attacks=["scratch", "frozen_shallow", "sf_pretrain"])
    keys = {c.describe(): c.key for c in plan(preset_from_dict(dict(base)))}
    sf = {c.describe(): c.key for c in plan(preset_from_dict(dict(base, zoo={"sf": {"epochs": 1}})))}
    changed = sorted(k for k in keys if keys[k] != sf[k])
    assert changed == ["clean / sf_pretrain / resnet_tiny / seed 0", "tap / sf_pretrain / resnet_tiny / seed 0"], \
        f"an sf recipe change must rerun exactly the sf cells, reran {changed}"
    sup = {c.describe(): c.key for c in plan(preset_from_dict(dict(base, zoo={"supervised": {"epochs": 1}})))}
    assert all(keys[k] != sup[k] for k in keys), "cells that may use the supervised zoo must be rerun"
    cell = plan(preset_from_dict(dict(base)))[-1]
    other = plan(preset_from_dict(dict(base, zoo={"supervised": {"epochs": 1}})))[-1]
    assert zoo_recipe(cell.zoo, cell.defense) != zoo_recipe(other.zoo, other.defense), \
        "a protected set made with a pretrained surrogate must depend on the supervised recipe"


def test_a_per_backbone_zoo_recipe_reruns_only_the_cells_that_use_that_backbone():
    base = dict(TINY, defenses=["clean", "tap", "tap:surrogate_backbone=vit_tiny"],
                attacks=["scratch", "full_finetune"], backbones=["resnet_tiny", "vit_tiny"])
    keys = {c.describe(): (c.key, c.protected_key()) for c in plan(preset_from_dict(dict(base)))}
    own = {c.describe(): (c.key, c.protected_key())
           for c in plan(preset_from_dict(dict(base, zoo={"supervised@vit_tiny": {"lr": 1e-3}})))}
    cells = sorted(k for k in keys if keys[k][0] != own[k][0])
    expected = sorted(k for k in keys if k.startswith("tap(surrogate_backbone=vit_tiny) /")
                      or k.endswith("full_finetune / vit_tiny / seed 0"))
    assert len(expected) == 6 and cells == expected, f"only cells with vit_tiny zoo weights may rerun, reran {cells}"
    protected = sorted({k.split(" / ")[0] for k in keys if keys[k][1] != own[k][1]})
    assert protected == ["tap(surrogate_backbone=vit_tiny)"], f"protected sets rebuilt: {protected}"


def test_zoo_keys_follow_the_declared_sources_not_config_values():
    """An ``sf`` value in a config does not tie a cell to the sf recipe; a declared ``sf`` source does."""
    @dataclass(frozen=True)
    class Noted(Attack):
        note: str = "sf"  # a value that happens to read "sf"
        title = "declares no zoo source"

        def zoo_sources(self) -> frozenset[str]:
            return frozenset()

    ATTACKS.register("noted")(Noted)
    try:
        base = dict(TINY, defenses=["clean", "em:surrogate=sf", "ssc:surrogate_weights=sf"], attacks=["noted"])
        keys = {c.describe(): c.key for c in plan(preset_from_dict(dict(base)))}
        sf = {c.describe(): c.key for c in plan(preset_from_dict(dict(base, zoo={"sf": {"epochs": 1}})))}
    finally:
        ATTACKS.unregister("noted")
    changed = sorted(k.split(" / ")[0] for k in keys if keys[k] != sf[k])
    assert changed == ["em(surrogate=sf)", "ssc(surrogate_weights=sf)"], \
        f"only the cells of plugins that declare sf must depend on the sf recipe, changed: {changed}"


def test_failing_cell_is_recorded_and_others_go_on(tmp_path):
    @dataclass(frozen=True)
    class Exploding(Attack):
        title = "raises"

        def _fit(self, train, backbone, ctx):
            raise RuntimeError("kaboom")

    ATTACKS.register("exploding")(Exploding)
    try:
        summary = _run(tmp_path, plan(preset_from_dict(dict(TINY, attacks=["scratch", "exploding"]))))
    finally:
        ATTACKS.unregister("exploding")
    failed = [r for r in summary.ran if r.status == "failed"]
    assert len(failed) == 3 and all("RuntimeError: kaboom" in r.error for r in failed), failed
    assert sum(r.status == "ok" for r in summary.ran) == 3, "the scratch cells must still run"


def test_corrupt_protected_cache_is_rebuilt(tmp_path, caplog):
    cells = plan(preset_from_dict(dict(TINY, defenses=["random_noise"])))
    _run(tmp_path, cells)
    for target in (tmp_path / "out" / "cache" / "protected").glob("*.safetensors"):  # clean's and the defense's
        data = bytearray(target.read_bytes())
        data[-10:] = b"\xff" * 10
        target.write_bytes(bytes(data))
    fresh = _executor(tmp_path)
    img, _, _ = fresh.protected(cells[-1])
    assert "corrupt" in caplog.text, "a corrupt cache entry must be reported"
    assert img.images.dtype == torch.uint8 and len(img) == 60


# class-wise noise below one uint8 step: quantization erases it, so its shortcut certificate fails
ERASED = "random_noise:mode=class,eps=0.5/255"


def test_a_failed_certificate_is_recorded_and_the_cell_still_counts(tmp_path, caplog):
    cells = plan(preset_from_dict(dict(TINY, defenses=["clean", "random_noise:mode=class", ERASED])))
    erased = next(c for c in cells if "eps" in c.defense.label).defense.label
    with caplog.at_level(logging.INFO, logger="benchmark.execute"):
        summary = _run(tmp_path, cells)
    assert [r.status for r in summary.ran] == ["ok"] * 3, f"a failed certificate must not fail a cell: {summary.ran}"
    certs = {r.defense: r.metrics["perturbation"]["certificate"] for r in summary.ran}
    assert certs["clean"] is None, f"clean has no certificate, stored {certs['clean']}"
    assert certs["random_noise(mode=class)"]["passed"], f"class-wise noise is a shortcut: {certs}"
    assert certs[erased]["passed"] is False and certs[erased]["checks"][0]["name"] == "shortcut_accuracy", \
        f"erased noise must fail its shortcut check: {certs[erased]}"
    assert all(set(r.metrics["attack"]) == {"epochs", "trainable_parameters"} for r in summary.ran), \
        f"the attack's report is missing: {[r.metrics['attack'] for r in summary.ran]}"
    assert all(r.train_accuracy is not None for r in summary.ran), "the train accuracy of the Fitted must be stored"
    assert f"{erased} (seed 0): certificate failed" in caplog.text, "a failed certificate must be logged as a warning"
    pert = pd.read_csv(tmp_path / "out" / "perturbations.csv").set_index("defense")
    assert pert["certificate"].to_dict() == {"clean": "none", "random_noise(mode=class)": "passed", erased: "failed"}, \
        f"perturbations.csv verdicts: {pert['certificate'].to_dict()}"
    assert pert.loc[erased, "certificate_checks"].startswith("shortcut_accuracy=") and \
        pert.loc[erased, "certificate_checks"].endswith(">=0.9"), f"checks: {pert.loc[erased, 'certificate_checks']}"

    board = board_from_store(tmp_path / "out", presets={}, metadata_fallback=None)
    certified = board.scores.set_index("defense")["certified"].to_dict()
    assert certified == {"clean": None, "random_noise(mode=class)": True, erased: False}, f"certified: {certified}"
    table = ranking_frame(board).set_index("defense")
    assert table.loc[erased, "certificate"] == "FAILED" and "certificate failed" in table.loc[erased, "note"], \
        f"the table must flag the failure: {table.loc[erased].to_dict()}"
    assert f"| {erased}" in markdown(ranking_frame(board)) and "FAILED" in markdown(ranking_frame(board)), \
        "the markdown table must show FAILED"
    write_entries(board, tmp_path / "entries")
    entry = read_entry(entry_path(tmp_path / "entries", "tiny", erased))
    assert [c["passed"] for c in entry["certificates"]] == [False] and entry["score"]["certified"] is False, \
        f"the entry must carry the failed certificate: {entry['certificates']}, {entry['score']}"
    assert read_entry(entry_path(tmp_path / "entries", "tiny", "clean"))["certificates"] == [], \
        "a defense without a certificate has an empty list"
    again = load_entries(tmp_path / "entries").scores.set_index("defense")["certified"].to_dict()
    assert again == certified, f"entries must restore the certified flags: {again} != {certified}"


def test_a_protected_set_cached_before_certificates_is_built_again(tmp_path):
    cells = plan(preset_from_dict(dict(TINY, defenses=["random_noise:mode=class"])))
    cell = cells[-1]
    _executor(tmp_path).protected(cell)
    (path,) = [p for p in (tmp_path / "out" / "cache" / "protected").glob("*.safetensors")
               if load_verified(p)[1]["defense"] == cell.defense.label]
    tensors, meta = load_verified(path)
    save_atomic(path, tensors, {k: v for k, v in meta.items() if k != "certificate"})  # as an older version wrote it
    _, rebuilt, seconds = _executor(tmp_path).protected(cell)
    assert seconds > 0 and rebuilt["certificate"] == meta["certificate"], \
        f"a cached set without a certificate must be generated again (took {seconds}s, meta {rebuilt})"
    assert "certificate" in load_verified(path)[1], "the rebuilt set must replace the old cache entry"
