"""Building a leaderboard: a results store (or planned cells) -> ``Leaderboard`` -> published files.

``cells_board`` is the one path from planned cells to their board; ``run`` (``publish_run``),
``submit`` and ``reproduce`` all call it. ``publish`` writes entries, tables, plots and the site;
``with_published_cells`` adds an entry's planned cells that a store lacks, so a grid run in parts
is published whole.
Everything shown comes from the store (metadata recorded with each cell) or the committed entries;
the built-in presets are consulted only for records written before cells carried their preset's
description, and to name a group after its preset's own data set.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import pandas as pd

from benchmark.errors import UEBenchError
from benchmark.plan import Cell, PresetInfo
from benchmark.presets import PRESETS, Preset
from benchmark.store import Store
from leaderboard.entries import ENTRIES_DIR, entry_files, load_entries, store_metadata, write_entries
from leaderboard.plots import write_plots
from leaderboard.scores import (CELL_KEYS, Leaderboard, attach_clean_reference, cells_from_store, group_names,
                                score)
from leaderboard.site import write_site
from leaderboard.tables import group_markdown, markdown, ranking_frame, write_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    board: Leaderboard
    out_dir: Path
    site: Path
    tables: list[Path]
    plots: dict[str, list[Path]]
    entries: list[Path]

    def summary(self) -> str:
        """The markdown of every group, then where the files are."""
        parts = [group_markdown(self.board.subset(g)) for g in self.board.groups()]
        parts.append(f"Leaderboard: {self.site} (tables, plots and entries in {self.out_dir})")
        return "\n".join(parts)


def publish(board: Leaderboard, out_dir: str | Path, entries_dirs: Sequence[str | Path] = ()) -> Published:
    """Write entries (to each of ``entries_dirs``), tables, plots and the site under ``out_dir``."""
    out_dir = Path(out_dir)
    entries = [p for d in entries_dirs for p in write_entries(board, d)]
    tables = write_tables(board, out_dir)
    plots = write_plots(board, out_dir)
    site = write_site(board, out_dir, plots)
    return Published(board, out_dir, site, tables, plots, entries)


def preset_info(preset: Preset) -> dict[str, str]:
    return PresetInfo.of(preset).to_dict()


def own_datasets() -> dict[str, str]:
    """The data set of each built-in preset: its group is named after the preset alone."""
    return {name: p.dataset.name for name, p in PRESETS.items()}


def plan_presets(cells: Sequence[Cell]) -> dict[str, dict]:
    """Each planned preset's description and protocol note, as the plan states them now (a store's or an
    entry's record of the same computation may carry an older wording)."""
    return {c.preset: c.preset_info.to_dict() for c in cells}


def plan_grid(cells: Sequence[Cell]) -> pd.DataFrame:
    """The expected (group, attack, backbone, seed) of planned cells."""
    pairs = sorted({(c.preset, c.dataset.name) for c in cells})
    groups = group_names(pairs, own_datasets())
    rows = [{"group": groups[(c.preset, c.dataset.name)], "attack": c.attack.label, "backbone": c.backbone,
             "seed": c.seed} for c in cells]
    return pd.DataFrame(rows, columns=["group", *CELL_KEYS]).drop_duplicates()


def recorded_presets(cells: pd.DataFrame) -> dict[str, dict]:
    """Each preset's description and protocol note as its cells recorded them; built-in presets fill in
    for records written before cells carried them."""
    out: dict[str, dict] = {}
    for preset, meta in zip(cells["preset"], cells["metadata"]):
        if isinstance(meta, Mapping) and meta.get("preset"):
            out[preset] = dict(meta["preset"])
    for name in sorted(set(cells["preset"]) - set(out)):
        if name in PRESETS:
            out[name] = preset_info(PRESETS[name])
    return out


# the measured sizes of a protected set (``benchmark.metrics``): equal to float precision = the same set
PROTECTED_SET_FINGERPRINT = ("linf", "l0_mean", "l0_max", "l2_mean", "l2_max", "psnr", "ssim")


def same_protected_set(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two cells' perturbation records measure the same protected set: every measured size is
    there and agrees to 1e-6 (relative). A generator whose output depends on the CPU's float kernels
    (a surrogate it trains, its PGD) makes another set on another machine under the same cell key."""
    try:
        return all(math.isclose(float(a[k]), float(b[k]), rel_tol=1e-6, abs_tol=1e-9)
                   for k in PROTECTED_SET_FINGERPRINT)
    except (KeyError, TypeError, ValueError):
        return False


def with_published_cells(cells: pd.DataFrame, entries_dir: str | Path, planned: Mapping[str, str]) -> pd.DataFrame:
    """``cells`` (from a store) plus the cells of the entries under ``entries_dir`` that the store lacks,
    for the groups of ``cells`` and the defenses of ``planned`` (planned cell key -> defense label). An
    entry's cell is kept when its key is in ``planned`` (the very computation the plan asks for: the
    key hashes every resolved config) and, if the store holds cells of the same defense and seed, when
    both were trained on the same protected set (``same_protected_set``), so that one entry never
    mixes two generator outputs. A store's cell wins over an entry's of the same key. This lets a grid
    be run in parts (other sessions, other machines) without a publish erasing an earlier part."""
    groups = sorted(set(cells["group"]))
    if not groups or not entry_files(entries_dir, groups):
        return cells
    published = load_entries(entries_dir, groups).cells
    # defenses the plan does not run (a submitted plugin's entry) are not this board's: left as they are
    published = published[published["defense"].isin(set(planned.values()))]
    candidates = published[~published["key"].isin(set(cells["key"]))]
    stale = candidates[~candidates["key"].isin(planned)]
    if len(stale):
        log.warning("%d published cells of %s are not in the plan (another configuration); they are dropped",
                    len(stale), ", ".join(sorted(set(stale["defense"]))))
    candidates = candidates[candidates["key"].isin(planned)]
    sets: dict[tuple, Mapping] = {}  # (group, defense, seed) -> the store's protected set, from its ok cells
    for g, d, seed, status, pert in cells[["group", "defense", "seed", "status", "perturbation"]].itertuples(index=False):
        if status == "ok" and pert:
            sets.setdefault((g, d, int(seed)), pert)
    other = [(g, d, int(seed)) in sets and not same_protected_set(sets[(g, d, int(seed))], pert)
             for g, d, seed, pert in candidates[["group", "defense", "seed", "perturbation"]].itertuples(index=False)]
    other = pd.Series(other, index=candidates.index, dtype=bool)
    if other.any():
        log.warning("%d published cells of %s were trained on another protected set than the store's cells of "
                    "the same defense and seed (the generator's output differs, e.g. on another CPU); they are "
                    "dropped: rerun them into this store", int(other.sum()),
                    ", ".join(sorted(set(candidates.loc[other, "defense"]))))
    keep = candidates[~other]
    if keep.empty:
        return cells
    log.info("keeping %d published cells the store does not hold (%s)", len(keep),
             ", ".join(sorted(set(keep["defense"]))))
    return attach_clean_reference(pd.concat([cells, keep], ignore_index=True))


def board_from_store(results_dir: str | Path, *, keys: Sequence[str] | None = None, preset: str | None = None,
                     grid: pd.DataFrame | None = None, presets: dict[str, dict] | None = None,
                     metadata_fallback: str | Path | None = ENTRIES_DIR,
                     published: tuple[str | Path, Mapping[str, str]] | None = None,
                     defenses: Collection[str] | None = None) -> Leaderboard:
    """The board of a store's cells (only ``keys``, ``preset``, ``grid``'s coordinates and the
    ``defenses`` labels, when given); ``published`` = (entries folder, planned key -> defense label)
    adds the planned cells of those entries that the store lacks (``with_published_cells``)."""
    path = Path(results_dir) / "results.sqlite"
    if not path.is_file():
        raise UEBenchError(f"no results store at {path}; run 'run_benchmark.py run --out {results_dir}' first")
    with Store(path) as store:
        cells = cells_from_store(store, keys, own_datasets())
    if preset is not None:
        cells = cells[cells["preset"] == preset].reset_index(drop=True)
    if grid is not None and not cells.empty:  # extra cells in the store (other seeds, controls) are not the grid's
        planned = grid[["group", *CELL_KEYS]].drop_duplicates()
        cells = cells.merge(planned, on=["group", *CELL_KEYS], how="inner")
    if defenses is not None:  # defenses the plan does not run (variants, other threat models) are not its board's
        cells = cells[cells["defense"].isin(set(defenses))].reset_index(drop=True)
    if published is not None and not cells.empty:
        cells = with_published_cells(cells, *published)
    if cells.empty:
        raise UEBenchError(f"the store {path} holds no cells" + (f" of preset {preset!r}" if preset else ""))
    presets = presets if presets is not None else recorded_presets(cells)
    return score(cells, grid=grid, metadata=store_metadata(cells, metadata_fallback), presets=presets)


def cells_board(results_dir: str | Path, cells: Sequence[Cell], *,
                metadata_fallback: str | Path | None = ENTRIES_DIR) -> Leaderboard:
    """The board of exactly these planned cells (their plan is the expected grid) from the store."""
    return board_from_store(results_dir, keys=[c.key for c in cells], grid=plan_grid(cells),
                            presets=plan_presets(cells),
                            metadata_fallback=metadata_fallback)


def publish_run(out_dir: str | Path, cells: Sequence[Cell]) -> Published:
    """After ``run``: the leaderboard of the planned cells, into ``OUT/leaderboard`` (entries included)."""
    target = Path(out_dir) / "leaderboard"
    return publish(cells_board(out_dir, cells), target, [target / "entries"])


def preset_plan(name: str, seeds: Sequence[int] | None = None) -> list[Cell] | None:
    """The planned cells of a preset (with ``seeds`` in place of its own), when it can be planned (its
    plugins are registered)."""
    from benchmark.plan import plan
    from benchmark.presets import load_preset

    try:
        return plan(load_preset(name), seeds=seeds)
    except UEBenchError as exc:
        log.warning("cannot plan preset %r (%s); the expected grid is what the store holds", name, exc)
        return None


def update_readme(readme: str | Path, published: Published, group: str) -> Path:
    """Replace the block between ``<!-- leaderboard:GROUP -->`` and ``<!-- /leaderboard:GROUP -->`` in
    ``readme`` with the group's ranking and heatmaps; the PNGs are copied to ``docs/leaderboard/``."""
    readme = Path(readme)
    begin, end = f"<!-- leaderboard:{group} -->", f"<!-- /leaderboard:{group} -->"
    text = readme.read_text() if readme.is_file() else ""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise UEBenchError(f"{readme} needs one line {begin!r} and, after it, one line {end!r}")
    if group not in published.board.groups():
        raise UEBenchError(f"no leaderboard group {group!r}; groups: {', '.join(published.board.groups()) or 'none'}")
    board = published.board.subset(group)
    images = readme.parent / "docs" / "leaderboard"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["", markdown(ranking_frame(board)), ""]
    for png in sorted(p for p in published.plots.get(group, []) if p.suffix == ".png" and p.stem == "heatmap"):
        target = images / f"{group}-{png.stem}.png"
        shutil.copyfile(png, target)
        lines += [f"![{group}: accuracy of each defense under each attack]"
                  f"({target.relative_to(readme.parent).as_posix()})", ""]
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + begin + "\n" + "\n".join(lines) + end + tail)
    return readme
