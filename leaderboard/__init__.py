"""The leaderboard: results (a store, or the committed entries) -> scores -> tables, plots, one HTML page.

| module | role |
|---|---|
| ``scores`` | cells from a store, seeds averaged, protection, worst case, completeness flags, ranks |
| ``entries`` | one JSON per defense and preset (``entries/<preset>/<defense>.json``), written and read back |
| ``tables`` | markdown, LaTeX and CSV |
| ``plots`` | heatmap, worst-case bars, accuracy versus frozen depth, figure helpers (matplotlib, Agg) |
| ``site`` | the self-contained, sortable ``index.html`` |
| ``figures`` | ``reproduce FIGURE``: plan and run the cells a paper figure needs, then draw it |
| ``submit`` | ``submit my_ue.py``: validate a generator plugin, run its cells, write its entry, rank it |
| ``build`` | store or planned cells -> board (``cells_board``, for run, submit, reproduce) -> published files |
| ``cli`` | the ``leaderboard``, ``submit`` and ``reproduce`` commands of ``run_benchmark.py`` (argparse glue) |
"""
