"""Command-line glue for the leaderboard: ``leaderboard``, ``submit`` and ``reproduce``.

``add_commands(subparsers)`` adds the three subcommands to ``run_benchmark.py``'s parser and
``run(args)`` executes one of them; the work is done by ``leaderboard.build``, ``leaderboard.submit``
and ``leaderboard.figures``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from benchmark.child import check_timeout
from benchmark.errors import UEBenchError
from benchmark.plan import check_seeds
from benchmark.presets import Preset
from leaderboard.build import board_from_store, plan_grid, plan_presets, preset_plan, publish, update_readme
from leaderboard.entries import ENTRIES_DIR, load_entries
from leaderboard.figures import FIGURES, reproduce
from leaderboard.submit import submit

log = logging.getLogger(__name__)

COMMANDS = ("leaderboard", "submit", "reproduce")


def leaderboard_command(args: argparse.Namespace) -> int:
    if args.results:
        if args.seeds and not args.preset:
            raise UEBenchError("--seeds needs --preset (they replace the preset's seeds in its plan)")
        if args.seeds:
            check_seeds(args.seeds)  # here, not in preset_plan, whose errors mean "plan from the store"
        cells = preset_plan(args.preset, args.seeds) if args.preset else None
        grid = plan_grid(cells) if cells is not None else None
        # publishing keeps the entries' planned cells the store lacks (a grid run in parts); that needs the plan
        planned = {c.key: c.defense.label for c in cells} if cells is not None else None
        if args.publish and planned is None:
            log.warning("--publish without a plannable --preset: the entries are written from the store alone")
        published = (args.entries, planned) if args.publish and planned is not None else None
        name = cells[0].preset if cells else args.preset  # a .toml file's cells carry its name
        # with a plan, its protocol is the board's: published cells join only when they are its computation,
        # and the record of an older cell (another protocol text, the same keys) must not stand for it
        board = board_from_store(args.results, preset=name, grid=grid, metadata_fallback=args.entries,
                                 published=published, defenses=set(planned.values()) if planned else None,
                                 presets=plan_presets(cells) if cells else None)
        out = Path(args.out or Path(args.results) / "leaderboard")
        published = publish(board, out, [out / "entries"] + ([args.entries] if args.publish else []))
    else:
        if args.publish:
            raise UEBenchError("--publish needs --results (entries are generated from a results store)")
        if args.seeds:
            raise UEBenchError("--seeds needs --results (the committed entries hold the seeds they were run with)")
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


def add_commands(sub: Any) -> None:
    """Add ``leaderboard``, ``submit`` and ``reproduce`` to ``run_benchmark.py``'s subparsers."""
    lb = sub.add_parser("leaderboard", help="build the leaderboard tables, plots and HTML page",
                        description="Without --results: from the committed entries (leaderboard/entries). "
                                    "With --results: from a results store; entries are generated into OUT/entries "
                                    "(and into --entries with --publish).")
    lb.add_argument("--results", metavar="DIR", help="a results directory (with results.sqlite)")
    lb.add_argument("--out", metavar="DIR", help="output folder (default: RESULTS/leaderboard, or results/leaderboard)")
    lb.add_argument("--preset", help="only this preset (with --results: its plan is the expected grid, and cells of "
                         "the store's other defenses, attacks, backbones or seeds are left out)")
    lb.add_argument("--seeds", nargs="+", type=int, metavar="N",
                    help="with --results and --preset: the seeds of the expected grid, in place of the preset's "
                         "(a store run with 'run --seeds 0 1 2'); cells of other seeds are left out")
    lb.add_argument("--entries", default=str(ENTRIES_DIR), metavar="DIR",
                    help="the committed entries folder (default: the package's leaderboard/entries)")
    lb.add_argument("--publish", action="store_true",
                    help="with --results: also write the entries into --entries. With --preset, an entry keeps "
                         "its cells that the store lacks when they are the computation the preset plans (same "
                         "cell key) and were trained on the same protected set as the store's cells of that "
                         "defense and seed, so a grid run in parts (sessions, machines) is published whole; "
                         "other cells are dropped, and the store's cells win")
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
    add_cell_timeout(sm)

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


def add_cell_timeout(p: argparse.ArgumentParser) -> None:
    """``--cell-timeout SECONDS`` (on ``run`` and ``submit``)."""
    p.add_argument("--cell-timeout", type=float, metavar="SECONDS",
                   help="time limit of each cell's plugin work (generating its protected set, training, "
                        "evaluating): each cell then runs in a child process, and a cell past the limit, or one "
                        "that crashes (segfault, out-of-memory kill), is recorded as failed while the run goes "
                        "on. 0: no limit. Default: the preset's cell_timeout (no built-in preset sets one: "
                        "cells run in this process)")


def cell_timeout(args: argparse.Namespace, preset: Preset) -> float | None:
    """``--cell-timeout`` when given (0: no limit), else the preset's ``cell_timeout``."""
    given = getattr(args, "cell_timeout", None)
    return preset.cell_timeout if given is None else check_timeout(given, "--cell-timeout")


def run(args: argparse.Namespace) -> int:
    """Execute ``leaderboard``, ``submit`` or ``reproduce``; returns the exit code."""
    if args.command == "leaderboard":
        return leaderboard_command(args)
    from benchmark.presets import load_preset
    from benchmark.training import resolve_device

    preset = load_preset(args.preset)
    device = resolve_device(args.device)
    if args.command == "submit":
        result = submit(args.file, preset, out_dir=args.out, entries_dir=args.entries, device=device,
                        cache_dir=args.cache_dir, progress=not args.no_progress,
                        cell_timeout=cell_timeout(args, preset))
        print(result.report())
        return 0
    if args.command == "reproduce":
        written = reproduce(args.figure, preset, out_dir=args.out, device=device, cache_dir=args.cache_dir,
                            progress=not args.no_progress, defenses=args.defenses, backbones=args.backbones,
                            seeds=args.seeds)
        print("\n".join(str(p) for p in written))
        return 0
    raise UEBenchError(f"unknown command {args.command!r}; valid commands: {', '.join(COMMANDS)}")
