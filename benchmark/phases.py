"""Where the time of a run goes: seconds per named phase (data, zoo pretraining, each defense's
generation, each attack), for ``uebench perf``.

Phases nest (a defense may pretrain a surrogate from the zoo); each second counts once, in the
innermost phase open at the time. The clock is one per process: cells run in a child process
(``--cell-timeout``) keep theirs there.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class PhaseClock:
    """Exclusive seconds per phase name."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [name, when its current stretch started], innermost last

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._open:  # the enclosing phase pauses
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            inner = self._open.pop()
            self.seconds[inner[0]] += now - inner[1]
            if self._open:
                self._open[-1][1] = now

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)

    def reset(self) -> None:
        self.seconds.clear()


PHASES = PhaseClock()
