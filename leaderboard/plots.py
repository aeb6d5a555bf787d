"""Leaderboard plots (matplotlib, object API on the Agg canvas: no pyplot, no global backend state).

Each function takes one group of a ``Leaderboard`` (or the plotted numbers) and writes PNG + PDF,
returning the paths it wrote (none when there is nothing to draw).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from leaderboard.scores import Leaderboard, group_dir

FORMATS = ("png", "pdf")
ACCURACY_CMAP = colormaps["viridis"].with_extremes(bad="#d0d0d0")  # grey = missing or failed
PARADIGM_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def save(fig: Figure, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    out = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if fmt == "pdf" else None)
        out.append(path)
    return out


def wrap(label: str, width: int = 16) -> str:
    """Break a long plugin label after '(' and ',' so that tick labels stay narrow."""
    lines, cur = [], ""
    for part in re.split(r"(?<=[(,])", label):
        if cur and len(cur) + len(part) > width:
            lines.append(cur)
            cur = part
        else:
            cur += part
    return "\n".join([*lines, cur])


def _order(board: Leaderboard) -> list[str]:
    return list(dict.fromkeys(board.ranked()["defense"]))


def heatmap(board: Leaderboard, stem: str | Path) -> list[Path]:
    """Defense x attack accuracy, one panel per backbone (seeds averaged; grey = missing or failed)."""
    agg = board.aggregated
    if agg.empty:
        return []
    defenses = _order(board)
    backbones = sorted(board.grid["backbone"].unique())
    attacks = list(dict.fromkeys(board.grid["attack"]))
    fig = Figure(figsize=(1.1 * len(attacks) + 3.5, len(backbones) * (0.42 * len(defenses) + 1.6)))
    axes = fig.subplots(len(backbones), 1, squeeze=False)[:, 0]
    chance = float(board.scores["chance"].iloc[0])
    for ax, bb in zip(axes, backbones):
        m = np.full((len(defenses), len(attacks)), np.nan)
        sub = agg[agg["backbone"] == bb]
        for r in sub.itertuples(index=False):
            m[defenses.index(r.defense), attacks.index(r.attack)] = r.accuracy_mean
        im = ax.imshow(np.ma.masked_invalid(m), cmap=ACCURACY_CMAP, vmin=0, vmax=100, aspect="auto")
        for i in range(len(defenses)):
            for j in range(len(attacks)):
                v = m[i, j]
                text = "-" if math.isnan(v) else f"{v:.0f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
        ax.set_xticks(range(len(attacks)), [wrap(a) for a in attacks], fontsize=7)
        ax.set_yticks(range(len(defenses)), [wrap(d, 28) for d in defenses], fontsize=8)
        ax.set_title(f"{bb}: clean test accuracy (%), chance {chance:.0f}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return save(fig, stem)


def worst_case_bars(board: Leaderboard, stem: str | Path) -> list[Path]:
    """The score: worst-case accuracy per defense (bar, +-std), mean (dot), chance (dashed)."""
    s = board.ranked()
    if s.empty or s["worst_accuracy"].isna().all():
        return []
    fig = Figure(figsize=(7.5, 0.45 * len(s) + 1.4))
    ax = fig.subplots()
    y = np.arange(len(s))[::-1]
    colors = ["#8c8c8c" if r else "#4c72b0" for r in s["reference"]]
    hatches = ["" if c or r else "//" for c, r in zip(s["complete"], s["reference"])]
    bars = ax.barh(y, s["worst_accuracy"].fillna(0), xerr=s["worst_std"].fillna(0), color=colors,
                   edgecolor="black", linewidth=0.5)
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    ax.plot(s["mean_accuracy"], y, "o", color="#dd8452", label="mean over the grid")
    ax.axvline(float(s["chance"].iloc[0]), ls="--", color="black", lw=1, label="chance")
    labels = [d + ("" if c or r else " (incomplete)") for d, c, r in zip(s["defense"], s["complete"], s["reference"])]
    ax.set_yticks(y, labels, fontsize=8)
    for yi, r in zip(y, s.itertuples(index=False)):
        if r.worst_attack:
            ax.text(min(r.worst_accuracy, 100) + 1, yi, f"{r.worst_attack} / {r.worst_backbone}", va="center",
                    fontsize=7)
    ax.set_xlim(0, 130)
    ax.set_xlabel("worst-case clean test accuracy over attacks x backbones (%), lower is better")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return save(fig, stem)


def depth_frame(board: Leaderboard) -> pd.DataFrame:
    """The ``frozen_shallow`` rows with their frozen depth ``k`` (from the attack's resolved config)."""
    agg = board.aggregated
    rows = agg[(agg["attack_name"] == "frozen_shallow") & agg["k"].notna()]
    return rows.sort_values(["backbone", "defense", "k"]).reset_index(drop=True)


def freeze_depth(board: Leaderboard, stem: str | Path) -> list[Path]:
    """Accuracy versus the number of frozen stages k, one line per defense, one panel per backbone."""
    d = depth_frame(board)
    if d.empty or d.groupby("backbone")["k"].nunique().max() < 2:
        return []
    backbones = sorted(d["backbone"].unique())
    fig = Figure(figsize=(4.2 * len(backbones), 3.4))
    axes = fig.subplots(1, len(backbones), squeeze=False)[0]
    chance = float(board.scores["chance"].iloc[0])
    for ax, bb in zip(axes, backbones):
        sub = d[d["backbone"] == bb]
        for i, defense in enumerate(_order(board)):
            line = sub[sub["defense"] == defense]
            if len(line):
                ax.errorbar(line["k"], line["accuracy_mean"], yerr=line["accuracy_std"].fillna(0), marker="o",
                            capsize=2, color=PARADIGM_COLORS[i % len(PARADIGM_COLORS)], label=wrap(defense, 28))
        ax.axhline(chance, ls="--", color="black", lw=1)
        ax.set_xticks(sorted(sub["k"].unique()))
        ax.set_ylim(0, 100)
        ax.set_xlabel("frozen stages k (stem + first k stages)")
        ax.set_ylabel("clean test accuracy (%)")
        ax.set_title(bb, fontsize=9)
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save(fig, stem)


def grouped_bars(agg: pd.DataFrame, attacks: Sequence[str], defenses: Sequence[str], chance: float,
                 stem: str | Path, title: str) -> list[Path]:
    """Per backbone: bars of accuracy (+-std) per defense (groups) and attack (colours)."""
    if agg.empty:
        return []
    backbones = sorted(agg["backbone"].unique())
    width = 0.8 / max(len(attacks), 1)
    fig = Figure(figsize=(max(6.0, 0.5 * len(attacks) * len(defenses) + 2), 3.2 * len(backbones) + 0.6))
    axes = fig.subplots(len(backbones), 1, squeeze=False)[:, 0]
    x = np.arange(len(defenses))
    for ax, bb in zip(axes, backbones):
        sub = agg[agg["backbone"] == bb].set_index(["defense", "attack"])
        for j, attack in enumerate(attacks):
            vals = [sub["accuracy_mean"].get((d, attack), np.nan) for d in defenses]
            errs = [sub["accuracy_std"].get((d, attack), np.nan) for d in defenses]
            ax.bar(x + (j - (len(attacks) - 1) / 2) * width, np.nan_to_num(vals), width,
                   yerr=np.nan_to_num(errs), capsize=2, label=attack, color=PARADIGM_COLORS[j % len(PARADIGM_COLORS)],
                   edgecolor="black", linewidth=0.4)
        ax.axhline(chance, ls="--", color="black", lw=1, label="chance")
        ax.set_xticks(x, [wrap(d, 20) for d in defenses], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("clean test accuracy (%)")
        ax.set_title(f"{bb}", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, stem)


def table_figure(table: pd.DataFrame, values: pd.DataFrame, stem: str | Path, title: str) -> list[Path]:
    """A defense x column table drawn as a heatmap of ``values`` annotated with ``table``'s text."""
    fig = Figure(figsize=(1.5 * len(table.columns) + 3, 0.45 * len(table) + 1.5))
    ax = fig.subplots()
    m = values.to_numpy(dtype=float)
    im = ax.imshow(np.ma.masked_invalid(m), cmap=ACCURACY_CMAP, vmin=0, vmax=100, aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, table.iat[i, j], ha="center", va="center", fontsize=7,
                    color="white" if not math.isnan(m[i, j]) and m[i, j] < 60 else "black")
    ax.set_xticks(range(len(table.columns)), [wrap(str(c)) for c in table.columns], fontsize=7)
    ax.set_yticks(range(len(table.index)), [wrap(str(i), 28) for i in table.index], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return save(fig, stem)


def gallery(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], stem: str | Path, title: str) -> list[Path]:
    """``rows`` of (defense, protected images N x H x W x C in [0, 1], perturbations N x H x W x C):
    each row shows the protected images, then their perturbations rescaled to the row's largest."""
    if not rows:
        return []
    n = rows[0][1].shape[0]
    fig = Figure(figsize=(1.1 * 2 * n + 1.8, 1.15 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), 2 * n, squeeze=False)
    for i, (name, images, deltas) in enumerate(rows):
        scale = float(np.abs(deltas).max()) or 1.0
        for j in range(n):
            axes[i, j].imshow(images[j].clip(0, 1), interpolation="nearest")  # H x W x C
            axes[i, n + j].imshow((deltas[j] / (2 * scale) + 0.5).clip(0, 1), interpolation="nearest")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        axes[i, n].set_ylabel(f"x{0.5 / scale:.0f}" if scale < 1 else "", rotation=0, ha="right", va="center",
                              fontsize=7)
    axes[0, 0].set_title("protected images", loc="left", fontsize=8)
    axes[0, n].set_title("perturbation (amplified)", loc="left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, stem)


def write_plots(board: Leaderboard, out_dir: str | Path) -> dict[str, list[Path]]:
    """Per group: ``heatmap``, ``worst_case`` and (when a k sweep exists) ``freeze_depth``."""
    out: dict[str, list[Path]] = {}
    for group in board.groups():
        sub = board.subset(group)
        d = group_dir(out_dir, group)  # refuses a group name such as '../x'
        out[group] = heatmap(sub, d / "heatmap") + worst_case_bars(sub, d / "worst_case") + \
            freeze_depth(sub, d / "freeze_depth")
    return out
