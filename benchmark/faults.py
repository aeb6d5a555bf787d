"""Test-only fault injection: make the process kill itself at a named point.

``UEBENCH_TEST_KILL_AT=point:n`` (e.g. ``store_write:2``) sends SIGKILL to this process the ``n``-th
time it reaches ``kill_point(point)``. Unset (always, outside the crash tests) it does nothing.
Points: ``generate`` (a protected set or a zoo checkpoint is computed, not yet cached), ``train_step`` (each
optimizer step), ``store_write`` (a record is inserted, its transaction not yet committed),
``cache_write`` (a cache entry's temporary file is written, not yet renamed).
"""

from __future__ import annotations

import os
import signal

from benchmark.errors import UEBenchError

ENV = "UEBENCH_TEST_KILL_AT"
POINTS = ("generate", "train_step", "store_write", "cache_write")
_reached: dict[str, int] = {}


def kill_point(point: str) -> None:
    """SIGKILL this process if ``UEBENCH_TEST_KILL_AT`` names ``point`` and this is its n-th visit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name not in POINTS or not count.isdigit() or int(count) < 1:
        raise UEBenchError(f"{ENV}={spec!r} must be POINT:N with N >= 1; points: {', '.join(POINTS)}")
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
