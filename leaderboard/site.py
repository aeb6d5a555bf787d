"""The leaderboard site: one self-contained ``index.html``.

No external assets: styles and a few lines of script are inline, plots are inlined as base64 PNGs,
and a Content-Security-Policy forbids loading anything else. Every text that comes from a plugin or
a results store is HTML-escaped; links are made only from https:// URLs and arXiv ids
(``benchmark.plugins.paper_url``).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from benchmark import __version__
from leaderboard.scores import Leaderboard, budget_text
from leaderboard.tables import (CERTIFICATE_FAILED_NOTE, NOISE_NOTE, SURROGATE_NOTE, acc_text, backbones,
                               board_seeds, certificate_failed, certificate_text, countermeasure_columns,
                               matrix_frame, spread_text, surrogate_text, uninformative_note)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1280px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:13px}
th,td{border-bottom:1px solid #ddd;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.reference td{color:#666;font-style:italic}tr.incomplete td{background:#fff6e5}
.badge{display:inline-block;font-size:11px;padding:0 .4em;border-radius:3px;background:#e8e0f5;color:#4b2a85}
.flag{color:#a15c00}.fail{color:#b00020;font-weight:600}
.small{color:#666;font-size:12px}img{max-width:100%;height:auto;border:1px solid #eee}
"""

# Click a header to sort by it (again to reverse). Cells sort by data-sort (numbers before text).
SCRIPT = """
function sortKey(td){var v=td.getAttribute('data-sort');if(v===null){v=td.textContent;}
var n=Number(v);return(v!==''&&isFinite(n))?[0,n]:[1,v.toLowerCase()];}
function sortBy(th){var table=th.closest('table'),body=table.tBodies[0],col=th.cellIndex;
var asc=th.getAttribute('aria-sort')!=='ascending';
table.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
th.setAttribute('aria-sort',asc?'ascending':'descending');
var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=sortKey(a.cells[col]),y=sortKey(b.cells[col]);
var c=x[0]-y[0]||(x[1]<y[1]?-1:x[1]>y[1]?1:0);return asc?c:-c;});
rows.forEach(function(r){body.appendChild(r);});}
document.querySelectorAll('table.sortable th').forEach(function(th){
th.addEventListener('click',function(){sortBy(th);});});
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def td(text: Any, sort: Any = None, cls: str = "", raw: bool = False) -> str:
    attrs = f' data-sort="{esc(sort)}"' if sort is not None else ""
    attrs += f' class="{cls}"' if cls else ""
    return f"<td{attrs}>{text if raw else esc(text)}</td>"


def table(headers: Iterable[str], rows: Iterable[str], ident: str) -> str:
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    return (f'<table class="sortable" id="{esc(ident)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def method_cell(s: Any) -> str:
    title = esc(s.title or s.defense_name)
    link = f'<a href="{esc(s.paper_url)}" rel="noopener noreferrer">{title}</a>' if s.paper_url else title
    extra = f'<br><span class="small">{esc(s.authors)}</span>' if s.authors else ""
    badge = ' <span class="badge" title="the project\'s reading of an incomplete source">interpretation</span>' \
        if s.interpretation else ""
    return link + badge + extra


def ranking_table(board: Leaderboard, group: str) -> str:
    headers = ["rank", "defense", "method", "venue", "year", "norm", "budget", "granularity", "surrogate",
               "worst-case acc. (%)", "worst case", "mean acc. (%)", "seeds", "min protection", "certificate",
               "cells", "note"]
    rows = []
    for s in board.ranked().itertuples(index=False):
        cls = "reference" if s.reference else ("" if s.complete else "incomplete")
        noise = f"within noise of {s.tied_with}" if s.tied_with else ""
        note = "; ".join(x for x in (s.flag, CERTIFICATE_FAILED_NOTE if certificate_failed(s.certified) else "", noise)
                         if x)
        rank = "" if math.isnan(s.rank) else int(s.rank)
        cells = [
            td(rank if rank != "" else "-", rank, "num"),
            td(f"<code>{esc(s.defense)}</code>", s.defense, raw=True),
            td(method_cell(s), s.title, raw=True),
            td(s.venue), td(s.year or "", s.year or "", "num"), td(s.norm),
            td(budget_text(s.norm, s.budget), _num(s.budget), "num"), td(s.granularity),
            td(surrogate_text(s.surrogate_threat_model)),
            td(acc_text(s.worst_accuracy, s.worst_std), _num(s.worst_accuracy), "num"),
            td(f"{s.worst_attack} / {s.worst_backbone}" if s.worst_attack else "-"),
            td(acc_text(s.mean_accuracy, s.mean_std), _num(s.mean_accuracy), "num"),
            td(s.seeds, s.seeds, "num"),
            td("-" if math.isnan(s.min_protection) else f"{s.min_protection:.2f}", _num(s.min_protection), "num"),
            certificate_cell(s),
            td(f"{s.cells_ok}/{s.cells_expected}", s.cells_ok, "num"),
            td(f'<span class="flag">{esc(note)}</span>' if note else "", note, raw=True),
        ]
        rows.append(f'<tr class="{cls}">{"".join(cells)}</tr>' if cls else f"<tr>{''.join(cells)}</tr>")
    return table(headers, rows, f"ranking-{group}")


def certificate_cell(s: Any) -> str:
    """``pass`` / ``FAILED`` / ``-``, with the measured checks of every seed as the tooltip."""
    text = certificate_text(s.certified)
    title = f' title="{esc(s.certificate_checks)}"' if s.certificate_checks else ""
    inner = f'<span class="fail"{title}>{esc(text)}</span>' if text == "FAILED" else f"<span{title}>{esc(text)}</span>"
    return td(inner, text, raw=True)


def matrix_table(board: Leaderboard, ident: str, backbone: str, attacks: list[str] | None = None) -> str:
    """Defense x attack (default: every attack of the backbone's grid), sortable by the accuracy itself,
    followed by the note naming its uninformative columns (``tables.uninformative_note``), if any."""
    m = matrix_frame(board, backbone, attacks=attacks)
    agg = board.aggregated[board.aggregated["backbone"] == backbone].set_index(["defense", "attack"])
    rows = []
    for r in m.itertuples(index=False):
        cells = [td(f"<code>{esc(r[0])}</code>", r[0], raw=True)]
        for attack, text in zip(m.columns[1:], r[1:]):
            value = agg["accuracy_mean"].get((r[0], attack), float("nan"))
            cells.append(td(text, _num(value), "num"))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = uninformative_note(board, backbone, list(m.columns[1:]))
    return table(m.columns, rows, ident) + (f'<p class="small flag">{esc(note)}</p>' if note else "")


def image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img alt="{esc(Path(path).stem)}" src="data:image/png;base64,{data}"></figure>'


def section(board: Leaderboard, group: str, images: Iterable[Path]) -> str:
    s = board.scores.iloc[0]
    info = board.presets.get(s.preset, {})
    parts = [f'<section id="{esc(group)}"><h2>{esc(group)}: {esc(board.dataset_text())} '
             f'<span class="small">(preset {esc(s.preset)}, chance {s.chance:.1f} %)</span></h2>']
    for key in ("description", "protocol_note"):
        if info.get(key):
            parts.append(f"<p><b>{esc(key.replace('_', ' '))}:</b> {esc(info[key])}</p>")
    seeds = board_seeds(board)
    noise = f" {NOISE_NOTE}" if seeds > 1 else ""
    parts.append(f'<p class="small">Accuracies: {esc(spread_text(seeds))}.{esc(noise)}</p>')
    parts.append(ranking_table(board, group))
    for bb in backbones(board):
        parts.append(f"<h3>{esc(bb)}: clean test accuracy (%), {esc(spread_text(seeds))}</h3>"
                     f"{matrix_table(board, f'cells-{group}-{bb}', bb)}")
    for bb in backbones(board):
        for base, columns in countermeasure_columns(board, bb).items():
            parts.append(f"<h3>{esc(bb)}: countermeasures on {esc(base)}, clean test accuracy (%), "
                         f"{esc(spread_text(seeds))}</h3>"
                         f"{matrix_table(board, f'countermeasures-{group}-{bb}-{base}', bb, columns)}")
    parts += [image(p) for p in images if Path(p).suffix == ".png"]
    parts.append("</section>")
    return "\n".join(parts)


def render(board: Leaderboard, images: Mapping[str, Iterable[Path]] | None = None) -> str:
    groups = board.groups()
    nav = " | ".join(f'<a href="#{esc(g)}">{esc(g)}</a>' for g in groups)
    body = "\n".join(section(board.subset(g), g, (images or {}).get(g, [])) for g in groups)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>uebench leaderboard</title><style>{STYLE}</style></head>
<body>
<h1>uebench leaderboard</h1>
<p>Unlearnable examples (defenses) against victims that train from scratch, linear-probe, freeze shallow
layers or fine-tune pretrained backbones (attacks). Each number is the clean test accuracy (%) of the
victim trained on the protected data. A defense's score is its <b>worst case</b>: the highest accuracy
any attack x backbone reaches against it (lower is better); the mean over the grid stands beside it.
Protection = (clean - acc) / (clean - chance), left out where clean stays below twice chance.
Defenses with missing or failed cells are flagged and not ranked. The certificate column says whether
the defense reached its own objective on the released images (e.g. its surrogate's error, or whether
the perturbation alone is a learnable shortcut): pass, FAILED (the cells still count), or - when the defense reports none; hover it for the numbers. With
several seeds, numbers are mean ± std over seeds (sample std, ddof=1) and a defense within noise of the
one ranked above it shares its rank. {esc(SURROGATE_NOTE)} Click a column header to sort.</p>
<nav>{nav}</nav>
{body}
<p class="small">Generated by uebench {esc(__version__)}; do not edit.</p>
<script>{SCRIPT}</script>
</body></html>
"""


def write_site(board: Leaderboard, out_dir: str | Path, images: Mapping[str, Iterable[Path]] | None = None) -> Path:
    path = Path(out_dir) / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render(board, images), encoding="utf-8")
    tmp.replace(path)
    return path
