"""The runner: plans the cross product of cells, skips finished ones, runs the rest, writes results.

A cell is one (dataset, defense, attack, backbone, seed). Its key is a hash of the fully resolved
configs plus the protocol version: change any field and the cell is recomputed, change nothing and
it is reused. Protected data sets are cached by (data set, defense config, seed) and shared by every
attack and backbone. One failing cell is recorded as failed and the others go on.
"""

from __future__ import annotations

import logging
import platform
import resource
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from benchmark import PROTOCOL_VERSION, __version__
from benchmark.cache import Cache
from benchmark.config import Configured, configure, stable_hash
from benchmark.data import DatasetConfig, ImageSet, Splits, load_dataset
from benchmark.errors import UEBenchError
from benchmark.models import get_spec
from benchmark.metrics import perturbation_quality
from benchmark.plugins import Certificate, Context, perturbation_stats
from benchmark.presets import Preset
from benchmark.registry import ATTACKS, DEFENSES
from benchmark.store import CellRecord, Store
from benchmark.training import evaluate
from benchmark.zoo import PretrainConfig, Zoo, pretrain_config

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["dataset", "defense", "attack", "backbone", "seed", "status", "accuracy", "clean_accuracy",
                  "train_accuracy", "seconds", "defense_seconds", "error", "preset", "key"]


@dataclass(frozen=True)
class Cell:
    preset: str
    dataset: DatasetConfig
    defense: Configured
    attack: Configured
    backbone: str
    seed: int
    zoo: PretrainConfig = PretrainConfig()

    def config(self) -> dict[str, Any]:
        defense, attack = self.defense.config(), self.attack.config()
        return {"dataset": self.dataset.key(), "defense": defense, "attack": attack,
                "backbone": get_spec(self.backbone).key(), "seed": self.seed,
                "zoo": zoo_part(self.zoo, defense, attack), "protocol_version": PROTOCOL_VERSION}

    @property
    def key(self) -> str:
        return stable_hash(self.config(), 24)

    def describe(self) -> str:
        return f"{self.defense.label} / {self.attack.label} / {self.backbone} / seed {self.seed}"


def zoo_part(zoo: PretrainConfig, *configs: dict[str, Any]) -> dict[str, Any]:
    """The part of the zoo recipe that plugins with these configs can depend on: the supervised
    recipe always (surrogates and most paradigms use it), the semantic-focused one only when a config
    names the ``sf`` source. A change to the ``sf`` recipe then reruns only the cells that use it."""
    full = asdict(zoo)
    if any("sf" in _values(c) for c in configs):
        return full
    return {"supervised": full["supervised"], "seed": full["seed"]}


def _values(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _values(x)]
    if isinstance(obj, (list, tuple)):
        return [v for x in obj for v in _values(x)]
    return [obj]


def plan(preset: Preset, *, dataset: DatasetConfig | None = None, defenses: Sequence[str] | None = None,
         attacks: Sequence[str] | None = None, backbones: Sequence[str] | None = None,
         seeds: Sequence[int] | None = None) -> list[Cell]:
    """The cross product, with ``clean`` always included as the reference."""
    ds = dataset or preset.dataset
    defs = [configure(DEFENSES, s, preset.defense_protocol) for s in (defenses or preset.defenses)]
    if not any(d.label == "clean" for d in defs):
        defs.insert(0, configure(DEFENSES, "clean", preset.defense_protocol))
    bbs = list(backbones or preset.backbones)
    for b in bbs:
        get_spec(b)
    atk_specs = list(attacks or preset.attacks)
    # an attack's protocol may differ per backbone (``attack_protocol["scratch@vit_tiny"]``)
    atks = {b: [configure(ATTACKS, s, preset.attack_protocol, backbone=b) for s in atk_specs] for b in bbs}
    for group, kind in ((defs, "defense"), (atks[bbs[0]] if bbs else [], "attack")):
        labels = [c.label for c in group]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise UEBenchError(f"{kind} {dupes[0]!r} is listed twice")
    zoo = pretrain_config(preset.zoo)
    return [Cell(preset.name, ds, d, atks[b][i], b, s, zoo)
            for s in (seeds or preset.seeds) for d in defs for i in range(len(atk_specs)) for b in bbs]


def environment(device: torch.device) -> dict[str, Any]:
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"uebench": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "git_commit": commit, "threads": torch.get_num_threads()}


class Runner:
    """Runs cells in this process, one at a time (the local executor)."""

    def __init__(self, out_dir: str | Path, *, device: torch.device, cache_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.cache = Cache(cache_dir or self.out_dir / "cache")
        self.progress = progress
        self._splits: dict[str, Splits] = {}
        self._protected: dict[str, tuple[ImageSet, dict, float]] = {}
        self._env = environment(device)

    def splits(self, cfg: DatasetConfig) -> Splits:
        key = stable_hash(cfg.key())
        if key not in self._splits:
            log.info("loading data set %s", cfg.name)
            self._splits[key] = load_dataset(cfg)
        return self._splits[key]

    def protected(self, cell: Cell) -> tuple[ImageSet, dict, float]:
        """The protected training set of a cell (memory, then disk cache, then the defense)."""
        defense = cell.defense.config()
        key = stable_hash({"dataset": cell.dataset.key(), "defense": defense, "seed": cell.seed,
                           "zoo": zoo_part(cell.zoo, defense), "protocol_version": PROTOCOL_VERSION})
        if key in self._protected:
            img, meta, _ = self._protected[key]
            return img, meta, 0.0
        splits = self.splits(cell.dataset)
        train = splits.train
        ctx = self.context(cell, splits)
        seconds = 0.0

        def build() -> tuple[dict[str, torch.Tensor], dict]:
            nonlocal seconds
            start = time.perf_counter()
            result = cell.defense.plugin.perturb(train, ctx)
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

    def zoo(self, cell: Cell, splits: Splits) -> Zoo:
        return Zoo(self.cache.root, pool=splits.source, pool_key={**cell.dataset.key(), "split": "source"},
                   config=cell.zoo, device=self.device, progress=self.progress)

    def context(self, cell: Cell, splits: Splits) -> Context:
        return Context(device=self.device, seed=cell.seed, cache_dir=self.cache.root, progress=self.progress,
                       dataset_key=cell.dataset.key(), source=splits.source, zoo=self.zoo(cell, splits))

    def run_cell(self, cell: Cell) -> CellRecord:
        started = time.time()
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        status, acc, train_acc, error, defense_seconds, metrics = "ok", None, None, None, None, {}
        try:
            protected, meta, defense_seconds = self.protected(cell)
            splits = self.splits(cell.dataset)
            ctx = self.context(cell, splits)
            fitted = cell.attack.plugin.fit(protected, cell.backbone, ctx)
            acc = evaluate(fitted.model, splits.test.images, splits.test.labels, self.device)
            train_acc = fitted.train_accuracy
            metrics = {"attack": {"epochs": fitted.epochs, "trainable_parameters": fitted.trainable_parameters},
                       "perturbation": meta, "num_classes": protected.num_classes}
        except Exception as exc:  # one failing cell must not stop the grid; it is recorded with its error
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("cell %s failed: %s", cell.describe(), error)
            log.debug("%s", traceback.format_exc())
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, MiB
        return CellRecord(
            key=cell.key, preset=cell.preset, dataset=cell.dataset.name, defense=cell.defense.label,
            attack=cell.attack.label, backbone=cell.backbone, seed=cell.seed, status=status, accuracy=acc,
            train_accuracy=train_acc, seconds=time.perf_counter() - start, defense_seconds=defense_seconds,
            peak_memory_mb=peak, error=error, config=cell.config(), metrics=metrics, environment=self._env,
            started_at=started, finished_at=time.time())

    def run(self, cells: Sequence[Cell]) -> RunSummary:
        """Run every cell not already finished in the store; write ``results.csv``."""
        store = Store(self.out_dir / "results.sqlite")
        try:
            done = store.finished_keys()
            todo = [c for c in cells if c.key not in done]
            todo.sort(key=lambda c: (c.seed, c.defense.label != "clean"))  # stable: grouped by defense
            log.info("%d cells planned, %d finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
            for cfg in {stable_hash(c.dataset.key()): c.dataset for c in todo}.values():
                self.splits(cfg)  # a missing or unknown data set is the user's error, not a failed cell
            ran: list[CellRecord] = []
            bar = tqdm(todo, desc="cells", unit="cell", disable=not self.progress)
            for cell in bar:
                bar.set_postfix_str(cell.describe())
                rec = self.run_cell(cell)
                store.put(rec)
                ran.append(rec)
                if rec.status == "ok":
                    log.info("cell %s: %.1f%% (train %s) in %.0fs", cell.describe(), rec.accuracy,
                             "n/a" if rec.train_accuracy is None else f"{rec.train_accuracy:.1f}%", rec.seconds)
            write_results_csv(store, self.out_dir / "results.csv")
            write_csv(perturbations_frame(store), self.out_dir / "perturbations.csv")
            return RunSummary(planned=len(cells), skipped=len(cells) - len(todo), ran=ran,
                              keys=[c.key for c in cells])
        finally:
            store.close()


@dataclass(frozen=True)
class RunSummary:
    planned: int
    skipped: int
    ran: list[CellRecord]
    keys: list[str]

    @property
    def failed(self) -> list[CellRecord]:
        return [r for r in self.ran if r.status != "ok"]


def results_frame(store: Store, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per cell with the clean reference (same dataset, attack, backbone, seed) beside it."""
    df = store.frame()
    if keys is not None:
        df = df[df["key"].isin(set(keys))]
    if df.empty:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    # the reference is the clean cell with the very same data, attack config, backbone, seed and zoo
    df = df.assign(ref_key=[reference_key(c) for c in df["config"]])
    ok_clean = df[(df["defense"] == "clean") & (df["status"] == "ok")]
    ref = ok_clean.drop_duplicates("ref_key", keep="last").set_index("ref_key")["accuracy"]
    df = df.assign(clean_accuracy=ref.reindex(df["ref_key"]).to_numpy())
    return df[RESULT_COLUMNS].sort_values(["dataset", "seed", "defense", "attack", "backbone"]).reset_index(drop=True)


def reference_key(config: dict) -> str:
    """What a cell shares with its clean reference: everything but the defense."""
    return stable_hash({k: v for k, v in config.items() if k != "defense"})


def log_certificate(defense: str, seed: int, cert: dict[str, Any] | None) -> None:
    """The verdict of a protected set's certificate, once per protected set (a failure is a warning)."""
    if cert is None:
        log.info("%s (seed %d): no certificate (the defense has no objective it reports)", defense, seed)
        return
    c = Certificate.from_dict(cert)
    if c.passed:
        log.info("%s (seed %d): certificate %s", defense, seed, c.describe())
    else:
        log.warning("%s (seed %d): certificate failed: %s; the cells still run and the leaderboard flags it",
                    defense, seed, c.describe())


def certificate_columns(cert: dict[str, Any] | None) -> dict[str, str | None]:
    """``certificate`` (passed | failed | none) and ``certificate_checks`` (``name=value<=threshold; ...``)."""
    if not cert:
        return {"certificate": "none", "certificate_checks": None}
    c = Certificate.from_dict(cert)
    return {"certificate": "passed" if c.passed else "failed", "certificate_checks": c.compact()}


def visibility(clean: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM of a protected set (its size is in ``perturbation_stats``)."""
    quality = perturbation_quality(clean, protected)
    return {"psnr": quality["psnr"], "ssim": quality["ssim"]}


def perturbations_frame(store: Store, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per protected set (data set, defense, seed): its measured size, visibility and certificate.

    L-inf in /255 units, L2 in [0, 1] pixel units (mean over images), L0 in changed pixel positions,
    PSNR in dB, SSIM in [0, 1], the seconds the defense took to generate it, and the verdict of its
    certificate (passed | failed | none) with the measured checks.
    """
    df = store.frame()
    if keys is not None:
        df = df[df["key"].isin(set(keys))]
    rows = []
    for rec in df[df["status"] == "ok"].itertuples():
        pert = (rec.metrics or {}).get("perturbation") or {}
        rows.append({"dataset": rec.dataset, "defense": rec.defense, "seed": rec.seed,
                     **{c: pert.get(src) for c, src in PERTURBATION_FIELDS.items()},
                     **certificate_columns(pert.get("certificate"))})
    out = pd.DataFrame(rows, columns=["dataset", "defense", "seed", *PERTURBATION_FIELDS, *CERTIFICATE_COLUMNS])
    # every cell of a protected set carries the same numbers; keep the most complete row
    out = out.assign(_n=out.notna().sum(axis=1)).sort_values("_n", kind="stable")
    out = out.drop_duplicates(["dataset", "defense", "seed"], keep="last").drop(columns="_n")
    return out.sort_values(["dataset", "seed", "defense"]).reset_index(drop=True)


PERTURBATION_FIELDS = {"linf_255": "linf", "l2_mean": "l2_mean", "l0_mean": "l0_mean", "psnr_db": "psnr",
                       "ssim": "ssim", "generation_seconds": "seconds"}
CERTIFICATE_COLUMNS = ("certificate", "certificate_checks")


def write_csv(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Write atomically (a killed run never leaves half a file)."""
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False, float_format="%.4f")
    tmp.replace(path)
    return df


def write_results_csv(store: Store, path: Path) -> pd.DataFrame:
    return write_csv(results_frame(store), path)


def with_dataset_overrides(cfg: DatasetConfig, **overrides: Any) -> DatasetConfig:
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
