"""Crash safety and concurrency: runs killed at random and at named points resume to the results of
an uninterrupted run; runners sharing a results directory lease cells and compute each once."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark.cache import load_verified
from benchmark.execute import Executor, LocalExecutor, run_grid
from benchmark.plan import Cell, plan
from benchmark.presets import load_preset, preset_from_dict
from benchmark.store import CellRecord, Claim, LeaseKeeper, Store
from tests.test_runner import TINY

ROOT = Path(__file__).resolve().parents[1]
# a defense that trains a surrogate (em) and a victim that uses the zoo (linear_probe), so kills land
# during UE generation, zoo pretraining, training, store writes and cache writes
GRID = """extends = "quick"
name = "crash"
defenses = ["clean", "random_noise", "em"]
attacks = ["scratch", "linear_probe"]
backbones = ["resnet_tiny"]
[dataset]
train_size = 60
test_size = 30
source_size = 24
[defense_protocol.em]
batch_size = 32
train_steps = 2
max_rounds = 2
[attack_protocol."*"]
epochs = 1
batch_size = 32
[zoo.supervised]
epochs = 1
batch_size = 16
"""
COLUMNS = ["dataset", "defense", "attack", "backbone", "seed", "status", "accuracy", "clean_accuracy",
           "train_accuracy", "error", "preset", "key"]
CELL_LINE = re.compile(r"benchmark\.execute: cell (.+ / seed \d+): ")


# Runs are forked from one process that has imported the command line once (importing torch, timm and
# the plugins takes seconds): each child is a real process running ``run_benchmark.main`` on its own
# arguments and environment, killed by a real SIGKILL, reaped by its parent only when the test asks.
FORKER = r"""
import json, os, sys, time, traceback
import run_benchmark, attacks, defenses, benchmark.execute, leaderboard.cli  # noqa: F401  (shared imports)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "start":
        pid = os.fork()
        if pid == 0:
            os.environ.update(cmd["env"])
            fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 1
            try:
                code = run_benchmark.main(cmd["argv"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    else:  # wait: the exit code (negative: killed by that signal), or "running" once the timeout passes
        deadline = time.time() + cmd["timeout"]
        while True:
            done, status = os.waitpid(cmd["pid"], os.WNOHANG)
            if done or time.time() >= deadline:
                break
            time.sleep(0.05)
        print(os.waitstatus_to_exitcode(status) if done else "running", flush=True)
"""


class Runners:
    """Starts ``run`` commands as child processes of one forker process (see ``FORKER``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FORKER], cwd=ROOT, env=_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _ask(self, **cmd) -> str:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def start(self, preset: Path, out: Path, log: Path, kill_at: str | None = None) -> int:
        argv = ["run", "--preset", str(preset), "--out", str(out), "--device", "cpu", "--no-progress"]
        env = {"UEBENCH_TEST_KILL_AT": kill_at} if kill_at else {}
        return int(self._ask(op="start", argv=argv, env=env, log=str(log)))

    def wait(self, pid: int, timeout: float = 300) -> int | None:
        """The exit code of ``pid``; ``None`` if it still runs after ``timeout`` seconds."""
        got = self._ask(op="wait", pid=pid, timeout=timeout)
        return None if got == "running" else int(got)

    def run(self, preset: Path, out: Path, log: Path, kill_at: str | None = None) -> int:
        code = self.wait(self.start(preset, out, log, kill_at))
        assert code is not None, f"the run timed out: {log.read_text()[-2000:]}"
        return code

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runners():
    r = Runners()
    yield r
    r.close()


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("UEBENCH_TEST_KILL_AT", None)
    if kill_at:
        env["UEBENCH_TEST_KILL_AT"] = kill_at
    return env


def _rows(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "the store is corrupt after a kill"
        return con.execute("SELECT key, status FROM cells").fetchall()


def _check_after_kill(out: Path, before: set[str]) -> set[str]:
    """The store is intact, holds only finished cells, keeps every earlier one; every cache entry verifies."""
    rows = _rows(out / "results.sqlite")
    keys = {k for k, _ in rows}
    assert all(s == "ok" for _, s in rows), f"a kill left a failed or partial row: {rows}"
    assert before <= keys, f"a kill lost finished cells: {sorted(before - keys)}"
    for entry in (out / "cache").rglob("*.safetensors"):
        assert load_verified(entry) is not None, f"a kill left a corrupt cache entry visible: {entry}"
    return keys


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    """results.csv of an uninterrupted run of the grid (one thread, as the killed runs use)."""
    out = tmp_path_factory.mktemp("reference")
    (out / "crash.toml").write_text(GRID)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_grid(plan(load_preset(str(out / "crash.toml"))), out,
                           LocalExecutor(out / "cache", device=torch.device("cpu"), progress=False))
    finally:
        torch.set_num_threads(threads)
    assert not summary.failed and len(summary.ran) == 6, [r.error for r in summary.failed]
    return pd.read_csv(out / "results.csv")


def _final_run_matches(runners: Runners, preset: Path, out: Path, reference: pd.DataFrame, kills: int) -> None:
    """The rerun after the kills completes; every cell once in the store, results as uninterrupted, no lease."""
    log = out.parent / "final.log"
    assert runners.run(preset, out, log) == 0, log.read_text()[-2000:]
    rows = _rows(out / "results.sqlite")
    assert sorted(k for k, _ in rows) == sorted(reference["key"]), "every cell exactly once in the store"
    got = pd.read_csv(out / "results.csv")[COLUMNS]
    pd.testing.assert_frame_equal(got, reference[COLUMNS], check_dtype=False, obj=f"results after {kills} kills")
    with Store(out / "results.sqlite") as store:
        assert store.leases() == {}, f"leases left behind: {store.leases()}"


def test_kills_at_named_points_resume_to_the_uninterrupted_results(tmp_path, reference, runners):
    preset, out = tmp_path / "crash.toml", tmp_path / "out"
    preset.write_text(GRID)
    keys: set[str] = set()
    # each named point kills once; store_write:2 commits one record and dies inside the second one's transaction
    points = ("generate:1", "train_step:3", "cache_write:2", "store_write:2", "train_step:5", "generate:1")
    for i, point in enumerate(points):
        before, log = keys, tmp_path / f"run{i}.log"
        code = runners.run(preset, out, log, kill_at=point)
        assert code == -signal.SIGKILL, f"{point} was never reached (exit {code}): {log.read_text()[-1500:]}"
        keys = _check_after_kill(out, before)
        if point == "store_write:2":
            assert len(keys) == len(before) + 1, f"store_write:2 must keep exactly one new row, kept {keys - before}"
    _final_run_matches(runners, preset, out, reference, len(points))


def test_kills_at_random_moments_resume_to_the_uninterrupted_results(tmp_path, reference, runners):
    preset, out = tmp_path / "crash.toml", tmp_path / "out"
    preset.write_text(GRID)
    # the delays scale with how long an uninterrupted run takes on this machine (fixed seconds missed
    # the run on a fast CPU): start-up, data loading, generation, pretraining, training or writing
    whole = float("inf")
    for i in range(2):  # the faster of two: the first pays for what the forking process keeps warm
        started = time.monotonic()
        assert runners.run(preset, tmp_path / f"timed{i}", tmp_path / f"timed{i}.log") == 0, "a whole run failed"
        whole = min(whole, time.monotonic() - started)
    rng, kills, keys = random.Random(16), 0, set()
    for i in range(5):  # SIGKILL after a random delay
        log = tmp_path / f"random{i}.log"
        pid = runners.start(preset, out, log)
        code = runners.wait(pid, timeout=rng.uniform(0.1, 0.6) * whole)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            code = runners.wait(pid)
            kills += 1
        assert code in (0, -signal.SIGKILL), f"run {i} failed (exit {code}): {log.read_text()[-1500:]}"
        keys = _check_after_kill(out, keys)
    assert kills >= 3, f"only {kills} of 5 random kills landed before the run ended (a whole run: {whole:.2f} s)"
    _final_run_matches(runners, preset, out, reference, kills)


SHARED = dict(TINY, seeds=[0, 1])  # 6 cheap cells


def _toml(path: Path) -> Path:
    path.write_text('extends = "quick"\nname = "tiny"\n'
                    'defenses = ["clean", "random_noise", "random_noise:mode=class"]\n'
                    'attacks = ["scratch"]\nbackbones = ["resnet_tiny"]\nseeds = [0, 1]\n'
                    '[dataset]\ntrain_size = 60\ntest_size = 30\nsource_size = 24\n'
                    '[attack_protocol.scratch]\nepochs = 1\nbatch_size = 32\n')
    return path


def _cells_run(stderr: str) -> list[str]:
    return CELL_LINE.findall(stderr)


@pytest.mark.parametrize("kill_one", [False, True], ids=["both-finish", "one-killed"])
def test_two_runners_on_one_directory_compute_each_cell_once(tmp_path, runners, kill_one):
    preset, out = _toml(tmp_path / "tiny.toml"), tmp_path / "out"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    # with kill_one, the first runner dies in the middle of its second cell, holding that cell's lease
    first = runners.start(preset, out, logs[0], kill_at="train_step:3" if kill_one else None)
    second = runners.start(preset, out, logs[1])
    rc1, rc2 = runners.wait(first), runners.wait(second)
    err1, err2 = logs[0].read_text(), logs[1].read_text()
    assert rc2 == 0, err2[-2000:]
    assert rc1 == (-signal.SIGKILL if kill_one else 0), err1[-2000:]
    rows = _rows(out / "results.sqlite")
    assert len(rows) == 6 and all(s == "ok" for _, s in rows), f"every cell once, all ok: {rows}"
    ran1, ran2 = _cells_run(err1), _cells_run(err2)
    assert len(set(ran1)) == len(ran1) and len(set(ran2)) == len(ran2), f"a runner ran a cell twice: {ran1}, {ran2}"
    assert not set(ran1) & set(ran2), f"cells computed by both runners: {sorted(set(ran1) & set(ran2))}"
    assert len(ran1) + len(ran2) == 6, f"each of the 6 cells must be computed once: {ran1} + {ran2}"
    if kill_one:
        assert "taking over cell" in err2, "the survivor must take over the dead runner's lease"
    else:
        assert "6 cells:" in err1 and "6 cells:" in err2, "both runners must report the whole grid"
    with Store(out / "results.sqlite") as store:
        assert store.leases() == {}, f"leases left behind: {store.leases()}"
    assert len(pd.read_csv(out / "results.csv")) == 6, "results.csv must hold the 6 cells"


def _record(cell: Cell, status: str = "ok", finished: float | None = None) -> CellRecord:
    now = time.time() if finished is None else finished
    return CellRecord(key=cell.key, preset=cell.preset, dataset=cell.dataset.name, defense=cell.defense.label,
                      attack=cell.attack.label, backbone=cell.backbone, seed=cell.seed, status=status,
                      accuracy=50.0 if status == "ok" else None, train_accuracy=None, seconds=0.0,
                      defense_seconds=None, peak_memory_mb=None, error=None, config=cell.config(), metrics={},
                      environment={}, started_at=now, finished_at=now)


def test_a_lease_is_taken_over_only_when_its_owner_is_gone(tmp_path):
    since = time.time()
    with Store(tmp_path / "results.sqlite") as store:
        def lease(key: str, host: str, pid: int, expires: float) -> None:
            store._db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
                              (key, f"{host}:{pid}:x", host, pid, expires))

        here, later = socket.gethostname(), time.time() + 600
        lease("live", here, os.getpid(), later)
        lease("dead", here, 2**22 + 12345, later)  # above the default pid_max: no such process
        lease("expired", "another-host", 1, time.time() - 1)
        lease("remote", "another-host", 1, later)
        zombie = subprocess.Popen(["true"])  # exits at once; not reaped until wait(): a killed, unreaped runner
        time.sleep(0.3)
        lease("zombie", here, zombie.pid, later)
        got = {k: store.claim(k, "me", since=since) for k in ("live", "dead", "zombie", "expired", "remote", "free")}
        zombie.wait()
        assert got == {"live": Claim.LEASED, "dead": Claim.CLAIMED, "zombie": Claim.CLAIMED, "expired": Claim.CLAIMED,
                       "remote": Claim.LEASED, "free": Claim.CLAIMED}, got
        assert store.claim("free", "me", since=since) is Claim.CLAIMED, "an owner may claim its own lease again"
        cells = plan(preset_from_dict(dict(TINY)))
        assert store.claim(cells[0].key, "me", since=since) is Claim.CLAIMED
        store.put(_record(cells[0]), owner="me")
        store.put(_record(cells[1], "failed", finished=since - 10))
        store.put(_record(cells[2], "failed", finished=since + 1))
        assert store.claim(cells[0].key, "me", since=since) is Claim.FINISHED, "an ok cell is finished"
        assert store.claim(cells[1].key, "me", since=since) is Claim.CLAIMED, "a cell failed in an earlier run reruns"
        assert store.claim(cells[2].key, "me", since=since) is Claim.FINISHED, \
            "a cell another runner failed during this run is not computed again"
        assert cells[0].key not in store.leases(), "writing a record must drop its lease"
        store.put(_record(cells[0], "failed"))  # e.g. from a runner whose lease was taken over
        assert store.frame().set_index("key").loc[cells[0].key, "status"] == "ok", \
            "a failed record must not replace a finished one"
    keeper = LeaseKeeper(tmp_path / "results.sqlite", owner="keeper", seconds=0.5)
    with keeper, Store(tmp_path / "results.sqlite") as store:
        store.claim("k", "keeper", since=since, seconds=0.5)
        time.sleep(0.8)
        expires = store._db.execute("SELECT expires FROM leases WHERE key = 'k'").fetchone()[0]
        assert expires > time.time(), "a live runner's lease must be renewed"
    with Store(tmp_path / "results.sqlite") as store:
        assert "k" not in store.leases(), "a runner that stops must drop its leases"


class Recording(Executor):
    """An executor that checks each cell is leased (and no later one) when it receives it."""

    def __init__(self, store_path: Path, on_cell=None) -> None:
        self.store_path, self.seen, self.on_cell = store_path, [], on_cell

    def run(self, cells):
        with Store(self.store_path) as store:
            for cell in cells:
                mine = {k for k, o in store.leases().items() if not o.startswith("other")}
                assert mine == {cell.key}, f"only the cell about to run may be leased, got {mine}"
                self.seen.append(cell.key)
                if self.on_cell:
                    self.on_cell(store, len(self.seen))
                yield _record(cell)


def test_the_driver_claims_lazily_skips_cells_finished_elsewhere_and_waits_for_leased_ones(tmp_path, caplog):
    cells = sorted(plan(preset_from_dict(dict(SHARED))), key=lambda c: (c.seed, c.defense.label != "clean"))
    out = tmp_path / "out"
    with Store(out / "results.sqlite") as store:  # another live runner holds the first cell for a moment
        store._db.execute("INSERT INTO leases VALUES (?, 'other:1:x', ?, ?, ?)",
                          (cells[0].key, socket.gethostname(), os.getpid(), time.time() + 600))

    def other_runner(store: Store, n: int) -> None:
        if n == 1:  # meanwhile the other runner finishes a cell this one has not reached
            store.put(_record(cells[3]))

    def let_go() -> None:
        with Store(out / "results.sqlite") as store:
            store.release("other:1:x")

    timer = threading.Timer(0.5, let_go)
    timer.start()
    executor = Recording(out / "results.sqlite", other_runner)
    with caplog.at_level(logging.INFO, logger="benchmark.execute"):
        summary = run_grid(cells, out, executor, poll=0.05)
    timer.join()
    assert executor.seen == [c.key for c in cells[1:] if c is not cells[3]] + [cells[0].key], \
        "the leased cell must run last, once its owner let it go; the one finished elsewhere never"
    assert "waiting for 1 cells leased by another runner" in caplog.text, "the wait must be reported"
    assert summary.skipped == 1 and len(summary.ran) == 5, summary
