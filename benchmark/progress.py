"""What a run will do, said before it starts, and a progress bar whose ETA is weighted by each cell's cost.

A cell's expected seconds come from the store: the median wall time of finished cells of the same
attack, backbone and data set (any defense), plus the defense's measured generation time when its
protected set is not cached yet. Cells with no such history get a proxy: their attack's epochs times
the median seconds per epoch of everything measured, or on a new store times the training images over
``NEW_STORE_RATE`` images/s (a small CPU network's rate), so the ETA starts rough on a new store and
sharpens as cells finish.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from benchmark.cache import Cache
from benchmark.plan import Cell


NEW_STORE_RATE = 500.0  # images/s assumed before anything was measured


def _epochs(cell: Cell) -> float:
    epochs = float(getattr(cell.attack.plugin, "epochs", 1) or 1)
    return epochs / 10 if cell.attack.name == "linear_probe" else epochs  # a probe trains a head on features


class CostModel:
    """Expected seconds of a cell, from the finished records of a store."""

    def __init__(self, rows: Iterable[dict[str, Any]]) -> None:
        fits: dict[tuple, list[float]] = defaultdict(list)
        generation: dict[tuple, list[float]] = defaultdict(list)
        per_epoch: list[float] = []
        for r in rows:
            if r.get("status") != "ok" or r.get("seconds") is None:
                continue
            made = float(r.get("defense_seconds") or 0.0)
            fit = max(0.0, float(r["seconds"]) - made)
            fits[(r["attack"], r["backbone"], r["dataset"])].append(fit)
            if made > 0:
                generation[(r["defense"], r["dataset"])].append(made)
            epochs = ((r.get("metrics") or {}).get("attack") or {}).get("epochs")
            if epochs:
                per_epoch.append(fit / float(epochs))
        self.fit = {k: statistics.median(v) for k, v in fits.items()}
        self.generation = {k: statistics.median(v) for k, v in generation.items()}
        self.per_epoch = statistics.median(per_epoch) if per_epoch else None

    def seconds(self, cell: Cell, protected_cached: bool) -> float:
        per_epoch = self.per_epoch
        if per_epoch is None:  # a new store
            per_epoch = (cell.dataset.train_size or 50_000) / NEW_STORE_RATE
        fit = self.fit.get((cell.attack.label, cell.backbone, cell.dataset.name), per_epoch * _epochs(cell))
        made = 0.0 if protected_cached else self.generation.get((cell.defense.label, cell.dataset.name), 0.0)
        return max(fit + made, 0.1)


def expected_seconds(todo: Sequence[Cell], rows: Iterable[dict[str, Any]], cache: Cache | None) -> dict[str, float]:
    """Each cell's expected seconds; a protected set counts once, with the first cell that needs it."""
    model = CostModel(rows)
    seen: set[str] = set()
    out = {}
    for cell in todo:
        key = cell.protected_key()
        cached = key in seen or (cache is not None and cache.path("protected", key).is_file())
        seen.add(key)
        out[cell.key] = model.seconds(cell, cached)
    return out


def describe_plan(cells: Sequence[Cell], todo: Sequence[Cell], cache: Cache | None,
                  estimate: dict[str, float]) -> str:
    """The plan in a few lines: cells planned, finished and to run; protected sets on disk; the estimate."""
    keys = {c.protected_key() for c in todo}
    lines = [f"plan: {len(cells)} cells; {len(cells) - len(todo)} finished in the store, {len(todo)} to run"]
    if todo and cache is not None:
        cached = sum(cache.path("protected", k).is_file() for k in keys)
        lines.append(f"plan: {len(keys)} protected sets needed, {cached} cached, {len(keys) - cached} to generate")
    if todo:
        total = sum(estimate.values())
        lines.append(f"plan: about {total / 60:.0f} min of cell time expected (from the store's history where "
                     f"it has one; rough on a new store)")
    return "\n".join(lines)


class CostBar:
    """A tqdm bar over expected seconds: its ETA weighs each cell by its cost, not by one."""

    def __init__(self, estimate: dict[str, float], enabled: bool) -> None:
        self.estimate, self.done, self.total = estimate, 0, len(estimate)
        self.bar = tqdm(total=round(sum(estimate.values()), 1), unit="s", desc="cells", disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")
        self.bar.set_postfix_str(f"0/{self.total} cells")

    def finished(self, key: str, what: str) -> None:
        self.done += 1
        self.bar.update(round(self.estimate.get(key, 0.0), 1))
        self.bar.set_postfix_str(f"{self.done}/{self.total} cells, last: {what}")

    def close(self) -> None:
        self.bar.close()
