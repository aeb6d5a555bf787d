"""Execution: an ``Executor`` turns planned cells into ``CellRecord``s; the driver writes them.

``Executor`` is the seam: ``LocalExecutor`` runs cells one at a time (in a child under a time limit); another
executor (e.g. one task per cell on a cluster) is a subclass with its own ``run``. Executors never
touch the store: ``run_grid``, the driver, hands the executor a lazy stream of cells, each claimed
(leased in the store) just before it runs, so runners sharing a results directory never compute a
cell twice; it writes each record as it arrives (one transaction per cell, so a killed run resumes),
then the CSVs. One failing cell is recorded as failed and the others go on. Protected data sets are
cached by (data set, defense config, seed) and shared by every attack and backbone.
"""

from __future__ import annotations

import logging
import platform
import resource
import subprocess
import time
import traceback
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from benchmark import __version__
from benchmark.cache import Cache
from benchmark.child import ChildFailed, call_in_child, check_timeout
from benchmark.config import stable_hash
from benchmark.data import DatasetConfig, ImageSet, Splits, load_dataset
from benchmark.errors import UEBenchError
from benchmark.isolation import Handout
from benchmark.metrics import perturbation_quality
from benchmark.phases import PHASES
from benchmark.plan import Cell
from benchmark.plugins import Certificate, Context, perturbation_stats
from benchmark.progress import CostBar, describe_plan, expected_seconds
from benchmark.report import write_reports
from benchmark.store import LEASE_SECONDS, CellRecord, Claim, LeaseKeeper, Store
from benchmark.training import evaluate
from benchmark.zoo import Zoo

log = logging.getLogger(__name__)
T = TypeVar("T")


class Executor:
    """Runs cells and returns their records; it never writes the store (the driver does). A subclass
    implements ``run``, and may set ``cache`` (the plan log then says what it holds) and ``progress``
    (the driver's bar is shown), and override ``prepare``."""

    cache: Cache | None = None
    progress: bool = False

    def prepare(self, cells: Sequence[Cell]) -> None:
        """Called with the cells to run before the progress bar starts and any cell is claimed: load
        what they need here, so that a user's error (a missing data set) is said first."""

    def run(self, cells: Iterable[Cell]) -> Iterator[CellRecord]:
        """One record per cell (ok or failed), yielded as each cell finishes, in any order. ``cells`` is
        consumed lazily: the driver claims each cell as the executor takes it."""
        raise NotImplementedError


def cpu() -> dict[str, str]:
    """The CPU a cell ran on: its model name and the instruction set torch's kernels dispatch to. Float
    results depend on both (``docs/methods.md``, "Seeds and noise"), so every cell records them."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "model name"):
                fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_vendor": fields.get("vendor_id", "unknown"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def environment(device: torch.device) -> dict[str, Any]:
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"uebench": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "git_commit": commit, "threads": torch.get_num_threads(), **cpu()}


def cell_metadata(cell: Cell) -> dict[str, Any]:
    """What the leaderboard shows of a cell's plugins and preset, recorded when the cell runs."""
    return {"defense": cell.defense.plugin.metadata(), "attack": cell.attack.plugin.metadata(),
            "preset": cell.preset_info.to_dict(), "surrogate_threat_model": cell.surrogate_threat_model}


class LocalExecutor(Executor):
    """Runs cells one at a time; data sets and protected sets are built once, plugins get copies.

    With ``cell_timeout`` (seconds) each cell runs in a forked child (``benchmark.child``) and fails
    with "timed out after N s" or "crashed: killed by signal 11 (SIGSEGV)" while the grid goes on;
    protected sets and zoo weights it builds reach later cells through the disk cache. Without one
    (the default) cells run in this process.
    """

    def __init__(self, cache_dir: str | Path, *, device: torch.device, progress: bool = True,
                 cell_timeout: float | None = None) -> None:
        self.device = device
        self.cache = Cache(cache_dir)
        self.progress = progress
        self.cell_timeout = check_timeout(cell_timeout, "cell_timeout")
        self._splits: dict[str, Splits] = {}
        self._protected: dict[str, tuple[ImageSet, dict, float]] = {}
        self._given_up: dict[str, str] = {}  # protected key -> why its generation failed in a child
        self._env = environment(device)

    def splits(self, cfg: DatasetConfig) -> Splits:
        key = stable_hash(cfg.key())
        if key not in self._splits:
            log.info("loading data set %s", cfg.name)
            with PHASES.timed("data"):
                self._splits[key] = load_dataset(cfg)
        return self._splits[key]

    def context(self, cell: Cell, handout: Handout | None = None, *, defense: bool = False) -> Context:
        """A plugin's context; its source pool (also the zoo's) is a copy recorded in ``handout``. A defense
        under the ``transfer`` threat model gets the transfer zoo (``Zoo.transfer``), the victims never."""
        splits = self.splits(cell.dataset)
        handout = handout or Handout(f"defense {cell.defense.label!r}")
        source = None if splits.source is None else handout.copy(splits.source, "the source pool")
        zoo = Zoo(self.cache.root, pool=source, pool_key={**cell.dataset.source_key(), "split": "source"},
                  config=cell.zoo, device=self.device, progress=self.progress)
        if defense and cell.surrogate_threat_model == "transfer":
            zoo = zoo.transfer()
        return Context(device=self.device, seed=cell.seed, cache_dir=self.cache.root, progress=self.progress,
                       dataset_key=cell.dataset.key(), source=source, zoo=zoo)

    def protected(self, cell: Cell) -> tuple[ImageSet, dict, float]:
        """The protected training set of a cell (memory, then disk cache, then the defense)."""
        key = cell.protected_key()
        if key in self._protected:
            img, meta, _ = self._protected[key]
            return img, meta, 0.0
        train = self.splits(cell.dataset).train
        seconds = 0.0

        def build() -> tuple[dict[str, torch.Tensor], dict]:
            nonlocal seconds
            start = time.perf_counter()
            with PHASES.timed(f"generate {cell.defense.label}"), Handout(f"defense {cell.defense.label!r}") as handout:
                result = cell.defense.plugin.perturb(handout.copy(train, "the clean training"),
                                                     self.context(cell, handout, defense=True))
            seconds = time.perf_counter() - start
            out, cert = result.data, result.certificate
            stats = perturbation_stats(train.images, out.images)
            meta = {"defense": cell.defense.label, "seconds": seconds, **asdict(stats),
                    **visibility(train.images, out.images),
                    "certificate": None if cert is None else cert.to_dict()}
            return {"images": out.images, "labels": out.labels}, meta

        # a set cached before certificates existed is generated again: its certificate cannot be measured later
        tensors, meta, hit = self.cache.get_or_build("protected", key, build, accept=lambda m: "certificate" in m)
        if not torch.equal(tensors["labels"], train.labels) or tensors["images"].shape != train.images.shape:
            raise UEBenchError(f"cached protected set {key} does not match the data set; delete it")
        log_certificate(cell.defense.label, cell.seed, meta["certificate"])
        img = train.with_images(tensors["images"], name=f"{train.name}+{cell.defense.label}")
        self._protected = {key: (img, meta, seconds)}  # keep one in memory: cells are ordered by defense
        return img, meta, seconds

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` under the cell time limit: in a forked child when there is one, else here."""
        return fn() if self.cell_timeout is None else call_in_child(fn, self.cell_timeout)

    def run_cell(self, cell: Cell) -> CellRecord:
        """The cell's record; with a time limit, computed in a child that the limit or a crash may end."""
        if self.cell_timeout is None:
            return self._run_cell(cell)
        started, start = time.time(), time.perf_counter()
        key = cell.protected_key()
        error = self._given_up.get(key)
        if error is None:
            try:
                return self.call(lambda: self._run_cell(cell))
            except ChildFailed as exc:  # timed out or crashed (a plugin's error is already a failed record)
                error = str(exc)
            if not self.cache.path("protected", key).is_file():  # it ended before its protected set was stored
                error += f" (defense {cell.defense.label!r} did not finish its protected set)"
                self._given_up[key] = error + "; not tried again in this run"
        log.error("cell %s failed: %s", cell.describe(), error)
        return self.failed(cell, error, started=started, start=start)

    def failed(self, cell: Cell, error: str, *, started: float, start: float) -> CellRecord:
        """The record of a cell that did not return one (its child or its worker died): ``error`` says why;
        ``started`` is its wall-clock start, ``start`` its ``perf_counter`` start."""
        return self._record(cell, status="failed", error=error, started=started, start=start,
                            metrics=self._cell_metrics(cell))

    def _cell_metrics(self, cell: Cell) -> dict[str, Any]:
        """What every record carries, failed or not: the plugins' metadata and the class count."""
        return {"metadata": cell_metadata(cell), "num_classes": self.splits(cell.dataset).train.num_classes}

    def _run_cell(self, cell: Cell) -> CellRecord:
        started = time.time()
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        status, acc, train_acc, error, defense_seconds = "ok", None, None, None, None
        metrics: dict[str, Any] = {}
        try:
            metrics.update(self._cell_metrics(cell))
            splits = self.splits(cell.dataset)
            protected, meta, defense_seconds = self.protected(cell)
            with PHASES.timed(f"attack {cell.attack.label} @ {cell.backbone}"), \
                    Handout(f"attack {cell.attack.label!r}") as handout:
                fitted = cell.attack.plugin.fit(handout.copy(protected, "the protected training"), cell.backbone,
                                                self.context(cell, handout))
            with PHASES.timed("evaluate"):
                acc = evaluate(fitted.model, splits.test.images, splits.test.labels, self.device)
            train_acc = fitted.train_accuracy
            metrics.update(attack={"epochs": fitted.epochs, "trainable_parameters": fitted.trainable_parameters},
                           perturbation=meta)
        except Exception as exc:  # one failing cell must not stop the grid; it is recorded with its error
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("cell %s failed: %s", cell.describe(), error)
            log.debug("%s", traceback.format_exc())
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, MiB
        return self._record(cell, status=status, error=error, started=started, start=start, metrics=metrics,
                            accuracy=acc, train_accuracy=train_acc, defense_seconds=defense_seconds, peak=peak)

    def _record(self, cell: Cell, *, status: str, error: str | None, started: float, start: float,
                metrics: dict[str, Any], accuracy: float | None = None, train_accuracy: float | None = None,
                defense_seconds: float | None = None, peak: float | None = None) -> CellRecord:
        return CellRecord(
            key=cell.key, preset=cell.preset, dataset=cell.dataset.name, defense=cell.defense.label,
            attack=cell.attack.label, backbone=cell.backbone, seed=cell.seed, status=status, accuracy=accuracy,
            train_accuracy=train_accuracy, seconds=time.perf_counter() - start, defense_seconds=defense_seconds,
            peak_memory_mb=peak, error=error, config=cell.config(), metrics=metrics, environment=self._env,
            started_at=started, finished_at=time.time())

    def prepare(self, cells: Sequence[Cell]) -> None:
        """Load the data sets of these cells: a missing or unknown one is the user's error, said before
        the progress bar starts and before any cell is claimed."""
        for cfg in {stable_hash(c.dataset.key()): c.dataset for c in cells}.values():
            self.splits(cfg)

    def run(self, cells: Iterable[Cell]) -> Iterator[CellRecord]:
        for cell in cells:  # lazily: the driver claims each cell as it is taken
            self.splits(cell.dataset)  # a missing or unknown data set is the user's error, not a failed cell
            yield self.run_cell(cell)


@dataclass(frozen=True)
class RunSummary:
    planned: int
    skipped: int
    ran: list[CellRecord]
    keys: list[str]

    @property
    def failed(self) -> list[CellRecord]:
        return [r for r in self.ran if r.status != "ok"]


class Claims:
    """The cells a runner computes, claimed one at a time as the executor asks for the next.

    A cell finished meanwhile (by another runner) is skipped; one leased by another live runner is
    set aside, and once the rest are done the runner waits for it: it is taken over if its runner
    dies, and never silently left out. ``len`` is the number still to run when the stream starts.
    """

    def __init__(self, cells: Sequence[Cell], store: Store, owner: str, *, since: float, poll: float,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.cells, self.store, self.owner, self.since = list(cells), store, owner, since
        self.poll, self.lease_seconds = poll, lease_seconds

    def __len__(self) -> int:
        return len(self.cells)

    def __iter__(self) -> Iterator[Cell]:
        pending, reported = self.cells, 0
        while pending:
            leased: list[Cell] = []
            for cell in pending:  # a generator: each cell is claimed when the executor asks for it
                got = self.store.claim(cell.key, self.owner, since=self.since, seconds=self.lease_seconds)
                if got is Claim.CLAIMED:
                    yield cell
                elif got is Claim.LEASED:
                    leased.append(cell)
                else:
                    log.info("cell %s was finished by another runner", cell.describe())
            if leased and len(leased) != reported:  # said once per change, not at every poll
                shown = ", ".join(c.describe() for c in leased[:3]) + (", ..." if len(leased) > 3 else "")
                log.info("waiting for %d cells leased by another runner: %s", len(leased), shown)
                reported = len(leased)
            if leased:
                time.sleep(self.poll)
            pending = leased


def run_grid(cells: Sequence[Cell], out_dir: str | Path, executor: Executor, *, poll: float = 5.0,
             lease_seconds: float = LEASE_SECONDS, progress: bool | None = None) -> RunSummary:
    """Run every cell not already finished in ``OUT/results.sqlite``; write ``results.csv`` and
    ``perturbations.csv``. The driver alone writes the store, one record at a time. Several runners may
    share ``out_dir``: each cell is leased to one of them while it runs (see ``benchmark.store``);
    cells leased by another live runner are waited for, polling every ``poll`` seconds.

    It first logs the plan (cells finished and to run, protected sets cached, expected minutes); its
    progress bar (``progress``; default: the executor's ``progress``) weighs each cell by its expected
    seconds (``benchmark.progress``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(out_dir / "results.sqlite")
    try:
        since = time.time()
        done = store.finished_keys()
        todo = [c for c in cells if c.key not in done]
        todo.sort(key=lambda c: (c.seed, c.defense.label != "clean"))  # stable: grouped by defense
        estimate = expected_seconds(todo, store.rows(), executor.cache)
        for line in describe_plan(cells, todo, executor.cache, estimate).splitlines():
            log.info("%s", line)
        ran: list[CellRecord] = []
        if todo:
            executor.prepare(todo)
        bar = CostBar(estimate, bool(todo) and (executor.progress if progress is None else progress))
        with LeaseKeeper(store.path, seconds=lease_seconds) as keeper, closing(bar):
            claims = Claims(todo, store, keeper.owner, since=since, poll=poll, lease_seconds=lease_seconds)
            for rec in executor.run(claims):
                store.put(rec, owner=keeper.owner)
                ran.append(rec)
                bar.finished(rec.key, f"{rec.defense} / {rec.attack} / {rec.backbone}")
                if rec.status == "ok":
                    log.info("cell %s / %s / %s / seed %d: %.1f%% (train %s) in %.0fs", rec.defense, rec.attack,
                             rec.backbone, rec.seed, rec.accuracy,
                             "n/a" if rec.train_accuracy is None else f"{rec.train_accuracy:.1f}%", rec.seconds)
        write_reports(store, out_dir)
        return RunSummary(planned=len(cells), skipped=len(cells) - len(ran), ran=ran, keys=[c.key for c in cells])
    finally:
        store.close()


def log_certificate(defense: str, seed: int, cert: dict[str, Any] | None) -> None:
    """The verdict of a protected set's certificate, once per protected set (a failure is a warning)."""
    if cert is None:
        log.info("%s (seed %d): no certificate (the defense has no objective it reports)", defense, seed)
        return
    c = Certificate.from_dict(cert)
    if c.passed:
        log.info("%s (seed %d): certificate %s", defense, seed, c.describe())
    else:
        log.warning("%s (seed %d): certificate failed: %s; the cells still run; the leaderboard shows it, unranked",
                    defense, seed, c.describe())


def visibility(clean: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM of a protected set (its size is in ``perturbation_stats``)."""
    quality = perturbation_quality(clean, protected)
    return {"psnr": quality["psnr"], "ssim": quality["ssim"]}
