"""``run_benchmark.py submit my_ue.py``: validate a UE generator plugin, run its cells, rank it.

Steps, and what refuses a submission (with a message naming the problem; the store and the entries
are left unchanged by a refusal):

1. load the file: it must register exactly one defense (and no attack);
2. metadata: title, paper (an arXiv id or an https:// URL; http:// is refused, since the page links it), venue
   and year, a declared norm (with a positive budget unless ``none``) and granularity (``class`` or
   ``sample``); the name and every text field must pass ``benchmark.plugins.info_problems`` (allowed
   characters and lengths), as they become file names and page text;
3. a trial ``perturb`` on a few images of the preset's training set, through ``Defense.perturb`` (the
   engine's shape, label and budget checks), then the full protected set of every seed (cached), whose
   certificates are reported (a defense that returns none is warned about, not refused);
4. run its cells of the preset (``clean`` references already in the store are reused), write its
   entry, rebuild the leaderboard from the entries, report its row and rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmark.choices import GRANULARITIES, NORMS
from benchmark.config import configure
from benchmark.data import balanced_subset
from benchmark.errors import UEBenchError
from benchmark.isolation import Handout
from benchmark.plugins import Certificate, Defense, info_problems, paper_url
from benchmark.presets import Preset
from benchmark.execute import LocalExecutor, run_grid
from benchmark.plan import plan
from benchmark.registry import ATTACKS, DEFENSES, load_plugin_file
from leaderboard.build import Published, cells_board, plan_grid, publish
from leaderboard.entries import entry_path, load_entries, read_entry, write_entries
from leaderboard.tables import markdown, ranking_frame

log = logging.getLogger(__name__)

TRIAL_PER_CLASS = 2  # images per class in the trial perturb


@dataclass(frozen=True)
class Submission:
    name: str
    label: str
    entry: Path
    published: Published
    rank: float
    ranked: int
    flag: str
    certificates: tuple[str, ...] = ()  # one line per protected set (seed): its certificate, or a warning

    def report(self) -> str:
        board = self.published.board
        row = ranking_frame(board)
        row = row[row["defense"] == self.label]
        where = "not ranked: " + self.flag if self.flag else f"rank {int(self.rank)} of {self.ranked} ranked defenses"
        return "\n".join([markdown(row), "", *self.certificates, f"{self.label}: {where}", f"entry: {self.entry}",
                          f"leaderboard: {self.published.site}"])


def certificate_lines(name: str, label: str, metas: dict[int, dict[str, Any]]) -> tuple[str, ...]:
    """What each seed's protected set certifies; a warning (logged, and in the report) when there is none."""
    lines = []
    for seed, meta in sorted(metas.items()):
        cert = meta.get("certificate")
        if cert is None:
            warning = (f"defense {name!r} returned no certificate: the leaderboard cannot show whether it reached "
                       f"its objective (return Protected(data, certificate(...)) from _perturb; see docs/submit.md)")
            log.warning("%s", warning)
            lines.append(f"WARNING: {label} (seed {seed}): {warning}")
        else:
            lines.append(f"{label} (seed {seed}): certificate {Certificate.from_dict(cert).describe()}")
    return tuple(lines)


def _fail(path: str | Path, why: str) -> UEBenchError:
    return UEBenchError(f"submission {str(path)!r} refused: {why}")


def load_submission(path: str | Path) -> type[Defense]:
    """Load the file and return its one defense class; anything else it registered is unregistered."""
    before = {"defense": set(DEFENSES.names()), "attack": set(ATTACKS.names())}
    try:
        added = load_plugin_file(path)
    except UEBenchError as exc:
        _forget(before)
        raise _fail(path, str(exc)) from exc
    defenses = [a.split(":", 1)[1] for a in added if a.startswith("defense:")]
    attacks = [a.split(":", 1)[1] for a in added if a.startswith("attack:")]
    if len(defenses) != 1 or attacks:
        _forget(before)
        found = ", ".join(added) or "nothing"
        raise _fail(path, f"a submission file must register exactly one defense and no attack; it registered {found}")
    return DEFENSES.get(defenses[0])


def _forget(before: dict[str, set[str]]) -> None:
    for registry, kind in ((DEFENSES, "defense"), (ATTACKS, "attack")):
        for name in set(registry.names()) - before[kind]:
            registry.unregister(name)


def check_metadata(cls: type[Defense], path: str | Path = "") -> Defense:
    """The defaults must build and the metadata must be complete; returns the default instance."""
    try:
        plugin = cls()
    except UEBenchError as exc:
        raise _fail(path, f"{cls.name}() with its default hyperparameters fails: {exc}") from exc
    except Exception as exc:
        raise _fail(path, f"{cls.name}() with its default hyperparameters raised {type(exc).__name__}: {exc}") from exc
    try:
        meta = plugin.metadata()
    except (UEBenchError, TypeError, ValueError) as exc:
        raise _fail(path, f"{cls.name}: its threat model cannot be read: {exc}") from exc
    problems = info_problems(cls.plugin_info())
    if not str(meta.get("title") or "").strip():
        problems.append("title is empty (set the class attribute title = '...')")
    paper = str(meta.get("paper") or "").strip()
    if not paper_url(paper) and not any(p.startswith("paper=") for p in problems):
        problems.append(f"paper={paper[:60]!r} must be an arXiv id like '2101.04898' or an https:// URL")
    if not str(meta.get("venue") or "").strip():
        problems.append("venue is empty (e.g. 'ICLR', or 'arXiv' for a preprint)")
    year = meta.get("year")
    if isinstance(year, int) and not isinstance(year, bool) and not 1990 <= year <= 2100 \
            and not any(p.startswith("year=") for p in problems):
        problems.append(f"year={year!r} must be the publication year")
    declared = {k for klass in cls.__mro__ if klass not in Defense.__mro__ for k in vars(klass)}
    if "norm" not in declared or meta["norm"] not in NORMS:
        problems.append(f"norm must be declared as a class attribute, one of {list(NORMS)}; found {meta['norm']!r}")
    elif meta["norm"] != "none" and not meta["budget"] > 0:
        problems.append(f"budget={meta['budget']!r} must be > 0 for norm {meta['norm']!r} (a field named eps, or "
                        f"override threat_model())")
    granularity_declared = "granularity" in declared or hasattr(plugin, "mode") or "threat_model" in declared
    if not granularity_declared or meta["granularity"] not in GRANULARITIES[:2]:
        problems.append(f"granularity must be declared, 'class' or 'sample'; found {meta['granularity']!r}")
    if problems:
        raise _fail(path, f"defense {cls.name!r} has incomplete metadata or metadata that cannot be published: "
                          + "; ".join(problems))
    return plugin


def trial(executor: LocalExecutor, cells: list, label: str, path: str | Path) -> dict[int, dict[str, Any]]:
    """``perturb`` on a few images, then the full protected set of each seed (the engine checks both);
    returns the protected sets' meta (size, visibility, certificate) by seed."""
    mine = [c for c in cells if c.defense.label == label]
    first = mine[0]
    splits = executor.splits(first.dataset)
    few, _ = balanced_subset(splits.train, min(len(splits.train), TRIAL_PER_CLASS * splits.train.num_classes),
                             first.seed)

    def on_few() -> None:
        with Handout(f"defense {label!r}") as handout:
            first.defense.plugin.perturb(handout.copy(few, "the clean training"), executor.context(first, handout))

    # each step returns only the meta: under a cell time limit it runs in a child process (executor.call)
    steps: list[tuple[str, int | None, Callable[[], Any]]] = [("a trial on a few images", None, on_few)]
    for seed in sorted({c.seed for c in mine}):
        cell = next(c for c in mine if c.seed == seed)
        steps.append((f"the full training set (seed {seed})", seed, lambda cell=cell: executor.protected(cell)[1]))
    metas: dict[int, dict[str, Any]] = {}
    for what, seed, step in steps:
        try:
            meta = executor.call(step)
            if seed is not None:
                metas[seed] = meta
        except UEBenchError as exc:
            raise _fail(path, f"perturb on {what} failed the engine's checks: {exc}") from exc
        except Exception as exc:
            raise _fail(path, f"perturb on {what} raised {type(exc).__name__}: {exc}") from exc
    return metas


def submit(path: str | Path, preset: Preset, *, out_dir: str | Path, entries_dir: str | Path,
           device: torch.device, cache_dir: str | Path | None = None, progress: bool = True,
           cell_timeout: float | None = None) -> Submission:
    """Validate, run, write the entry and rank the defense that ``path`` registers; ``cell_timeout``
    (seconds) bounds each trial step and each cell, each then run in a child process."""
    before = {"defense": set(DEFENSES.names()), "attack": set(ATTACKS.names())}
    cls = load_submission(path)
    try:
        check_metadata(cls, path)
        label = configure(DEFENSES, cls.name, preset.defense_protocol).label
        cells = plan(preset, defenses=[cls.name])
        group = plan_grid(cells)["group"].iloc[0]
        existing = entry_path(Path(entries_dir), group, label)
        if existing.is_file() and read_entry(existing).get("title") != cls.title:
            raise _fail(path, f"the name {cls.name!r} is taken by the entry {existing} "
                              f"({read_entry(existing).get('title')!r}); register your defense under another name")
        executor = LocalExecutor(cache_dir or Path(out_dir) / "cache", device=device, progress=progress,
                                 cell_timeout=cell_timeout)
        certificates = certificate_lines(cls.name, label, trial(executor, cells, label, path))
        summary = run_grid(cells, out_dir, executor)
        if summary.failed:
            lines = [f"{r.defense} / {r.attack} / {r.backbone} / seed {r.seed}: {r.error}" for r in summary.failed]
            raise UEBenchError(f"{len(lines)} cell(s) failed; no entry written (rerun to retry them):\n  "
                               + "\n  ".join(lines))
        board = cells_board(out_dir, cells, metadata_fallback=None)
        reference = [] if entry_path(Path(entries_dir), group, "clean").is_file() else ["clean"]
        write_entries(board, entries_dir, defenses=[label, *reference])
        entry = entry_path(Path(entries_dir), group, label)
    finally:
        _forget(before)
    full = load_entries(entries_dir, [group])
    published = publish(full, Path(out_dir) / "leaderboard")
    s = full.scores[full.scores["defense"] == label].iloc[0]
    ranked = int(full.scores["rank"].notna().sum())
    return Submission(cls.name, label, entry, published, float(s["rank"]), ranked, str(s["flag"]), certificates)
