"""The Ray executor: one Ray task per cell, on a local Ray instance or a cluster (``--executor ray``).

Optional: it needs ``pip install 'uebench[ray]'`` and is imported only when asked for, so the rest of
uebench never imports ray. Each task runs ``LocalExecutor.run_cell`` in a Ray worker on the shared cache
folder and returns the ``CellRecord`` to the driver, which alone writes the store (``run_grid``). A worker
keeps its runner between tasks, so the data sets it loaded and the last protected set stay in its memory.

- Caches: every worker reads and writes the same cache folder (a local path for a local instance; on a
  cluster it must be a file system every node mounts). An entry is built under its ``flock``
  (``benchmark.cache``), so zoo weights two workers need at once are built by one and read by the other.
- Protected sets are built once: the first cell of a protected set not yet cached runs alone; its
  siblings (the other attacks and backbones of that defense and seed) wait in the driver, holding no
  worker, and are dispatched once it finishes, to load the set from the cache. Meanwhile the driver
  takes further cells, so other protected sets are built in parallel.
- Leases stay meaningful: at most ``max_in_flight`` cells run and at most ``WAIT_PER_SLOT`` times as many
  wait, and cells are taken from the driver's stream only while a slot is free (each is leased when
  taken). So the driver looks past the siblings of a set being built (a grid's cells of one protected
  set come one after another) to a cell it can start now, and no slot idles while a set is built.
- A worker that dies (killed, out of memory, a segfault) is retried ``max_retries`` times in a new
  worker; a cell whose task still dies is recorded as failed with the reason, never lost. A plugin's
  own exception is a failed record computed in the worker, as with ``LocalExecutor``.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from benchmark.cache import Cache
from benchmark.child import check_timeout
from benchmark.errors import UEBenchError
from benchmark.execute import Executor, LocalExecutor, log_certificate
from benchmark.plan import Cell
from benchmark.store import CellRecord

log = logging.getLogger(__name__)
WAIT_PER_SLOT = 16  # cells held back per slot at most: a grid has one protected set per (defense, seed) for
# its attacks x backbones (10 in quick), and each slot may be building one
PLUGIN_FILE_MODULES = "uebench_plugin_"  # ``load_plugin_file`` names its modules so; workers cannot import them
_RUNNER: dict[tuple[str, str, float | None], LocalExecutor] = {}  # in each worker: its runner, kept between tasks


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UEBenchError("--executor ray needs Ray: pip install 'uebench[ray]'") from exc
    return ray


def run_cell_task(cell: Cell, cache_dir: str, device_type: str, cell_timeout: float | None,
                  log_level: int = logging.WARNING) -> CellRecord:
    """A Ray task: the cell's record, computed by this worker's runner (Ray assigns the GPU: ``cuda``).
    The worker logs at the driver's ``log_level`` to its stderr, which Ray shows in the driver's output."""
    key = (cache_dir, device_type, cell_timeout)
    if key not in _RUNNER:  # a new run's first task in this worker: one runner (and its data) at a time
        import attacks  # noqa: F401  built-in plugins register on import, as in the driver
        import defenses  # noqa: F401
        from benchmark.runtime import keep_freed_memory, log_to_stderr

        keep_freed_memory()  # as the command line does
        log_to_stderr(log_level)
        _RUNNER.clear()
        _RUNNER[key] = LocalExecutor(cache_dir, device=torch.device(device_type), progress=False,
                                     cell_timeout=cell_timeout)
    return _RUNNER[key].run_cell(cell)


class RayExecutor(Executor):
    """Runs each cell as a Ray task; see the module docstring.

    ``address``: a running cluster (``ray.init(address=...)``, disconnected at the end); else a local instance
    of ``num_cpus`` CPUs (default: all), without dashboard, shut down at the end; a Ray session the caller
    started is used and left running. A cell asks for one GPU when ``device`` is
    CUDA, else for ``cpus_per_cell`` CPUs. ``max_in_flight`` (default: as many cells as the cluster's
    CPUs or GPUs hold at once) bounds the running cells. ``cell_timeout`` is applied in the worker as by
    ``LocalExecutor`` (the cell runs in a child of the worker).
    """

    def __init__(self, cache_dir: str | Path, *, device: torch.device, address: str | None = None,
                 num_cpus: int | None = None, cpus_per_cell: float = 1.0, max_in_flight: int | None = None,
                 max_retries: int = 2, cell_timeout: float | None = None, progress: bool = True) -> None:
        for name, value, low in (("num_cpus", num_cpus, 1), ("max_in_flight", max_in_flight, 1),
                                 ("max_retries", max_retries, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise UEBenchError(f"{name}={value!r} must be an integer >= {low}")
        if isinstance(cpus_per_cell, bool) or not isinstance(cpus_per_cell, (int, float)) or not cpus_per_cell > 0:
            raise UEBenchError(f"cpus_per_cell={cpus_per_cell!r} must be a number of CPUs > 0")
        if address is not None and num_cpus is not None:
            raise UEBenchError("num_cpus sizes a local Ray instance; a cluster given by its address has its own")
        self.cache_dir = str(Path(cache_dir).resolve())
        self.device, self.address, self.num_cpus = device, address, num_cpus
        self.cpus_per_cell, self.max_in_flight, self.max_retries = float(cpus_per_cell), max_in_flight, max_retries
        self.cell_timeout = check_timeout(cell_timeout, "cell_timeout")
        self.progress = progress
        import_ray()  # not installed: said before any cell is planned or leased
        # the driver's own runner: loads each data set once (a bad one is the user's error, before any task)
        # and writes the record of a cell whose task died
        self._driver = LocalExecutor(cache_dir, device=torch.device("cpu"), progress=False)
        self.cache = Cache(self.cache_dir)  # the driver's plan log reads what it holds
        self._told: set[str] = set()  # protected sets whose certificate the driver has logged

    def _start(self, ray: Any) -> bool:
        """Connect to the cluster or start a local instance; True if this executor did (and so ends it)."""
        if ray.is_initialized():  # the caller's own Ray session
            return False
        if self.address is not None:
            ray.init(address=self.address, configure_logging=False)
            return True
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local instance reports nothing
        ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, include_dashboard=False, configure_logging=False)
        return True

    def _slots(self, ray: Any) -> int:
        """How many cells may run at once: ``max_in_flight``, else what the cluster holds."""
        resources = ray.cluster_resources()
        if self.device.type == "cuda" and not resources.get("GPU"):
            raise UEBenchError(f"--device {self.device} asks for a GPU per cell, but the Ray cluster has none "
                               f"({resources.get('CPU', 0):g} CPUs)")
        if self.max_in_flight is not None:
            return self.max_in_flight
        if self.device.type == "cuda":
            return max(1, int(resources["GPU"]))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_cell))

    def prepare(self, cells: Sequence[Cell]) -> None:
        """The driver loads each data set once: a bad one is the user's error, before Ray starts."""
        self._driver.prepare(cells)

    def run(self, cells: Iterable[Cell]) -> Iterator[CellRecord]:
        stream = iter(cells)
        first = next(stream, None)  # Ray starts only when there is a cell to run
        if first is None:
            return
        self._driver.splits(first.dataset)  # a bad data set is the user's error, before Ray starts
        ray = import_ray()
        ours = self._start(ray)
        dispatch = None
        try:
            for name, module in list(sys.modules.items()):  # plugin files travel with the cells, by value
                if name.startswith(PLUGIN_FILE_MODULES):
                    ray.cloudpickle.register_pickle_by_value(module)
            resources = {"num_gpus": 1} if self.device.type == "cuda" else {"num_cpus": self.cpus_per_cell}
            task = ray.remote(run_cell_task).options(max_retries=self.max_retries, **resources)
            level = logging.getLogger().getEffectiveLevel()  # the workers log as the driver does
            dispatch = _Dispatch(lambda cell: task.remote(cell, self.cache_dir, self.device.type, self.cell_timeout,
                                                          level),
                                 self.cache, self._slots(ray))
            stream, exhausted = itertools.chain([first], stream), False
            while True:
                dispatch.release()
                while not exhausted and dispatch.can_take():
                    cell = next(stream, None)  # lazily: the driver leases each cell as it is taken
                    if cell is None:
                        exhausted = True
                    else:
                        self._driver.splits(cell.dataset)
                        dispatch.take(cell)
                if not dispatch.running:
                    break
                (ref,), _ = ray.wait(list(dispatch.running), num_returns=1)
                cell, started, start = dispatch.finish(ref)
                yield self._result(ray, ref, cell, started, start)  # the driver's bar counts it
        finally:
            for ref in dispatch.running if dispatch else ():  # the driver stopped early: stop what it gave out
                ray.cancel(ref, force=True)
            if ours:
                ray.shutdown()

    def _result(self, ray: Any, ref: Any, cell: Cell, started: float, start: float) -> CellRecord:
        """The task's record; a failed one when the task raised, or its worker died more often than it may
        be retried (killed, out of memory, a segfault, its node lost). The first record of each protected
        set logs its certificate's verdict here too, in the driver's own log: the worker that built the set
        logged it to its stderr, which reaches the driver's output only as Ray's forwarded text."""
        try:
            record = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # raised outside the plugins' calls (those fail in the record)
            error = f"{type(exc.cause).__name__}: {exc.cause}"
        except ray.exceptions.RayError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            error = (f"its Ray worker died in each of {self.max_retries + 1} attempts: {type(exc).__name__}: "
                     f"{lines[0] if lines else ''}")
        else:
            key = cell.protected_key()
            perturbation = (record.metrics or {}).get("perturbation")
            if perturbation is not None and key not in self._told:
                self._told.add(key)
                log_certificate(cell.defense.label, cell.seed, perturbation.get("certificate"))
            return record
        log.error("cell %s failed: %s", cell.describe(), error)
        return self._driver.failed(cell, error, started=started, start=start)


class _Dispatch:
    """The cells given to Ray and those held back until their protected set is built.

    The first cell of a protected set not yet in the cache builds it; its siblings wait (in order) and
    are submitted once it finishes, ok or not (if it failed, the first sibling submitted tries again).
    """

    def __init__(self, submit: Callable[[Cell], Any], cache: Cache, slots: int) -> None:
        self.submit, self.cache, self.slots = submit, cache, slots
        self.running: dict[Any, tuple[Cell, float, float]] = {}  # task -> (cell, started, perf counter start)
        self.waiting: list[Cell] = []
        self.building: dict[Any, str] = {}  # task -> the protected set it builds

    def can_take(self) -> bool:
        """A free slot, and room to hold back one more cell should it be the sibling of a set being built."""
        return len(self.running) < self.slots and len(self.waiting) < WAIT_PER_SLOT * self.slots

    def take(self, cell: Cell) -> None:
        if cell.protected_key() in self.building.values():
            self.waiting.append(cell)
        else:
            self._submit(cell)

    def release(self) -> None:
        """Submit the waiting cells whose protected set is no longer being built, while slots are free."""
        for cell in list(self.waiting):
            if len(self.running) < self.slots and cell.protected_key() not in self.building.values():
                self.waiting.remove(cell)
                self._submit(cell)

    def finish(self, ref: Any) -> tuple[Cell, float, float]:
        self.building.pop(ref, None)
        return self.running.pop(ref)

    def _submit(self, cell: Cell) -> None:
        ref = self.submit(cell)
        self.running[ref] = (cell, time.time(), time.perf_counter())
        key = cell.protected_key()
        if not self.cache.path("protected", key).is_file():
            self.building[ref] = key
