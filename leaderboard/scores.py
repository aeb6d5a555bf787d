"""Leaderboard scores: from cell results (the store, or committed entries) to one row per defense.

Rules (docs/design.md, "Data flow"; docs/submit.md, how a submission is scored):

- seeds are averaged first: each cell's mean and its std over the seeds that finished (the sample
  std, ddof=1; none with one seed); ``seeds`` is the number of seeds in the group's grid;
- protection = (clean - acc) / (clean - chance), chance = 100 / number of classes, computed from the
  seed-averaged accuracy and the seed-averaged clean reference of the same attack and backbone;
  undefined (left out of the min and mean) in an uninformative column, whose clean reference stays
  below twice chance;
- a defense's score is its **worst case**: the highest accuracy that any attack x backbone reaches
  against it (lower is better); the mean over the grid stands beside it;
- every defense of a group (preset + data set) is expected to have every (attack, backbone, seed)
  of the group's grid; a defense with a missing or failed cell is flagged and not ranked;
- ranks go by worst case, then mean; two ranked defenses next to each other are **within noise** when
  their worst-case accuracies differ by less than sqrt(std1^2 + std2^2) (the stds over seeds of the
  two worst cells): the lower one then shares the rank of the one above it instead of being ordered
  below it (``tied_with`` names that one; a chain of such pairs shares one rank). With one seed there
  is no spread, and only equal numbers share a rank;
- ``clean`` is the reference row: shown, never ranked;
- a defense's certificate (the numbers showing it reached its own objective, one per protected set,
  i.e. per seed) is shown beside its score: ``certified`` is True when every seed's certificate
  passed, False when any failed, None when the defense reports none. A defense whose certificate
  failed is shown with its numbers but not ranked: the run did not reach the method's own objective,
  so its numbers are not the method's result.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from benchmark.errors import UEBenchError
from benchmark.plugins import Certificate, paper_url
from benchmark.store import Store

log = logging.getLogger(__name__)

REFERENCE = "clean"
GROUP_KEYS = ["group", "preset", "dataset"]
CELL_KEYS = ["attack", "backbone", "seed"]
CELL_COLUMNS = ["group", "preset", "dataset", "num_classes", "defense", "defense_name", "attack", "attack_name",
                "k", "backbone", "seed", "status", "accuracy", "clean_accuracy", "train_accuracy", "seconds",
                "error", "key", "defense_config", "attack_config", "dataset_config", "perturbation",
                "environment", "metadata"]
METADATA_FIELDS = ("title", "paper", "venue", "year", "authors", "norm", "budget", "granularity",
                   "interpretation", "version", "surrogate_threat_model")
# whose weights the defense's surrogate started from (``benchmark.zoo``): the victims' (white-box), independent
# ones (transfer), none (no zoo surrogate); "" for cells recorded before the option existed
SURROGATE_THREAT_MODELS = ("white-box", "transfer", "none", "")


@dataclass(frozen=True)
class Leaderboard:
    """Everything the tables, plots, site and entries are drawn from."""

    cells: pd.DataFrame        # one row per (group, defense, attack, backbone, seed): CELL_COLUMNS
    aggregated: pd.DataFrame   # one row per (group, defense, attack, backbone): seeds averaged
    scores: pd.DataFrame       # one row per (group, defense): rank, worst case, mean, flags, metadata
    grid: pd.DataFrame         # the expected (group, attack, backbone, seed) of every defense
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # preset -> description, protocol note

    def groups(self) -> list[str]:
        return sorted(self.scores["group"].unique()) if len(self.scores) else []

    def subset(self, group: str) -> Leaderboard:
        def pick(df: pd.DataFrame) -> pd.DataFrame:
            return df[df["group"] == group].reset_index(drop=True)

        return Leaderboard(pick(self.cells), pick(self.aggregated), pick(self.scores), pick(self.grid), self.presets)

    def dataset_text(self) -> str:
        """``shapes (train 10000, test 2000)`` for a one-group board: the data set as the cells used it."""
        cfg = self.cells["dataset_config"].iloc[0] if len(self.cells) else {}
        sizes = ", ".join(f"{k} {cfg[f'{k}_size']}" for k in ("train", "test") if cfg.get(f"{k}_size"))
        name = self.scores["dataset"].iloc[0] if len(self.scores) else ""
        return f"{name} ({sizes})" if sizes else name

    def ranked(self) -> pd.DataFrame:
        """The scores in display order: ranked, then unranked (incomplete), then the reference."""
        s = self.scores.assign(_tier=np.select([self.scores["reference"], self.scores["rank"].isna()], [2, 1], 0))
        return s.sort_values(["group", "_tier", "rank", "worst_accuracy", "defense"]).drop(columns="_tier") \
            .reset_index(drop=True)


# ------------------------------------------------------------------------------------ metadata

def budget_text(norm: str, budget: float | None) -> str:
    """``linf`` budgets in /255 units, ``l2`` as a number, ``l0`` in pixels, ``none`` as a dash."""
    if norm == "none" or budget is None or (isinstance(budget, float) and math.isnan(budget)):
        return "-"
    if norm == "linf":
        return f"{budget * 255:.4g}/255"
    if norm == "l0":
        return f"{budget:.4g} px"
    return f"{budget:.4g}"


def empty_metadata() -> dict[str, Any]:
    return {"title": "", "paper": "", "venue": "", "year": 0, "authors": "", "norm": "none", "budget": float("nan"),
            "granularity": "none", "interpretation": False, "version": 0, "surrogate_threat_model": ""}


# ------------------------------------------------------------------------------------ cells

def num_classes(metrics: Mapping[str, Any] | None) -> float:
    """The number of classes a cell recorded (``metrics["num_classes"]``), else NaN."""
    if metrics and metrics.get("num_classes"):
        return float(metrics["num_classes"])
    return float("nan")


def group_names(pairs: Sequence[tuple[str, str]],
                own_datasets: Mapping[str, str] | None = None) -> dict[tuple[str, str], str]:
    """Folder name of each (preset, data set): the preset, plus the data set when it is not the preset's own
    (``own_datasets``: preset -> its data set, for the presets whose data set is known)."""
    own_datasets = own_datasets or {}
    out = {}
    for preset, dataset in pairs:
        n_datasets = len({d for p, d in pairs if p == preset})
        own = own_datasets.get(preset, dataset) == dataset and n_datasets == 1
        out[(preset, dataset)] = slug(preset if own else f"{preset}-{dataset}")
    return out


SLUG_MAX = 120  # characters of a file or folder name made from a label


def slug(text: str) -> str:
    """A file-name-safe form of a label: ``random_noise(mode=class)`` -> ``random_noise_mode=class``.

    Only ``A-Z a-z 0-9 _ . = + -``, never starting or ending with ``.`` or ``_`` (so never ``..``), at most
    ``SLUG_MAX`` characters (a longer one ends in a hash of the label, so labels stay apart)."""
    out = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", str(text)).strip("_.") or "_"
    if len(out) > SLUG_MAX:
        out = f"{out[:SLUG_MAX - 13]}-{hashlib.sha256(str(text).encode()).hexdigest()[:12]}"
    return out


def group_dir(root: str | Path, group: str) -> Path:
    """The folder of ``group`` under ``root``. A group name that is not its own ``slug`` (``../x``, ``a/b``)
    is refused, so nothing is ever written outside ``root``."""
    if not isinstance(group, str) or slug(group) != group:
        raise UEBenchError(f"group name {group!r} is not a safe folder name (letters, digits, '_', '.', '=', '+', "
                           f"'-'; e.g. {slug(str(group))!r})")
    return Path(root) / group


def cells_from_store(store: Store, keys: Sequence[str] | None = None,
                     own_datasets: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per cell (CELL_COLUMNS). When a label was run twice (e.g. after a protocol change) the
    latest row counts. The clean reference comes from the same preset, data set, attack, backbone, seed.
    ``metadata`` is what the cell recorded of its plugins and preset (empty for older records); a cell
    without a class count (an older failed cell) takes that of its data set's other cells."""
    df = store.frame()
    if keys is not None:
        df = df[df["key"].isin(set(keys))]
    if df.empty:
        return pd.DataFrame(columns=CELL_COLUMNS)
    ident = ["preset", "dataset", "defense", "attack", "backbone", "seed"]
    df = df.sort_values("finished_at").drop_duplicates(ident, keep="last").reset_index(drop=True)
    groups = group_names(sorted(set(zip(df["preset"], df["dataset"]))), own_datasets)
    attack_cfg = df["config"].map(lambda c: c.get("attack", {}))
    out = pd.DataFrame({
        "group": [groups[(p, d)] for p, d in zip(df["preset"], df["dataset"])],
        "preset": df["preset"], "dataset": df["dataset"],
        "num_classes": [num_classes(m) for m in df["metrics"]],
        "defense": df["defense"], "defense_name": df["config"].map(lambda c: c.get("defense", {}).get("name", "")),
        "attack": df["attack"], "attack_name": attack_cfg.map(lambda c: c.get("name", "")),
        "k": attack_cfg.map(lambda c: float(c["k"]) if "k" in c else float("nan")),
        "backbone": df["backbone"], "seed": df["seed"].astype(int), "status": df["status"],
        "accuracy": df["accuracy"].astype(float), "clean_accuracy": float("nan"),
        "train_accuracy": df["train_accuracy"].astype(float), "seconds": df["seconds"].astype(float),
        "error": df["error"], "key": df["key"],
        "defense_config": df["config"].map(lambda c: c.get("defense", {})), "attack_config": attack_cfg,
        "dataset_config": df["config"].map(lambda c: c.get("dataset", {})),
        "perturbation": df["metrics"].map(lambda m: (m or {}).get("perturbation", {})),
        "environment": df["environment"],
        "metadata": df["metrics"].map(lambda m: (m or {}).get("metadata") or {}),
    })
    known = out.dropna(subset=["num_classes"]).drop_duplicates("dataset").set_index("dataset")["num_classes"]
    out["num_classes"] = out["num_classes"].fillna(out["dataset"].map(known))
    return attach_clean_reference(out)


def attach_clean_reference(cells: pd.DataFrame) -> pd.DataFrame:
    """Fill ``clean_accuracy`` from the finished ``clean`` cell of the same group, attack, backbone, seed."""
    keys = ["group", *CELL_KEYS]
    ref = cells[(cells["defense"] == REFERENCE) & (cells["status"] == "ok")].set_index(keys)["accuracy"]
    idx = pd.MultiIndex.from_frame(cells[keys])
    return cells.assign(clean_accuracy=ref.reindex(idx).to_numpy(dtype=float))


# ------------------------------------------------------------------------------------ scores

# A column whose clean reference stays below this many times chance is uninformative: the victim does not
# learn even clean data there, so a low accuracy in it is no protection (tables name such columns)
INFORMATIVE_FACTOR = 2.0


def protection(accuracy: Any, clean: Any, chance: Any) -> Any:
    """(clean - acc) / (clean - chance): 1 = at chance, 0 = no effect; NaN in an uninformative column (clean
    below ``INFORMATIVE_FACTOR`` times chance), and whenever clean is not above chance (accuracies are
    float32 measurements, so "above" means by more than 1e-4 points)."""
    clean_, chance_ = np.asarray(clean, dtype=float), np.asarray(chance, dtype=float)
    span = clean_ - chance_
    defined = (span > 1e-4) & (clean_ >= INFORMATIVE_FACTOR * chance_)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(defined, (clean_ - np.asarray(accuracy, dtype=float)) / span, np.nan)
    return out if out.ndim else float(out)


def aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """Seeds averaged: one row per (group, defense, attack, backbone)."""
    keys = [*GROUP_KEYS, "defense", "attack", "backbone"]
    cols = [*keys, "attack_name", "k", "num_classes", "seeds_ok", "seeds_failed", "accuracy_mean", "accuracy_std",
            "clean_accuracy", "chance", "protection"]
    if cells.empty:
        return pd.DataFrame(columns=cols)
    ok = cells["status"] == "ok"
    c = cells.assign(_acc_ok=cells["accuracy"].where(ok), _ok=ok.astype(int), _failed=(~ok).astype(int),
                     _clean_ok=cells["clean_accuracy"].where(ok))
    g = c.groupby(keys, sort=True, dropna=False)
    agg = g.agg(attack_name=("attack_name", "first"), k=("k", "first"), num_classes=("num_classes", "first"),
                seeds_ok=("_ok", "sum"), seeds_failed=("_failed", "sum"), accuracy_mean=("_acc_ok", "mean"),
                accuracy_std=("_acc_ok", "std"), clean_accuracy=("_clean_ok", "mean")).reset_index()
    agg["chance"] = 100.0 / agg["num_classes"].astype(float)
    agg["protection"] = protection(agg["accuracy_mean"], agg["clean_accuracy"], agg["chance"])
    return agg[cols]


def expected_grid(cells: pd.DataFrame, declared: pd.DataFrame | None = None) -> pd.DataFrame:
    """The (group, attack, backbone, seed) every defense of a group must have: declared plus present."""
    cols = ["group", *CELL_KEYS]
    parts = [cells[cols]] + ([declared[cols]] if declared is not None and len(declared) else [])
    grid = pd.concat(parts[::-1], ignore_index=True)
    grid["seed"] = grid["seed"].astype(int)
    return grid.drop_duplicates().reset_index(drop=True)  # declared (plan) order first, then as run


def score(cells: pd.DataFrame, *, grid: pd.DataFrame | None = None,
          metadata: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
          presets: Mapping[str, Mapping[str, Any]] | None = None) -> Leaderboard:
    """Build the leaderboard. ``grid`` adds expected cells (e.g. a preset's plan) to those present;
    ``metadata`` maps (group, defense label) to plugin metadata (recorded with the cells, or entries)."""
    cells = cells.reset_index(drop=True)
    grid = expected_grid(cells, grid)
    agg = aggregate(cells)
    rows = []
    for (group, preset, dataset, defense), own in cells.groupby([*GROUP_KEYS, "defense"], sort=True):
        expected = grid[grid["group"] == group]
        have = own.set_index(CELL_KEYS)["status"]
        status = have.reindex(pd.MultiIndex.from_frame(expected[CELL_KEYS]))
        n_ok, n_failed = int((status == "ok").sum()), int(status.notna().sum() - (status == "ok").sum())
        n_missing = int(status.isna().sum())
        a = agg[(agg["group"] == group) & (agg["defense"] == defense) & agg["accuracy_mean"].notna()]
        worst = a.loc[a["accuracy_mean"].idxmax()] if len(a) else None
        ok = own[own["status"] == "ok"]
        per_seed = ok.groupby("seed")["accuracy"].mean()  # each seed's mean over its cells
        meta = dict(empty_metadata())
        meta.update((metadata or {}).get((group, defense), {}))
        rows.append({
            "group": group, "preset": preset, "dataset": dataset, "defense": defense,
            "defense_name": own["defense_name"].iloc[0], "reference": defense == REFERENCE,
            "complete": n_ok == len(expected) and len(expected) > 0,
            "cells_expected": len(expected), "cells_ok": n_ok, "cells_failed": n_failed, "cells_missing": n_missing,
            "worst_accuracy": float(worst["accuracy_mean"]) if worst is not None else float("nan"),
            "worst_std": float(worst["accuracy_std"]) if worst is not None else float("nan"),
            "worst_attack": worst["attack"] if worst is not None else "",
            "worst_backbone": worst["backbone"] if worst is not None else "",
            "mean_accuracy": float(a["accuracy_mean"].mean()) if len(a) else float("nan"),
            "mean_std": float(per_seed.std()) if len(per_seed) > 1 else float("nan"),
            "seeds": int(ok["seed"].nunique()),  # seeds measured (an incomplete grid may lack some)
            "min_protection": float(a["protection"].min()) if a["protection"].notna().any() else float("nan"),
            "mean_protection": float(a["protection"].mean()) if a["protection"].notna().any() else float("nan"),
            "chance": 100.0 / float(own["num_classes"].iloc[0]),
            **certificate_summary(seed_certificates(own)),
            **{k: meta.get(k) for k in METADATA_FIELDS},
            "paper_url": paper_url(str(meta.get("paper") or "")),
        })
    scores = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    scores["rank"], scores["tied_with"] = _ranks(scores)
    scores["flag"] = [_flag(r) for r in scores.itertuples()]
    return Leaderboard(cells, agg, scores, grid, {k: dict(v) for k, v in (presets or {}).items()})


SCORE_COLUMNS = ["group", "preset", "dataset", "defense", "defense_name", "reference", "complete", "cells_expected",
                 "cells_ok", "cells_failed", "cells_missing", "worst_accuracy", "worst_std", "worst_attack",
                 "worst_backbone", "mean_accuracy", "mean_std", "seeds", "min_protection", "mean_protection",
                 "chance", "certified", "certificate_checks", *METADATA_FIELDS, "paper_url"]


def seed_certificates(cells: pd.DataFrame) -> list[dict[str, Any]]:
    """The certificate of each seed's protected set, from the cells' ``perturbation`` (the protected set's
    meta): ``[{"seed", "passed", "checks", "info"}, ...]`` by seed; seeds without one are left out."""
    out: dict[int, dict[str, Any]] = {}
    for seed, pert in zip(cells["seed"], cells["perturbation"]):
        cert = pert.get("certificate") if isinstance(pert, Mapping) else None
        if cert and int(seed) not in out:
            out[int(seed)] = {"seed": int(seed), **Certificate.from_dict(cert).to_dict()}
    return [out[s] for s in sorted(out)]


def certificate_summary(certs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``certified`` (True: every seed's certificate passed; False: one failed; None: there is none) and
    ``certificate_checks``, the checks per seed in one line."""
    if not certs:
        return {"certified": None, "certificate_checks": ""}
    parts = [f"seed {c['seed']}: {Certificate.from_dict(c).compact()}" for c in certs]
    return {"certified": all(bool(c["passed"]) for c in certs), "certificate_checks": " | ".join(parts)}


def within_noise(a: float, std_a: float, b: float, std_b: float) -> bool:
    """Two worst-case accuracies are within noise when they differ by less than sqrt(std_a^2 + std_b^2), the
    stds over seeds; never without a spread (one seed: NaN std)."""
    spread = math.hypot(std_a, std_b)
    return bool(math.isfinite(spread) and abs(a - b) < spread)


def _ranks(scores: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(rank, tied_with). Rank 1 = lowest worst-case accuracy, then the mean breaks ties; equal numbers share
    a rank, and so does a defense within noise of the one ranked just above it (``within_noise``), which
    ``tied_with`` names. Unranked = NaN (incomplete grids, the reference, and defenses whose certificate
    failed)."""
    rank = pd.Series(np.nan, index=scores.index, dtype=float)
    tied = pd.Series("", index=scores.index, dtype=object)
    certified_or_none = scores["certified"].map(lambda c: c is not False).astype(bool)
    ok = scores["complete"] & ~scores["reference"] & scores["worst_accuracy"].notna() & certified_or_none
    for _, g in scores[ok].groupby("group"):
        order = g.sort_values(["worst_accuracy", "mean_accuracy"])
        keys = list(zip(order["worst_accuracy"].round(6), order["mean_accuracy"].round(6)))
        r, above = 0, None
        for i, (idx, key) in enumerate(zip(order.index, keys)):
            s = order.loc[idx]
            noise = above is not None and within_noise(s["worst_accuracy"], s["worst_std"], above["worst_accuracy"],
                                                       above["worst_std"])
            r = r if i and (key == keys[i - 1] or noise) else i + 1
            rank[idx] = r
            if noise:
                tied[idx] = above["defense"]
            above = s
    return rank, tied


def _flag(row: Any) -> str:
    parts = [f"{n} {what}" for n, what in ((row.cells_missing, "missing"), (row.cells_failed, "failed")) if n]
    incomplete = "" if row.complete else "incomplete: " + ", ".join(parts) + f" of {row.cells_expected} cells"
    if row.reference:
        return "reference" + (f"; {incomplete}" if incomplete else "")
    return incomplete
