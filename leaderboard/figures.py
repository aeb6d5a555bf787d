"""Named paper figures for ``run_benchmark.py reproduce FIGURE``.

Each figure plans only the cells it needs (``benchmark.plan.plan``) and runs them with an executor
(``benchmark.execute``; finished cells in the results store are reused), then writes ``OUT/figures/<name>.png``,
``.pdf`` and a ``.csv`` of exactly the plotted numbers.

| figure | what it shows | papers |
|---|---|---|
| ``paradigm-gap`` | every defense under the five victim paradigms: protection from scratch vs. pretrained | BAIT (arXiv 2603.04731) Fig. 1; SSC (arXiv 2605.05224) |
| ``freeze-depth`` | accuracy versus the number of frozen shallow stages k | SSC's semantic-filter finding |
| ``finetune-table`` | defenses x fine-tuning paradigms (linear probe, frozen shallow, full, SF-Pretrain) | BAIT's fine-tuning tables |
| ``gallery`` | protected images and their amplified perturbations, with L-inf/L2/L0/PSNR/SSIM | every UE paper |
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from benchmark.metrics import PSNR_CAP, perturbation_quality
from benchmark.models import body_stages
from benchmark.execute import LocalExecutor, run_grid
from benchmark.plan import Cell, plan
from benchmark.presets import Preset
from benchmark.registry import Registry
from leaderboard import plots
from leaderboard.build import cells_board
from leaderboard.scores import Leaderboard
from leaderboard.tables import acc_text, latex, markdown

log = logging.getLogger(__name__)

PARADIGMS = ("scratch", "linear_probe", "frozen_shallow", "full_finetune", "sf_pretrain")
FINETUNE_PARADIGMS = ("linear_probe", "frozen_shallow", "full_finetune", "sf_pretrain", "sf_pretrain:finetune=full")
GALLERY_IMAGES = 4


@dataclass(frozen=True)
class Request:
    """What a figure is asked for: the preset, the executor and optional overrides of the preset's grid."""

    preset: Preset
    executor: LocalExecutor
    out_dir: Path
    defenses: Sequence[str] | None = None
    backbones: Sequence[str] | None = None
    seeds: Sequence[int] | None = None

    def plan(self, attacks: Sequence[str], backbones: Sequence[str] | None = None,
             seeds: Sequence[int] | None = None) -> list[Cell]:
        return plan(self.preset, defenses=self.defenses, attacks=attacks, backbones=backbones or self.backbones,
                    seeds=seeds or self.seeds)

    def grid(self, attacks: Sequence[str]) -> Grid:
        """Plan the preset's grid with these attacks, run it, and return its board."""
        cells = self.plan(attacks)
        return Grid(cells, self.run(cells))

    def run(self, cells: list[Cell]) -> Leaderboard:
        summary = run_grid(cells, self.out_dir, self.executor)
        for rec in summary.failed:
            log.warning("cell failed (drawn as missing): %s / %s / %s: %s", rec.defense, rec.attack, rec.backbone,
                        rec.error)
        return cells_board(self.out_dir, cells)

    @property
    def stem(self) -> Path:
        return self.out_dir / "figures"


@dataclass(frozen=True)
class Grid:
    """The cells a figure ran and their board; labels in plan order."""

    cells: list[Cell]
    board: Leaderboard

    @property
    def attacks(self) -> list[str]:
        return _labels(self.cells, "attack")

    @property
    def defenses(self) -> list[str]:
        return _labels(self.cells, "defense")


# the seed-averaged numbers each figure writes beside its image
SEED_AVERAGED = ["seeds_ok", "accuracy_mean", "accuracy_std", "clean_accuracy", "chance", "protection"]


@dataclass(frozen=True)
class FigureSpec:
    name: str
    description: str
    make: Callable[[Request], list[Path]]


FIGURES: Registry[FigureSpec] = Registry("figure")


def figure(name: str, description: str) -> Callable[[Callable[[Request], list[Path]]], Callable[[Request], list[Path]]]:
    """Register the decorated function as figure ``name`` (a ``FigureSpec`` in ``FIGURES``)."""
    def decorator(fn: Callable[[Request], list[Path]]) -> Callable[[Request], list[Path]]:
        FIGURES.add(FigureSpec(name, description, fn))
        return fn

    return decorator


def _labels(cells: Sequence[Cell], what: str) -> list[str]:
    return list(dict.fromkeys(getattr(c, what).label for c in cells))


def _plan_order(df: pd.DataFrame, cells: Sequence[Cell]) -> pd.DataFrame:
    """Rows in the order of the plan (defenses, then attacks, then backbones), not alphabetical."""
    rank = {what: {label: i for i, label in enumerate(_labels(cells, what))} for what in ("defense", "attack")}
    keys = [df["defense"].map(rank["defense"]), df["attack"].map(rank["attack"]), df["backbone"]]
    order = pd.DataFrame({"d": keys[0], "a": keys[1], "b": keys[2]}).sort_values(["d", "a", "b"]).index
    return df.loc[order].reset_index(drop=True)


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.4f")
    return path


@figure("paradigm-gap", "every defense under scratch, linear probe, frozen shallow, full fine-tuning and "
                        "SF-Pretrain victims (the protection that pretraining removes)")
def paradigm_gap(req: Request) -> list[Path]:
    g = req.grid(PARADIGMS)
    agg, scores = g.board.aggregated, g.board.scores
    scratch = agg[agg["attack"] == g.attacks[0]].set_index(["defense", "backbone"])["accuracy_mean"]
    numbers = agg.assign(gap_vs_scratch=agg["accuracy_mean"].to_numpy()
                         - scratch.reindex(pd.MultiIndex.from_frame(agg[["defense", "backbone"]])).to_numpy())
    chance = float(scores["chance"].iloc[0])
    paths = plots.grouped_bars(agg, g.attacks, g.defenses, chance, req.stem / "paradigm-gap",
                               f"{req.preset.name} ({scores['dataset'].iloc[0]}): clean test accuracy after "
                               f"training on protected data (lower = stronger protection)")
    numbers = numbers[["defense", "attack", "backbone", *SEED_AVERAGED, "gap_vs_scratch"]]
    return paths + [_write_csv(_plan_order(numbers, g.cells), req.stem / "paradigm-gap.csv")]


@figure("freeze-depth", "accuracy versus the number of frozen shallow stages k of a pretrained backbone "
                        "(k = 0 ... all body stages)")
def freeze_depth(req: Request) -> list[Path]:
    cells: list[Cell] = []
    for bb in req.backbones or req.preset.backbones:
        attacks = [f"frozen_shallow:k={k}" for k in range(body_stages(bb) + 1)]
        cells += req.plan(attacks, backbones=[bb])
    board = req.run(cells)
    paths = plots.freeze_depth(board, req.stem / "freeze-depth")
    numbers = plots.depth_frame(board)[["defense", "backbone", "k", "attack", *SEED_AVERAGED]]
    return paths + [_write_csv(numbers, req.stem / "freeze-depth.csv")]


@figure("finetune-table", "defenses x fine-tuning paradigms of pretrained backbones (linear probe, frozen "
                          "shallow, full fine-tuning, SF-Pretrain frozen/full), as a table and a heatmap")
def finetune_table(req: Request) -> list[Path]:
    g = req.grid(FINETUNE_PARADIGMS)
    defenses = g.defenses
    agg = g.board.aggregated.set_index(["defense", "backbone", "attack"])
    columns = [(bb, a) for bb in sorted(g.board.grid["backbone"].unique()) for a in g.attacks]
    text = pd.DataFrame(index=defenses, columns=[f"{bb}\n{a}" for bb, a in columns], dtype=object)
    values = pd.DataFrame(index=defenses, columns=text.columns, dtype=float)
    for d in defenses:
        for (bb, a), col in zip(columns, text.columns):
            mean = agg["accuracy_mean"].get((d, bb, a), math.nan)
            text.loc[d, col] = acc_text(mean, agg["accuracy_std"].get((d, bb, a), math.nan))
            values.loc[d, col] = mean
    paths = plots.table_figure(text, values, req.stem / "finetune-table",
                               f"{req.preset.name}: clean test accuracy (%) of fine-tuned pretrained victims")
    flat = text.rename(columns=lambda c: c.replace("\n", " / ")).reset_index(names="defense")
    (req.stem / "finetune-table.md").write_text(markdown(flat) + "\n")
    (req.stem / "finetune-table.tex").write_text(latex(flat) + "\n")
    numbers = g.board.aggregated[["defense", "backbone", "attack", *SEED_AVERAGED]]
    return paths + [req.stem / "finetune-table.md", req.stem / "finetune-table.tex",
                    _write_csv(_plan_order(numbers, g.cells), req.stem / "finetune-table.csv")]


@figure("gallery", "protected training images of every defense and their amplified perturbations, with "
                   f"L-inf / L2 / L0 / PSNR (unchanged images: {PSNR_CAP:g} dB) / SSIM of the whole protected set "
                   "(no training needed)")
def gallery(req: Request) -> list[Path]:
    seed = (req.seeds or req.preset.seeds)[0]
    backbone = (req.backbones or req.preset.backbones)[0]
    cells = req.plan(PARADIGMS[:1], backbones=[backbone], seeds=[seed])
    clean = req.executor.splits(cells[0].dataset).train
    picks = [int(torch.nonzero(clean.labels == c)[0]) for c in range(clean.num_classes)
             if bool((clean.labels == c).any())][:GALLERY_IMAGES]
    rows, numbers = [], []
    for cell in cells:  # the protected sets only (cached by data set, defense and seed), no victim training
        protected, _, _ = req.executor.protected(cell)
        q = perturbation_quality(clean.images, protected.images)
        numbers.append({"defense": cell.defense.label, "seed": seed, "images": len(clean), "linf_255": q["linf"],
                        "l2_mean": q["l2_mean"], "l0_mean": q["l0_mean"], "psnr_db": q["psnr"], "ssim": q["ssim"]})
        delta = protected.images.float() - clean.images.float()
        rows.append((cell.defense.label, protected.images[picks].permute(0, 2, 3, 1).numpy() / 255.0,
                     delta[picks].permute(0, 2, 3, 1).numpy() / 255.0))
    paths = plots.gallery(rows, req.stem / "gallery", f"{req.preset.name}: protected images (seed {seed})")
    return paths + [_write_csv(pd.DataFrame(numbers), req.stem / "gallery.csv")]


def reproduce(name: str, preset: Preset, *, out_dir: str | Path, device: torch.device,
              cache_dir: str | Path | None = None, progress: bool = True, defenses: Sequence[str] | None = None,
              backbones: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[Path]:
    """Run the cells figure ``name`` needs and draw it; returns the files written."""
    spec = FIGURES.get(name)  # an unknown name fails with the valid names
    executor = LocalExecutor(cache_dir or Path(out_dir) / "cache", device=device, progress=progress)
    req = Request(preset, executor, Path(out_dir), defenses, backbones, seeds)
    return spec.make(req)
