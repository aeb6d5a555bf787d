#!/usr/bin/env python3
"""uebench command line: a thin layer that parses arguments and calls the library.

    python run_benchmark.py list [defenses|attacks|backbones|datasets|presets]
    python run_benchmark.py run --preset quick [--defenses em:mode=class lsp] [--attacks scratch] ...
    python run_benchmark.py run --preset quick --executor ray [--address ADDR]
    python run_benchmark.py perf [--json perf.json] [--no-grid]

Errors in arguments or data print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from benchmark.choices import PRETRAINED_SOURCES
from benchmark.errors import UEBenchError

log = logging.getLogger("uebench")
LIST_WHAT = ("defenses", "attacks", "backbones", "datasets", "presets")
EXECUTORS = ("local", "ray")
RAY_OPTIONS = ("address", "num_cpus", "cpus_per_cell")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uebench", description="Benchmark unlearnable examples against scratch, probed, frozen and "
                                    "fine-tuned victims.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="load a plugin file (repeatable); its defenses/attacks become usable by name")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list registered plugins, backbones, data sets or presets")
    ls.add_argument("what", nargs="?", choices=LIST_WHAT, default="defenses")

    run = sub.add_parser("run", help="run a preset's grid of cells (finished cells are reused)",
                         description="Run the cross product data set x defenses x attacks x backbones x seeds. "
                                     "Cells already finished in OUT/results.sqlite are skipped; a killed run "
                                     "resumes. Writes OUT/results.csv, OUT/perturbations.csv and "
                                     "the leaderboard in OUT/leaderboard/.")
    run.add_argument("--preset", default="quick", help="quick | standard | paper | a .toml file (default: quick)")
    run.add_argument("--dataset", help="override the preset's data set (shapes, fashion-mnist, cifar10, hf:...)")
    run.add_argument("--train-size", type=int, help="class-balanced subsample of the training split")
    run.add_argument("--test-size", type=int, help="class-balanced subsample of the test split")
    run.add_argument("--data-root", help="folder with the data set's files")
    run.add_argument("--download", action="store_true", help="allow torchvision to download (needs a network)")
    run.add_argument("--defenses", nargs="+", metavar="NAME[:k=v,...]", help="defenses (default: the preset's)")
    run.add_argument("--attacks", nargs="+", metavar="NAME[:k=v,...]", help="attacks (default: the preset's)")
    run.add_argument("--backbones", nargs="+", metavar="NAME", help="backbones (default: the preset's)")
    run.add_argument("--seeds", nargs="+", type=int, metavar="N", help="seeds (default: the preset's)")
    run.add_argument("--threat-model", choices=("white-box", "transfer"),
                     help="the surrogates' weights: the victims' zoo weights (white-box, the papers' setting) or "
                          "pretrained independently, another seed on half the source pool (transfer); default: "
                          "the preset's")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    run.add_argument("--out", default="results", help="results directory (default: results/)")
    run.add_argument("--cache-dir", help="cache directory (default: OUT/cache)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: cells one at a time in this process (default); ray: one Ray task per cell, on a "
                          "local Ray instance or the cluster at --address (pip install 'uebench[ray]'); a cell "
                          "asks for one GPU on a CUDA --device, else for --cpus-per-cell CPUs")
    run.add_argument("--address", metavar="ADDR",
                     help="with --executor ray: the Ray cluster to use (e.g. auto, or HOST:6379); its nodes must "
                          "see --cache-dir and the data. Default: start a local Ray instance")
    run.add_argument("--num-cpus", type=int, metavar="N",
                     help="with --executor ray and no --address: CPUs of the local Ray instance (default: all)")
    run.add_argument("--cpus-per-cell", type=float, metavar="N",
                     help="with --executor ray: CPUs each CPU cell asks for (default: 1)")

    pre = sub.add_parser("pretrain", help="build the zoo's pretrained backbones ahead of time (cached)",
                         description="Pretrain each backbone on the data set's source pool (supervised and "
                                     "semantic-focused) and cache the checkpoints; later runs load them.")
    pre.add_argument("--preset", default="quick", help="preset whose data set, backbones and zoo config to use")
    pre.add_argument("--dataset", help="override the preset's data set")
    pre.add_argument("--data-root", help="folder with the data set's files")
    pre.add_argument("--backbones", nargs="+", metavar="NAME", help="backbones (default: the preset's)")
    pre.add_argument("--sources", nargs="+", default=list(PRETRAINED_SOURCES), choices=PRETRAINED_SOURCES,
                     help="which pretraining to build (default: both)")
    pre.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    pre.add_argument("--out", default="results", help="results directory; the cache is OUT/cache")
    pre.add_argument("--cache-dir", help="cache directory (default: OUT/cache)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bars")

    perf = sub.add_parser(
        "perf", help="measure this machine: the training loop against its limits, and a preset cold and warm",
        description="Measure, in this process: loop_vs_raw (images/s of the training loop over a bare "
                    "forward+backward+step on one fixed batch, per backbone, augmentation on and off), "
                    "loop_vs_classic (the loop over a DataLoader with per-sample PIL transforms and 2 workers), "
                    "and the preset's whole grid cold (empty cache and store, in a temporary folder) and warm "
                    "(rerun): wall seconds, peak memory, seconds per phase and per cell. Prints tables; "
                    "--json writes the report. The cold run of quick takes as long as `uebench run --preset "
                    "quick` on an empty folder; run nothing else heavy meanwhile, or the times are wrong.")
    perf.add_argument("--preset", default="quick", help="preset to measure (default: quick)")
    perf.add_argument("--json", metavar="FILE", help="write the report as JSON")
    perf.add_argument("--repeats", type=int, default=3, help="timed rounds per ratio; medians are reported (default: 3)")
    perf.add_argument("--images", type=int, default=2048, help="images per timed pass (default: 2048)")
    perf.add_argument("--no-grid", action="store_true", help="only the loop ratios (seconds, not the whole grid)")
    perf.add_argument("--keep", metavar="DIR", help="run the grid in DIR (new or empty) and keep its results")
    perf.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    perf.add_argument("--no-progress", action="store_true", help="no progress bars")

    from leaderboard.cli import add_cell_timeout, add_commands

    add_cell_timeout(run)
    add_commands(sub)  # leaderboard, submit, reproduce
    return p


def _list(what: str) -> None:
    from tabulate import tabulate

    from benchmark.data import DATASETS
    from benchmark.models import BACKBONES
    from benchmark.presets import PRESETS
    from benchmark.registry import ATTACKS, DEFENSES

    if what == "defenses":
        rows = []
        for n in DEFENSES.names():
            meta = DEFENSES.get(n)().metadata()
            rows.append([n, meta["title"], meta["norm"], f"{meta['budget']:.4g}", meta["granularity"],
                         f"{meta['venue']} {meta['year'] or ''}".strip(), meta["paper"]])
        print(tabulate(rows, headers=["name", "title", "norm", "budget", "granularity", "venue", "paper"],
                       disable_numparse=True))
    elif what == "attacks":
        rows = []
        for n in ATTACKS.names():
            cls = ATTACKS.get(n)
            kind = f"countermeasure ({cls.composes}=<paradigm>)" if getattr(cls, "composes", "") else "paradigm"
            rows.append([n, cls.title, kind, f"{cls.venue} {cls.year or ''}".strip(), cls.paper])
        print(tabulate(rows, headers=["name", "title", "kind", "venue", "paper"], disable_numparse=True))
    elif what == "backbones":
        print(tabulate([[s.name, s.family, s.timm_name, s.description] for s in BACKBONES.values()],
                       headers=["name", "family", "timm", "description"]))
    elif what == "datasets":
        print("\n".join(DATASETS.names()))
    else:
        print(tabulate([[p.name, p.dataset.name, len(p.defenses), len(p.attacks), ", ".join(p.backbones),
                         len(p.seeds), p.threat_model, p.description] for p in PRESETS.values()],
                       headers=["name", "data", "defenses", "attacks", "backbones", "seeds", "surrogates", "about"]))


def _run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from pathlib import Path

    from benchmark.execute import LocalExecutor, run_grid
    from benchmark.plan import plan, with_dataset_overrides
    from benchmark.presets import load_preset
    from benchmark.report import perturbations_frame, results_frame
    from benchmark.store import Store
    from benchmark.training import resolve_device
    from leaderboard.cli import cell_timeout

    given = [f"--{o.replace('_', '-')}" for o in RAY_OPTIONS if getattr(args, o) is not None]
    if given and args.executor != "ray":
        raise UEBenchError(f"{', '.join(given)} needs --executor ray")
    preset = load_preset(args.preset)
    dataset = with_dataset_overrides(preset.dataset, name=args.dataset, train_size=args.train_size,
                                     test_size=args.test_size, data_root=args.data_root,
                                     download=args.download or None)
    cells = plan(preset, dataset=dataset, defenses=args.defenses, attacks=args.attacks,
                 backbones=args.backbones, seeds=args.seeds, threat_model=args.threat_model)
    device = resolve_device(args.device)
    log.info("preset %s: %d cells on %s, results in %s", preset.name, len(cells), device, args.out)
    out = Path(args.out)
    cache_dir, timeout = args.cache_dir or out / "cache", cell_timeout(args, preset)
    if args.executor == "ray":
        from benchmark.ray_executor import RayExecutor

        executor = RayExecutor(cache_dir, device=device, address=args.address, num_cpus=args.num_cpus,
                               cpus_per_cell=1.0 if args.cpus_per_cell is None else args.cpus_per_cell,
                               cell_timeout=timeout, progress=not args.no_progress)
    else:
        executor = LocalExecutor(cache_dir, device=device, progress=not args.no_progress, cell_timeout=timeout)
    summary = run_grid(cells, out, executor)
    with Store(out / "results.sqlite") as store:
        df = results_frame(store, summary.keys)
        pert = perturbations_frame(store, summary.keys)
    shown = df[["defense", "attack", "backbone", "seed", "status", "accuracy", "clean_accuracy", "seconds"]]
    print(tabulate(shown, headers="keys", showindex=False, floatfmt=".1f"))
    if not pert.empty:
        print("\nPerturbations (L-inf in /255, L2 mean, L0 mean pixels, PSNR dB, SSIM, generation seconds, "
              "certificate: passed / failed / none, and its checks):")
        shown_pert = pert.drop(columns="dataset").fillna({"certificate_checks": "-"})
        print(tabulate(shown_pert, headers="keys", showindex=False, floatfmt=".3g"))
    print(f"\n{summary.planned} cells: {summary.skipped} reused, {len(summary.ran)} run, "
          f"{len(summary.failed)} failed. Results: {out / 'results.csv'}")
    for rec in summary.failed:
        print(f"failed: {rec.defense} / {rec.attack} / {rec.backbone} / seed {rec.seed}: {rec.error}")
    from leaderboard.build import publish_run

    print("\n" + publish_run(out, cells).summary())
    return 1 if summary.failed else 0


def _pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from benchmark.data import load_dataset
    from benchmark.presets import load_preset
    from benchmark.plan import with_dataset_overrides
    from benchmark.training import resolve_device
    from benchmark.zoo import Zoo, pretrain_config
    from benchmark.models import get_spec

    preset = load_preset(args.preset)
    dataset = with_dataset_overrides(preset.dataset, name=args.dataset, data_root=args.data_root)
    device = resolve_device(args.device)
    config = pretrain_config(preset.zoo)
    backbones = list(dict.fromkeys(args.backbones or preset.backbones))
    for b in backbones:
        get_spec(b)  # an unknown name fails with the valid names, before the data set loads
    splits = load_dataset(dataset)
    if splits.source is None:
        raise UEBenchError(f"{dataset.name} has no source pool to pretrain on (its pretrained victims use timm "
                           f"weights)")
    zoo = Zoo(args.cache_dir or Path(args.out) / "cache", pool=splits.source,
              pool_key={**dataset.source_key(), "split": "source"}, config=config, device=device,
              progress=not args.no_progress)
    jobs = [(b, s) for b in backbones for s in args.sources]
    for backbone, source in tqdm(jobs, desc="zoo", unit="backbone", disable=args.no_progress):
        _, cached = zoo.build(backbone, source)
        print(f"{backbone} ({source}): {'loaded from cache' if cached else 'built'}")
    return 0


def _perf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from benchmark import perf
    from benchmark.presets import load_preset
    from benchmark.training import resolve_device

    if args.repeats < 1 or args.images < 2:
        raise UEBenchError(f"--repeats must be >= 1 and --images >= 2, got {args.repeats} and {args.images}")
    rep = perf.report(load_preset(args.preset), resolve_device(args.device), repeats=args.repeats,
                      images=args.images, grid=not args.no_grid, progress=not args.no_progress,
                      keep=Path(args.keep) if args.keep else None)
    print(perf.tables(rep))
    if args.json:
        perf.write(rep, args.json)
        print(f"\nreport: {args.json}")
    return 0


def _check_folders(args: argparse.Namespace) -> None:
    """``--out``, ``--cache-dir``, ``--data-root``, ``--entries`` and ``--results`` name folders (that may not
    exist yet), not files."""
    from pathlib import Path

    for option in ("out", "cache_dir", "data_root", "entries", "results", "keep"):
        value, flag = getattr(args, option, None), f"--{option.replace('_', '-')}"
        if value is not None and not value.strip():
            raise UEBenchError(f"{flag} must name a folder, got an empty string")
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise UEBenchError(f"{flag} {value!r} is a file; it must be a folder (or not exist yet)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from benchmark.runtime import log_to_stderr

    log_to_stderr(logging.DEBUG if args.verbose else logging.INFO)
    try:
        import attacks  # noqa: F401  built-in plugins register on import
        import defenses  # noqa: F401
        from benchmark.registry import load_plugin_file
        from benchmark.runtime import keep_freed_memory

        keep_freed_memory()  # fewer page faults per training step; changes no number

        for path in args.plugin:
            load_plugin_file(path)
        _check_folders(args)
        if args.command == "list":
            _list(args.what)
            return 0
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "perf":
            return _perf(args)
        if args.command in ("leaderboard", "submit", "reproduce"):
            from leaderboard.cli import run

            return run(args)
        return _run(args)
    except UEBenchError as exc:
        print(f"uebench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("uebench: interrupted; finished cells are saved, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
