"""Command-line glue for the leaderboard: ``leaderboard``, ``submit`` and ``reproduce``.

``add_commands(subparsers)`` adds the three subcommands to ``run_benchmark.py``'s parser and
``run(args)`` executes one of them. ``publish_run`` is what ``run`` calls after a grid finishes.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from benchmark.errors import UEBenchError
from leaderboard.entries import ENTRIES_DIR, load_entries, store_metadata, write_entries
from leaderboard.scores import CELL_KEYS, Leaderboard, cells_from_store, group_names, score
from leaderboard.tables import group_markdown, write_tables

log = logging.getLogger(__name__)
COMMANDS = ("leaderboard", "submit", "reproduce")


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
    from leaderboard.plots import write_plots
    from leaderboard.site import write_site

    out_dir = Path(out_dir)
    entries = [p for d in entries_dirs for p in write_entries(board, d)]
    tables = write_tables(board, out_dir)
    plots = write_plots(board, out_dir)
    site = write_site(board, out_dir, plots)
    return Published(board, out_dir, site, tables, plots, entries)


def preset_info(preset: Any) -> dict[str, str]:
    return {"description": preset.description, "protocol_note": preset.protocol_note,
            "dataset": preset.dataset.name}


def plan_grid(cells: Sequence[Any]) -> pd.DataFrame:
    """The expected (group, attack, backbone, seed) of planned runner cells."""
    pairs = sorted({(c.preset, c.dataset.name) for c in cells})
    groups = group_names(pairs)
    rows = [{"group": groups[(c.preset, c.dataset.name)], "attack": c.attack.label, "backbone": c.backbone,
             "seed": c.seed} for c in cells]
    return pd.DataFrame(rows, columns=["group", *CELL_KEYS]).drop_duplicates()


def board_from_store(results_dir: str | Path, *, keys: Sequence[str] | None = None, preset: str | None = None,
                     grid: pd.DataFrame | None = None, presets: dict[str, dict] | None = None,
                     metadata_fallback: str | Path | None = ENTRIES_DIR) -> Leaderboard:
    from benchmark.store import Store

    path = Path(results_dir) / "results.sqlite"
    if not path.is_file():
        raise UEBenchError(f"no results store at {path}; run 'run_benchmark.py run --out {results_dir}' first")
    with Store(path) as store:
        cells = cells_from_store(store, keys)
    if preset is not None:
        cells = cells[cells["preset"] == preset].reset_index(drop=True)
    if grid is not None and not cells.empty:  # extra cells in the store (other seeds, controls) are not the grid's
        planned = grid[["group", *CELL_KEYS]].drop_duplicates()
        cells = cells.merge(planned, on=["group", *CELL_KEYS], how="inner")
    if cells.empty:
        raise UEBenchError(f"the store {path} holds no cells" + (f" of preset {preset!r}" if preset else ""))
    presets = presets if presets is not None else _builtin_presets(sorted(cells["preset"].unique()))
    return score(cells, grid=grid, metadata=store_metadata(cells, metadata_fallback), presets=presets)


def publish_run(out_dir: str | Path, cells: Sequence[Any], preset: Any) -> Published:
    """After ``run``: the leaderboard of the planned cells, into ``OUT/leaderboard`` (entries included)."""
    board = board_from_store(out_dir, keys=[c.key for c in cells], grid=plan_grid(cells),
                             presets={preset.name: preset_info(preset)})
    target = Path(out_dir) / "leaderboard"
    return publish(board, target, [target / "entries"])


def _builtin_presets(names: Sequence[str]) -> dict[str, dict]:
    from benchmark.presets import PRESETS

    return {n: preset_info(PRESETS[n]) for n in names if n in PRESETS}


def leaderboard_command(args: argparse.Namespace) -> int:
    if args.results:
        grid = _preset_grid(args.preset) if args.preset else None
        board = board_from_store(args.results, preset=args.preset, grid=grid, metadata_fallback=args.entries)
        out = Path(args.out or Path(args.results) / "leaderboard")
        published = publish(board, out, [out / "entries"] + ([args.entries] if args.publish else []))
    else:
        if args.publish:
            raise UEBenchError("--publish needs --results (entries are generated from a results store)")
        groups = None
        if args.preset:
            root = Path(args.entries)
            groups = [p.name for p in sorted(root.iterdir()) if p.is_dir() and
                      (p.name == args.preset or p.name.startswith(f"{args.preset}-"))] if root.is_dir() else []
            groups = groups or [args.preset]
        board = load_entries(args.entries, groups)
        published = publish(board, Path(args.out or "results/leaderboard"))
    if args.readme:
        if not args.preset:
            raise UEBenchError("--readme needs --preset (the group whose ranking goes into the file)")
        path = update_readme(args.readme, published, args.preset)
        print(f"{path}: the {args.preset} leaderboard section is up to date")
    print(published.summary())
    if published.entries:
        print(f"{len(published.entries)} entries written to {', '.join(sorted({str(p.parent) for p in published.entries}))}")
    return 0


def update_readme(readme: str | Path, published: Published, group: str) -> Path:
    """Replace the block between ``<!-- leaderboard:GROUP -->`` and ``<!-- /leaderboard:GROUP -->`` in
    ``readme`` with the group's ranking and heatmaps; the PNGs are copied to ``docs/leaderboard/``."""
    import shutil

    from leaderboard.tables import markdown, ranking_frame

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


def _preset_grid(name: str) -> pd.DataFrame | None:
    """The plan of a preset, when it can be planned (its plugins are registered)."""
    from benchmark.presets import load_preset
    from benchmark.runner import plan

    try:
        return plan_grid(plan(load_preset(name)))
    except UEBenchError as exc:
        log.warning("cannot plan preset %r (%s); the expected grid is what the store holds", name, exc)
        return None


def add_commands(sub: Any) -> None:
    """Add ``leaderboard``, ``submit`` and ``reproduce`` to ``run_benchmark.py``'s subparsers."""
    from leaderboard.figures import FIGURES

    lb = sub.add_parser("leaderboard", help="build the leaderboard tables, plots and HTML page",
                        description="Without --results: from the committed entries (leaderboard/entries). "
                                    "With --results: from a results store; entries are generated into OUT/entries "
                                    "(and into --entries with --publish).")
    lb.add_argument("--results", metavar="DIR", help="a results directory (with results.sqlite)")
    lb.add_argument("--out", metavar="DIR", help="output folder (default: RESULTS/leaderboard, or results/leaderboard)")
    lb.add_argument("--preset", help="only this preset (with --results: its plan is the expected grid)")
    lb.add_argument("--entries", default=str(ENTRIES_DIR), metavar="DIR",
                    help="the committed entries folder (default: the package's leaderboard/entries)")
    lb.add_argument("--publish", action="store_true", help="with --results: also write the entries into --entries")
    lb.add_argument("--readme", metavar="FILE",
                    help="also write the ranking and the heatmaps of --preset into FILE, between the lines "
                         "'<!-- leaderboard:PRESET -->' and '<!-- /leaderboard:PRESET -->' (images go to "
                         "docs/leaderboard/ beside FILE)")

    sm = sub.add_parser("submit", help="validate a UE generator plugin file, run its cells, print its rank",
                        description="Load FILE (it must register exactly one defense with complete metadata), "
                                    "try it on a few images, run its cells of the preset (clean references are "
                                    "reused), write its entry and rebuild the leaderboard.")
    sm.add_argument("file", help="a Python file that registers one defense (see examples/my_ue.py)")
    sm.add_argument("--preset", default="quick", help="preset to run (default: quick)")
    sm.add_argument("--out", default="results", help="results directory (default: results/)")
    sm.add_argument("--entries", default=str(ENTRIES_DIR), metavar="DIR",
                    help="entries folder the new entry is written to and ranked against (default: leaderboard/entries)")
    _runtime_args(sm)

    rp = sub.add_parser("reproduce", help="run the cells a paper figure needs, then draw it",
                        description="Figures: " + "; ".join(f"{n}: {f.description}" for n, f in FIGURES.items()))
    rp.add_argument("figure", choices=sorted(FIGURES), help="the figure to draw")
    rp.add_argument("--preset", default="quick", help="preset whose data set, protocol and defenses to use")
    rp.add_argument("--out", default="results", help="results directory; the figure goes to OUT/figures/")
    rp.add_argument("--defenses", nargs="+", metavar="NAME[:k=v,...]", help="defenses (default: the preset's)")
    rp.add_argument("--backbones", nargs="+", metavar="NAME", help="backbones (default: the preset's)")
    rp.add_argument("--seeds", nargs="+", type=int, metavar="N", help="seeds (default: the preset's)")
    _runtime_args(rp)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--cache-dir", help="cache directory (default: OUT/cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Execute ``leaderboard``, ``submit`` or ``reproduce``; returns the exit code."""
    if args.command == "leaderboard":
        return leaderboard_command(args)
    from benchmark.presets import load_preset
    from benchmark.training import resolve_device

    preset = load_preset(args.preset)
    device = resolve_device(args.device)
    if args.command == "submit":
        from leaderboard.submit import submit

        result = submit(args.file, preset, out_dir=args.out, entries_dir=args.entries, device=device,
                        cache_dir=args.cache_dir, progress=not args.no_progress)
        print(result.report())
        return 0
    if args.command == "reproduce":
        from leaderboard.figures import reproduce

        written = reproduce(args.figure, preset, out_dir=args.out, device=device, cache_dir=args.cache_dir,
                            progress=not args.no_progress, defenses=args.defenses, backbones=args.backbones,
                            seeds=args.seeds)
        print("\n".join(str(p) for p in written))
        return 0
    raise UEBenchError(f"unknown command {args.command!r}; valid commands: {', '.join(COMMANDS)}")
