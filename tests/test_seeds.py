"""Several seeds on the leaderboard: mean ± std (ddof=1) per cell, ranks shared within noise, "1 seed: no
spread" with one; and the surrogate threat model a cell recorded, shown beside its score."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.store import Store
from leaderboard.entries import load_entries, write_entries
from leaderboard.scores import within_noise
from leaderboard.site import render
from leaderboard.tables import group_markdown, matrix_frame, ranking_frame
from tests.test_leaderboard import board_of, record, row

# per defense: the accuracy of (scratch, linear_probe) for seeds 0, 1, 2
THREE_SEEDS = {
    "clean": [(90.0, 80.0), (91.0, 81.0), (89.0, 79.0)],
    "random_noise": [(50.0, 30.0), (56.0, 30.0), (44.0, 30.0)],             # worst 50 ± 6 (scratch)
    "random_noise(mode=class)": [(52.0, 20.0), (58.0, 20.0), (46.0, 20.0)],  # worst 52 ± 6: within noise of 50 ± 6
    "cuda": [(80.0, 10.0), (81.0, 10.0), (79.0, 10.0)],                    # worst 80 ± 1: clearly last
}


def make(tmp_path, table: dict, seeds: int = 3, threat: dict | None = None):
    with Store(tmp_path / "results.sqlite") as store:
        for defense, per_seed in table.items():
            for seed, accs in enumerate(per_seed[:seeds]):
                for attack, acc in zip(("scratch", "linear_probe"), accs):
                    rec = record(defense, attack, "b1", seed, acc)
                    if threat and defense in threat:
                        rec.metrics["metadata"]["surrogate_threat_model"] = threat[defense]
                    store.put(rec)
    return board_of(tmp_path)


def test_three_seeds_give_mean_and_sample_std_per_cell(tmp_path):
    board = make(tmp_path, THREE_SEEDS)
    rn = row(board, "random_noise")
    assert rn["seeds"] == 3, f"the group's grid has 3 seeds, got {rn['seeds']}"
    assert rn["worst_accuracy"] == pytest.approx(50.0) and rn["worst_std"] == pytest.approx(np.std([50, 56, 44], ddof=1)), \
        "the worst case must be the seed mean with its sample std (ddof=1)"
    assert rn["mean_std"] == pytest.approx(np.std([40.0, 43.0, 37.0], ddof=1)), \
        "the mean's std must be over the seeds' grid means"
    matrix = matrix_frame(board, "b1").set_index("defense")
    assert matrix.loc["random_noise", "scratch"] == "50.0 ± 6.0", matrix.loc["random_noise"].to_dict()
    assert matrix.loc["clean", "linear_probe"] == "80.0 ± 1.0", matrix.loc["clean"].to_dict()


def test_defenses_within_noise_share_a_rank_and_say_so(tmp_path):
    board = make(tmp_path, THREE_SEEDS)
    rn, rc, cuda = (row(board, d) for d in ("random_noise", "random_noise(mode=class)", "cuda"))
    assert (rn["rank"], rc["rank"]) == (1, 1), "52 ± 6 against 50 ± 6 is within noise: one shared rank"
    assert rc["tied_with"] == "random_noise" and rn["tied_with"] == "", (rn["tied_with"], rc["tied_with"])
    assert cuda["rank"] == 3 and cuda["tied_with"] == "", "80 ± 1 is far from 52 ± 6: ranked below, competition style"
    frame = ranking_frame(board).set_index("defense")
    assert "within noise of random_noise" in frame.loc["random_noise(mode=class)", "note"], frame["note"].to_dict()
    assert frame.loc["random_noise", "seeds"] == "3"
    text = group_markdown(board)
    assert "mean ± std over 3 seeds (sample std, ddof=1)" in text and "sqrt(std1² + std2²)" in text, text[:600]
    assert "within noise of random_noise" in render(board), "the site must show the shared rank's reason"


def test_the_noise_rule_is_strict_and_needs_a_spread():
    assert within_noise(50.0, 3.0, 54.0, 4.0), "a gap of 4 below sqrt(9 + 16) = 5 is within noise"
    assert not within_noise(50.0, 3.0, 55.0, 4.0), "a gap equal to the combined std is not within noise"
    assert not within_noise(50.0, float("nan"), 50.5, float("nan")), "one seed has no spread: never within noise"


def test_one_seed_orders_as_before_and_says_there_is_no_spread(tmp_path):
    board = make(tmp_path, THREE_SEEDS, seeds=1)
    assert (row(board, "random_noise")["rank"], row(board, "random_noise(mode=class)")["rank"]) == (1, 2), \
        "with one seed, 50 and 52 must be ordered"
    text = group_markdown(board)
    assert "1 seed: no spread" in text and "within noise" not in text, text[:600]
    assert "±" not in matrix_frame(board, "b1").to_string(), "one seed must show no ± in the cells"
    assert "1 seed: no spread" in render(board)


def test_the_surrogate_threat_model_reaches_the_tables_and_survives_the_entries(tmp_path):
    threat = {"random_noise": "transfer", "random_noise(mode=class)": "white-box", "cuda": "none"}
    board = make(tmp_path, THREE_SEEDS, threat=threat)
    shown = ranking_frame(board).set_index("defense")["surrogate"].to_dict()
    assert shown == {"random_noise": "transfer", "random_noise(mode=class)": "white-box", "cuda": "-", "clean": "?"}, \
        shown
    write_entries(board, tmp_path / "entries")
    again = load_entries(tmp_path / "entries")
    assert ranking_frame(again).equals(ranking_frame(board)), "the entries must rebuild the same ranking"
