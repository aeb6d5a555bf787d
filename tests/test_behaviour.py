"""Behaviour lock: a tiny grid over every built-in defense and paradigm gives exactly the saved results.

``tests/fixtures/behaviour/<cpu>/`` holds ``results.csv`` and ``perturbations.csv`` of this grid as the
code computed them when the fixture was written, one folder per kind of CPU it was written on: the
float kernels torch picks differ between CPUs (an Intel Xeon and an AMD EPYC give other accuracies and
other generator outputs, even on one thread), so the numbers must equal one saved set exactly, and
the cell keys, statuses and certificate verdicts, which no CPU changes, must equal every set. A
refactor that changes a number, a cell key (the cache would silently recompute) or a certificate
fails here. When a change is meant to alter results, or on a new kind of CPU, write this CPU's
fixture with ``UEBENCH_WRITE_FIXTURE=1 pytest tests/test_behaviour.py`` (it goes to the folder named
by ``cpu_kind()``; after a change meant to alter results, write every CPU's) and say why in the
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
        "bait": {"epochs": 3, "batch_size": 32, "train_portion": 1.0, "surrogate_steps": 3},
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


# what no CPU changes: a difference here is a difference in the code
STRUCTURE = {"results.csv": ["defense", "attack", "backbone", "seed", "status", "error", "key"],
             "perturbations.csv": ["defense", "seed", "certificate"]}


def cpu_kind() -> str:
    """The folder name of this CPU's fixture: its vendor and the instruction set torch dispatches to."""
    vendor = "unknown"
    try:
        vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}".lower()


@pytest.mark.parametrize("name, columns", [("results.csv", RESULT_COLUMNS),
                                           ("perturbations.csv", PERTURBATION_COLUMNS)])
def test_the_tiny_grid_gives_the_saved_results(grid_output, name, columns):
    got = pd.read_csv(grid_output / name)[columns]
    if os.environ.get("UEBENCH_WRITE_FIXTURE"):
        (FIXTURE / cpu_kind()).mkdir(parents=True, exist_ok=True)
        got.to_csv(FIXTURE / cpu_kind() / name, index=False)
    saved = {d.name: pd.read_csv(d / name)[columns] for d in sorted(FIXTURE.iterdir()) if (d / name).is_file()}
    assert saved, f"no saved {name} under {FIXTURE}"
    for cpu, want in saved.items():
        assert len(got) == len(want) > 0, f"{cpu}: {len(want)} saved rows, {len(got)} computed"
        pd.testing.assert_frame_equal(got[STRUCTURE[name]], want[STRUCTURE[name]], check_dtype=False,
                                      obj=f"{name} (keys, statuses, verdicts) against the {cpu} fixture")
    mismatches = {}
    for cpu, want in saved.items():
        try:
            pd.testing.assert_frame_equal(got, want, check_dtype=False)
            return
        except AssertionError as exc:
            mismatches[cpu] = str(exc).splitlines()[0:6]
    pytest.fail(f"{name} equals none of the saved fixtures ({', '.join(saved)}; this CPU: {cpu_kind()}); "
                f"if this is a new kind of CPU, write its fixture (UEBENCH_WRITE_FIXTURE=1). Differences: "
                + "; ".join(f"{cpu}: {' '.join(lines)}" for cpu, lines in mismatches.items()))
