"""Leaderboard tables: markdown, LaTeX and CSV (pandas + tabulate), generated from a ``Leaderboard``.

Per group (preset + data set): the ranking (worst-case accuracy, lower is better) and, per backbone,
the defense x attack matrix of seed-averaged clean test accuracy; when the grid has countermeasures,
one more matrix per base paradigm: the base itself and each countermeasure on it. A table names its
uninformative columns: attacks whose clean reference is below twice chance. With several seeds
every number is mean ± std over seeds (sample std, ddof=1) and a defense within noise of the one above
it shares its rank (``leaderboard.scores``); with one seed the tables say "1 seed: no spread". The
ranking shows each defense's certificate (``pass``, ``FAILED`` or ``-`` for none) and its surrogate's
threat model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd
from tabulate import tabulate

from attacks import ATTACKS
from leaderboard.scores import INFORMATIVE_FACTOR, REFERENCE, Leaderboard, budget_text, group_dir

LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
PM_TEX = " $\\pm$ "


def _isnan(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def acc_text(mean: float, std: float | None = None, pm: str = " ± ") -> str:
    """``12.3 ± 0.4`` (the std only when there are several seeds); ``-`` when there is no number."""
    if _isnan(mean):
        return "-"
    return f"{mean:.1f}" if _isnan(std) else f"{mean:.1f}{pm}{std:.1f}"


def num_text(v: float, fmt: str = ".2f") -> str:
    return "-" if _isnan(v) else format(v, fmt)


def certificate_text(certified: object) -> str:
    """``pass`` (every seed's certificate passed), ``FAILED`` (one failed) or ``-`` (the defense has none)."""
    if certified is None or (isinstance(certified, float) and math.isnan(certified)):
        return "-"
    return "pass" if bool(certified) else "FAILED"


CERTIFICATE_FAILED_NOTE = "certificate failed: not ranked"


def certificate_failed(certified: object) -> bool:
    return certificate_text(certified) == "FAILED"


def threat_text(norm: str, budget: float, granularity: str) -> str:
    """``linf 8/255 class``; ``none`` for the reference."""
    parts = [norm] if norm != "none" else []
    parts += [budget_text(norm, budget)] if norm != "none" else []
    parts += [granularity] if granularity != "none" else []
    return " ".join(parts) or "none"


def spread_text(seeds: int) -> str:
    """What the ± means: ``mean ± std over 3 seeds (sample std, ddof=1)``, or ``1 seed: no spread``."""
    return f"mean ± std over {seeds} seeds (sample std, ddof=1)" if seeds > 1 else f"{seeds} seed: no spread"


def board_seeds(board: Leaderboard) -> int:
    """The number of seeds of a one-group board's grid."""
    return int(board.grid["seed"].nunique()) if len(board.grid) else 0


# the surrogate's threat model as shown: "-" for a defense without a zoo surrogate, "?" when not recorded
SURROGATE_TEXT = {"white-box": "white-box", "transfer": "transfer", "none": "-", "": "?"}
SURROGATE_NOTE = ("Surrogate = whose weights the defense's surrogate started from: the victims' zoo weights "
                  "(white-box, the papers' setting), weights pretrained independently (transfer: another seed, the "
                  "other half of the source pool), - (no pretrained surrogate) or ? (not recorded).")
NOISE_NOTE = ("A defense whose worst case differs from the one ranked above it by less than sqrt(std1² + std2²) "
              "is within noise of it and shares its rank.")


def surrogate_text(value: object) -> str:
    return SURROGATE_TEXT.get(value if isinstance(value, str) else "", "?")


def ranking_frame(board: Leaderboard, pm: str = " ± ") -> pd.DataFrame:
    """The display table of one group (or all groups, with a group column)."""
    rows = []
    several = len(board.groups()) > 1
    for s in board.ranked().itertuples(index=False):
        notes = [s.flag] if s.flag else []
        if certificate_failed(s.certified):
            notes.append(CERTIFICATE_FAILED_NOTE)
        if s.tied_with:
            notes.append(f"within noise of {s.tied_with}")
        if s.interpretation:
            notes.append("interpretation")
        row = {
            "rank": "-" if _isnan(s.rank) else str(int(s.rank)),
            "defense": s.defense,
            "method": s.title or "",
            "venue": " ".join(str(x) for x in (s.venue, s.year or "") if x),
            "threat model": threat_text(s.norm, s.budget, s.granularity),
            "surrogate": surrogate_text(s.surrogate_threat_model),
            "worst-case acc. (%)": acc_text(s.worst_accuracy, s.worst_std, pm),
            "worst case": f"{s.worst_attack} / {s.worst_backbone}" if s.worst_attack else "-",
            "mean acc. (%)": acc_text(s.mean_accuracy, s.mean_std, pm),
            "seeds": str(s.seeds),
            "min protection": num_text(s.min_protection),
            "certificate": certificate_text(s.certified),
            "cells": f"{s.cells_ok}/{s.cells_expected}",
            "note": "; ".join(notes),
        }
        rows.append({"group": s.group, **row} if several else row)
    return pd.DataFrame(rows)


def matrix_frame(board: Leaderboard, backbone: str, pm: str = " ± ",
                 attacks: list[str] | None = None) -> pd.DataFrame:
    """Defense x attack accuracy (seeds averaged) of one group and backbone; ``failed`` / ``-`` (missing).
    ``attacks``: these columns only (default: every attack of the grid)."""
    agg = board.aggregated[board.aggregated["backbone"] == backbone]
    if attacks is None:
        attacks = list(dict.fromkeys(board.grid[board.grid["backbone"] == backbone]["attack"]))
    order = list(dict.fromkeys(board.ranked()["defense"]))
    rows = []
    for defense in order:
        row = {"defense": defense}
        for attack in attacks:
            hit = agg[(agg["defense"] == defense) & (agg["attack"] == attack)]
            if hit.empty:
                row[attack] = "-"
            elif hit["seeds_ok"].iloc[0] == 0:
                row[attack] = "failed"
            else:
                row[attack] = acc_text(hit["accuracy_mean"].iloc[0], hit["accuracy_std"].iloc[0], pm)
        rows.append(row)
    return pd.DataFrame(rows, columns=["defense", *attacks])


def attack_bases(board: Leaderboard) -> dict[str, str]:
    """Attack label -> the paradigm it modifies, for the attacks whose plugin declares one (a countermeasure's
    ``base``, ``Attack.composes``), read from the configs the cells recorded."""
    out = {}
    for label, cfg in zip(board.cells["attack"], board.cells["attack_config"]):
        name = cfg.get("name", "") if isinstance(cfg, dict) else ""
        composes = getattr(ATTACKS.get(name), "composes", "") if name in ATTACKS else ""
        if composes and cfg.get(composes):
            out[label] = str(cfg[composes])
    return out


def uninformative_columns(board: Leaderboard, backbone: str, attacks: list[str]) -> dict[str, float]:
    """Attack -> its clean reference, for the attacks whose clean reference is below twice chance: the victim
    does not learn even clean data under them in this protocol, so their column says nothing of the defenses."""
    agg = board.aggregated[(board.aggregated["backbone"] == backbone) & (board.aggregated["defense"] == REFERENCE)]
    clean = agg.set_index("attack")
    return {a: float(clean.at[a, "accuracy_mean"]) for a in attacks
            if a in clean.index and clean.at[a, "accuracy_mean"] < INFORMATIVE_FACTOR * clean.at[a, "chance"]}


def uninformative_note(board: Leaderboard, backbone: str, attacks: list[str]) -> str:
    """One sentence naming the uninformative columns of a table (``uninformative_columns``), or ''."""
    found = uninformative_columns(board, backbone, attacks)
    if not found:
        return ""
    listed = ", ".join(f"{a} ({v:.1f} %)" for a, v in found.items())
    return (f"Uninformative here: {listed}. Their clean reference is below twice chance: the victim does not "
            "learn clean data under them in this protocol, so a low accuracy there is no protection.")


def countermeasure_columns(board: Leaderboard, backbone: str) -> dict[str, list[str]]:
    """Per base paradigm: its attack columns, the base itself (when in the grid) then each countermeasure on it."""
    bases = attack_bases(board)
    attacks = list(dict.fromkeys(board.grid[board.grid["backbone"] == backbone]["attack"]))
    names = dict(zip(board.aggregated["attack"], board.aggregated["attack_name"]))
    return {base: [a for a in attacks if a not in bases and names.get(a) == base]
            + [a for a in attacks if bases.get(a) == base]
            for base in dict.fromkeys(bases[a] for a in attacks if a in bases)}


def countermeasure_frames(board: Leaderboard, backbone: str, pm: str = " ± ") -> dict[str, pd.DataFrame]:
    """Per base paradigm: defense x (the base itself, when in the grid, then each countermeasure on it)."""
    return {base: matrix_frame(board, backbone, pm, columns)
            for base, columns in countermeasure_columns(board, backbone).items()}


def markdown(df: pd.DataFrame) -> str:
    esc = df.map(lambda v: str(v).replace("|", "\\|"))
    esc.columns = [str(c).replace("|", "\\|") for c in df.columns]
    return tabulate(esc, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex(df: pd.DataFrame) -> str:
    """A booktabs tabular; cell text is escaped, except the ``$\\pm$`` that ``PM_TEX`` puts in accuracies."""
    def cell(v: object) -> str:
        return PM_TEX.join(latex_escape(part) for part in str(v).split(PM_TEX))

    lines = [f"\\begin{{tabular}}{{{'l' * len(df.columns)}}}", "\\toprule",
             " & ".join(latex_escape(c) for c in df.columns) + " \\\\", "\\midrule"]
    lines += [" & ".join(cell(v) for v in row) + " \\\\" for row in df.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def backbones(board: Leaderboard) -> list[str]:
    return sorted(board.grid["backbone"].unique())


def group_markdown(board: Leaderboard) -> str:
    """The markdown of one group: title, protocol, ranking, one matrix per backbone."""
    (group,) = board.groups()
    s = board.scores.iloc[0]
    lines = [f"## {group}: {board.dataset_text()}, preset {s.preset}", ""]
    info = board.presets.get(s.preset, {})
    for key in ("description", "protocol_note"):
        if info.get(key):
            lines += [f"{key.replace('_', ' ').capitalize()}: {info[key]}", ""]
    seeds = board_seeds(board)
    noise = f" {NOISE_NOTE}" if seeds > 1 else ""
    lines += ["Worst case = the highest clean test accuracy (%) that any attack x backbone reaches against the "
              f"defense (lower is better); chance = {s.chance:.1f} %. Accuracies: {spread_text(seeds)}.{noise} "
              "Incomplete grids are not ranked. Certificate = whether the defense reached its own objective on the "
              "released images (pass, FAILED, or - when it reports none); a defense whose certificate failed is not "
              f"ranked. {SURROGATE_NOTE}", "",
              markdown(ranking_frame(board)), ""]
    for bb in backbones(board):
        frame = matrix_frame(board, bb)
        note = uninformative_note(board, bb, list(frame.columns[1:]))
        lines += [f"### {bb}: clean test accuracy (%), {spread_text(seeds)}", "", markdown(frame), ""]
        lines += [note, ""] if note else []
    for bb in backbones(board):
        for base, frame in countermeasure_frames(board, bb).items():
            note = uninformative_note(board, bb, list(frame.columns[1:]))
            lines += [f"### {bb}: countermeasures on {base}, clean test accuracy (%), {spread_text(seeds)}", "",
                      markdown(frame), ""]
            lines += [note, ""] if note else []
    return "\n".join(lines)


def scores_csv(board: Leaderboard) -> pd.DataFrame:
    ranked = board.ranked()
    return ranked.assign(certificate=[certificate_text(c) for c in ranked["certified"]])


def cells_csv(board: Leaderboard) -> pd.DataFrame:
    return board.aggregated.sort_values(["group", "defense", "attack", "backbone"]).reset_index(drop=True)


def write_tables(board: Leaderboard, out_dir: str | Path) -> list[Path]:
    """Per group: ``leaderboard.md``, ``leaderboard.tex``, ``leaderboard.csv`` (scores), ``cells.csv``."""
    out_dir = Path(out_dir)
    written = []
    for group in board.groups():
        sub = board.subset(group)
        d = group_dir(out_dir, group)  # refuses a group name such as '../x'
        d.mkdir(parents=True, exist_ok=True)
        spread = spread_text(board_seeds(sub))
        tex = [f"% {group}: ranking (generated by uebench; do not edit); {spread}", latex(ranking_frame(sub, PM_TEX))]
        for bb in backbones(sub):
            tex += [f"% {group} / {bb}: clean test accuracy (%), {spread}", latex(matrix_frame(sub, bb, PM_TEX))]
        for bb in backbones(sub):
            for base, frame in countermeasure_frames(sub, bb, PM_TEX).items():
                tex += [f"% {group} / {bb}: countermeasures on {base}, clean test accuracy (%), {spread}",
                        latex(frame)]
        outputs: dict[str, Callable[[], str]] = {
            "leaderboard.md": lambda: group_markdown(sub) + "\n",
            "leaderboard.tex": lambda: "\n\n".join(tex) + "\n",
            "leaderboard.csv": lambda: scores_csv(sub).to_csv(index=False, float_format="%.4f"),
            "cells.csv": lambda: cells_csv(sub).to_csv(index=False, float_format="%.4f"),
        }
        for name, make in outputs.items():
            (d / name).write_text(make())
            written.append(d / name)
    return written
