"""The Ray executor on a local Ray instance: the local executor's results, each protected set built once,
and a worker that dies retried or recorded as failed, never lost."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from attacks.scratch import Scratch
from benchmark.errors import UEBenchError
from benchmark.execute import LocalExecutor, run_grid
from benchmark.plan import plan
from benchmark.presets import preset_from_dict
from benchmark.registry import ATTACKS
from benchmark.store import Store
from run_benchmark import main

ray = pytest.importorskip("ray")  # in the dev extra; optional for users (uebench[ray])
from benchmark.ray_executor import RayExecutor  # noqa: E402

GRID = {
    "extends": "quick",
    "name": "tiny",
    "dataset": {"train_size": 60, "test_size": 30, "source_size": 24},
    "defenses": ["clean", "random_noise"],
    "attacks": ["scratch", "scratch:lr=0.01"],  # two cells per protected set
    "backbones": ["resnet_tiny"],
    "attack_protocol": {"scratch": {"epochs": 1, "batch_size": 32}},
}


@pytest.fixture(autouse=True)
def _local_instance(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield
    assert not ray.is_initialized(), "the executor must shut down the Ray instance it started"


def _ray(out, **kwargs) -> RayExecutor:
    return RayExecutor(out / "cache", device=torch.device("cpu"), num_cpus=2, progress=False, **kwargs)


def test_ray_gives_the_local_executors_results(tmp_path, caplog):
    cells = plan(preset_from_dict(dict(GRID)))
    assert len(cells) == 4, [c.describe() for c in cells]
    local = run_grid(cells, tmp_path / "local", LocalExecutor(tmp_path / "local" / "cache", device=torch.device("cpu"),
                                                             progress=False))
    caplog.clear()
    caplog.set_level("INFO", logger="benchmark")
    remote = run_grid(cells, tmp_path / "ray", _ray(tmp_path / "ray", cell_timeout=300))  # cells in the workers' children
    verdicts = sorted(r.getMessage() for r in caplog.records if "certificate" in r.getMessage())
    assert verdicts == [f"{d} (seed 0): no certificate (the defense has no objective it reports)"
                        for d in ("clean", "random_noise")], f"the driver must log each set's verdict once: {verdicts}"
    by_key = {r.key: r for r in local.ran}
    assert sorted(by_key) == sorted(r.key for r in remote.ran), "the Ray run must return one record per cell"
    for rec in remote.ran:
        want = by_key[rec.key]
        assert (rec.status, rec.accuracy, rec.train_accuracy) == (want.status, want.accuracy, want.train_accuracy), \
            f"{rec.defense} / {rec.attack}: Ray {rec.status} {rec.accuracy} {rec.train_accuracy} != local " \
            f"{want.status} {want.accuracy} {want.train_accuracy} ({rec.error})"
        assert rec.metrics == want.metrics | {"perturbation": rec.metrics["perturbation"]}, \
            f"the record's metadata differs: {rec.metrics} != {want.metrics}"
    built = sorted(r.defense for r in remote.ran if r.defense_seconds > 0)
    assert built == ["clean", "random_noise"], \
        f"each protected set must be built by one cell and loaded by its sibling, built by: {built}"
    with Store(tmp_path / "ray" / "results.sqlite") as store:
        assert store.finished_keys() == {c.key for c in cells}, "the driver must store every record"
    again = run_grid(cells, tmp_path / "ray", _ray(tmp_path / "ray"))
    assert again.skipped == 4 and not again.ran, "finished cells must be reused"
    assert not ray.is_initialized(), "with nothing to run, Ray must not start"


@dataclass(frozen=True)
class DiesOnce(Scratch):
    """Training from scratch, but the first attempt SIGKILLs its process (as the out-of-memory killer would)."""

    marker: str = ""
    title = "dies once"

    def _fit(self, train, backbone, ctx):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._fit(train, backbone, ctx)


@dataclass(frozen=True)
class AlwaysDies(Scratch):
    title = "always dies"

    def _fit(self, train, backbone, ctx):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_dying_worker_is_retried_and_then_recorded_failed(tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    ATTACKS.register("dies_once")(DiesOnce)
    ATTACKS.register("always_dies")(AlwaysDies)
    try:
        marker = tmp_path / "died"
        grid = dict(GRID, defenses=["clean"], attacks=[f"dies_once:marker={marker}", "always_dies"],
                    attack_protocol={"dies_once": GRID["attack_protocol"]["scratch"]})
        cells = plan(preset_from_dict(grid))
        # the protected set is in the cache already, so both cells run at once (none waits for it to be built)
        LocalExecutor(tmp_path / "out" / "cache", device=torch.device("cpu"), progress=False).protected(cells[0])
        summary = run_grid(cells, tmp_path / "out", _ray(tmp_path / "out", max_retries=1))
    finally:
        ATTACKS.unregister("dies_once")
        ATTACKS.unregister("always_dies")
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    status = {r.attack.split("(")[0]: r for r in summary.ran}
    assert sorted(status) == ["always_dies", "dies_once"], f"a cell was lost: {sorted(status)}"
    assert marker.exists() and status["dies_once"].status == "ok", \
        f"a worker that died once must be retried: {status['dies_once'].error}"
    retried = next(c for c in cells if c.attack.label.startswith("dies_once"))
    (local,) = run_grid([retried], tmp_path / "local", LocalExecutor(tmp_path / "out" / "cache",
                                                                    device=torch.device("cpu"), progress=False)).ran
    assert status["dies_once"].accuracy == local.accuracy, \
        f"the retried cell must compute what the local executor does: {status['dies_once'].accuracy} != {local.accuracy}"
    dead = status["always_dies"]
    assert dead.status == "failed" and "worker died in each of 2 attempts" in dead.error, \
        f"a cell whose worker always dies must be recorded failed with the reason: {dead.status} {dead.error}"
    assert dead.metrics["num_classes"] == 10 and dead.metrics["metadata"]["attack"]["title"] == "always dies", \
        f"a failed record carries the metadata: {dead.metrics}"
    with Store(tmp_path / "out" / "results.sqlite") as store:
        rows = {r["key"]: r["status"] for r in store.rows()}
    assert rows == {c.key: "failed" if c.attack.label == "always_dies" else "ok" for c in cells}, \
        f"every cell must have a row, failed or not: {rows}"


def test_bad_options_are_one_line_errors(tmp_path):
    for kwargs, message in (({"num_cpus": 0}, "num_cpus=0 must be an integer >= 1"),
                            ({"cpus_per_cell": -1}, "cpus_per_cell=-1 must be a number of CPUs > 0"),
                            ({"max_retries": -1}, "max_retries=-1 must be an integer >= 0"),
                            ({"address": "127.0.0.1:6379", "num_cpus": 2}, "num_cpus sizes a local Ray instance")):
        with pytest.raises(UEBenchError, match=message):
            RayExecutor(tmp_path, device=torch.device("cpu"), **kwargs)


def test_without_ray_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # ``import ray`` raises ImportError
    with pytest.raises(UEBenchError, match=r"--executor ray needs Ray: pip install 'uebench\[ray\]'"):
        RayExecutor(tmp_path, device=torch.device("cpu"))


def test_the_command_line_builds_the_ray_executor(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_run_grid(cells, out, executor):
        seen.append(executor)
        raise UEBenchError("stopped before any work")

    monkeypatch.setattr("benchmark.execute.run_grid", fake_run_grid)
    base = ["run", "--defenses", "clean", "--attacks", "scratch", "--backbones", "resnet_tiny", "--device", "cpu",
            "--out", str(tmp_path / "out")]
    assert main(base + ["--executor", "ray", "--num-cpus", "3", "--cpus-per-cell", "0.5", "--cell-timeout", "9"]) == 2
    (executor,) = seen
    assert isinstance(executor, RayExecutor) and (executor.num_cpus, executor.cpus_per_cell, executor.cell_timeout,
                                                  executor.address) == (3, 0.5, 9.0, None), vars(executor)
    assert main(base + ["--executor", "ray", "--address", "127.0.0.1:6379"]) == 2 and seen[1].address == "127.0.0.1:6379"
    capsys.readouterr()
    assert main(base + ["--address", "127.0.0.1:6379", "--num-cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "uebench: error: --address, --num-cpus needs --executor ray", f"one line naming the options: {err}"
    assert len(seen) == 2, "no executor may be built for a refused command line"


def test_the_cells_in_flight_follow_the_cluster(tmp_path):
    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 4.0, "memory": 1e9})
    assert RayExecutor(tmp_path, device=torch.device("cpu"), cpus_per_cell=1.5)._slots(cluster) == 2, \
        "4 CPUs hold two cells of 1.5 CPUs"
    assert RayExecutor(tmp_path, device=torch.device("cpu"), max_in_flight=7)._slots(cluster) == 7
    with pytest.raises(UEBenchError, match=r"--device cuda asks for a GPU per cell, but the Ray cluster has none"):
        RayExecutor(tmp_path, device=torch.device("cuda"))._slots(cluster)
    gpus = SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0, "GPU": 3.0})
    assert RayExecutor(tmp_path, device=torch.device("cuda"))._slots(gpus) == 3, "one cell per GPU"


def test_the_driver_looks_past_the_siblings_of_a_set_being_built(tmp_path):
    """A grid's cells of one protected set come one after another; while the first builds the set, the
    other slot takes the first cell of another set instead of idling behind its siblings."""
    from benchmark.cache import Cache
    from benchmark.ray_executor import WAIT_PER_SLOT, _Dispatch

    class FakeCell:
        def __init__(self, key: str) -> None:
            self.key = key

        def protected_key(self) -> str:
            return self.key

    submitted: list[str] = []
    dispatch = _Dispatch(lambda cell: submitted.append(cell.key) or len(submitted), Cache(tmp_path), slots=2)
    stream = iter([FakeCell("a")] * 10 + [FakeCell("b")] * 10)
    while dispatch.can_take():
        dispatch.take(next(stream))
    assert submitted == ["a", "b"], f"the second slot must build set b, not wait behind a's siblings: {submitted}"
    assert len(dispatch.waiting) == 9 and len(dispatch.waiting) <= WAIT_PER_SLOT * 2
    dispatch.finish(1)  # set a is built (in the cache or not, its builder is done): a sibling takes the slot
    dispatch.release()
    assert submitted == ["a", "b", "a"], submitted


def test_the_workers_log_at_the_drivers_level(tmp_path, caplog):
    """A worker has no log handler of its own: it logs at the driver's level to its stderr, which Ray
    shows in the driver's output (here read from the session's worker logs)."""
    from pathlib import Path

    caplog.set_level("INFO")  # the driver's root level, which the workers take
    cells = plan(preset_from_dict(dict(GRID, defenses=["clean"], attacks=["scratch"])))
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)  # the caller's session: left running
    try:
        result = run_grid(cells, tmp_path, _ray(tmp_path))
        assert [r.status for r in result.ran] == ["ok"], [r.error for r in result.ran]
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        lines = [line for f in logs.glob("worker-*.err") for line in f.read_text(errors="replace").splitlines()]
    finally:
        ray.shutdown()
    assert any(" INFO benchmark.execute: loading data set shapes" in line for line in lines), \
        f"the worker must log the driver's INFO lines: {[line for line in lines if 'INFO' in line][:5]}"
