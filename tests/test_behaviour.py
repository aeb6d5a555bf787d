"""Behaviour lock: a tiny grid over every built-in defense and paradigm gives exactly the saved results.

``tests/fixtures/behaviour/`` holds ``results.csv`` and ``perturbations.csv`` of this grid as the code
computed them when the fixture was written. A refactor that changes a number, a cell key (the cache
would silently recompute) or a certificate fails here. When a change is meant to alter results, write
the fixture again with ``UEBENCH_WRITE_FIXTURE=1 pytest tests/test_behaviour.py`` and say why in the
commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark.presets import preset_from_dict
from benchmark.execute import LocalExecutor, run_grid
from benchmark.plan import plan

FIXTURE = Path(__file__).parent / "fixtures" / "behaviour"
GRID = {
    "extends": "quick",
    "name": "behaviour",
    "dataset": {"train_size": 60, "test_size": 30, "source_size": 48},
    "defenses": ["clean", "random_noise", "random_noise:mode=class", "em", "em:mode=class", "tap", "rem", "lsp",
                 "ops", "ar", "cuda", "bait", "bait:parametrization=generator", "ssc"],
    "attacks": ["scratch", "linear_probe", "frozen_shallow", "full_finetune", "sf_pretrain"],
    "backbones": ["resnet_tiny"],
    "defense_protocol": {
        "em": {"batch_size": 32, "train_steps": 2, "max_rounds": 2},
        "tap": {"surrogate_epochs": 1, "steps": 2, "batch_size": 32, "surrogate_batch_size": 32},
        "rem": {"train_steps": 2, "steps": 1, "batch_size": 32},
        "bait": {"epochs": 3, "batch_size": 32, "train_portion": 1.0},
        "ssc": {"rounds": 2, "train_steps": 2, "pgd_steps": 1, "batch_size": 32, "class_subset": 1.0},
    },
    "attack_protocol": {"*": {"epochs": 1, "batch_size": 32}},
    "zoo": {"supervised": {"epochs": 1, "batch_size": 16}, "sf": {"epochs": 1, "batch_size": 16}},
}
# what the code computes; seconds, memory and the environment are the machine's, not the code's
RESULT_COLUMNS = ["dataset", "defense", "attack", "backbone", "seed", "status", "accuracy", "clean_accuracy",
                  "train_accuracy", "error", "preset", "key"]
PERTURBATION_COLUMNS = ["dataset", "defense", "seed", "linf_255", "l2_mean", "l0_mean", "psnr_db", "ssim",
                        "certificate", "certificate_checks"]


@pytest.fixture(scope="module")
def grid_output(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("behaviour")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums depend on the thread count; one thread gives the same bytes everywhere
    try:
        executor = LocalExecutor(out / "cache", device=torch.device("cpu"), progress=False)
        summary = run_grid(plan(preset_from_dict(dict(GRID))), out, executor)
    finally:
        torch.set_num_threads(threads)
    assert not summary.failed, [r.error for r in summary.failed]
    return out


@pytest.mark.parametrize("name, columns", [("results.csv", RESULT_COLUMNS),
                                           ("perturbations.csv", PERTURBATION_COLUMNS)])
def test_the_tiny_grid_gives_the_saved_results(grid_output, name, columns):
    got = pd.read_csv(grid_output / name)[columns]
    if os.environ.get("UEBENCH_WRITE_FIXTURE"):
        FIXTURE.mkdir(parents=True, exist_ok=True)
        got.to_csv(FIXTURE / name, index=False)
    want = pd.read_csv(FIXTURE / name)[columns]
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
