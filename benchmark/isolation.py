"""Plugins get copies: nothing a plugin does to its input changes the data other cells use.

The executor keeps the clean training and test sets, the source pool and the protected sets to
itself; a plugin call is handed copies (uint8, so a copy is cheap), recorded in a ``Handout``. After
the call each copy is compared with its original: a plugin that wrote into its input fails its cell
with ``defense 'x' modified its input in place (the clean training images)``, and since the originals
never left the executor, later cells see the data unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import torch

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError


class IsolationError(UEBenchError):
    """A plugin changed the data it was handed."""


@dataclass(frozen=True)
class _Copy:
    what: str             # e.g. "the clean training"
    original: ImageSet
    handed: ImageSet
    images: torch.Tensor  # the tensors the copy was made with, to notice them being swapped as well
    labels: torch.Tensor


class Handout:
    """The copies of shared data handed to one plugin call, and their check afterwards.

    ``with Handout("defense 'x'") as h: plugin.perturb(h.copy(train, "the clean training"), ctx)``
    raises ``IsolationError`` on leaving the block if the plugin changed a copy (also when the call
    itself raised, since the change is the cause worth naming).
    """

    def __init__(self, plugin: str) -> None:
        self.plugin = plugin  # e.g. "defense 'x'"
        self._copies: list[_Copy] = []

    def copy(self, data: ImageSet, what: str) -> ImageSet:
        """A copy of ``data`` for the plugin (``what`` names it in the error, e.g. "the source pool")."""
        images, labels = data.images.clone(), data.labels.clone()
        handed = ImageSet(images, labels, data.classes, data.name)
        self._copies.append(_Copy(what, data, handed, images, labels))
        return handed

    def changed(self) -> list[str]:
        """What the plugin changed, e.g. ``["the clean training images"]``."""
        out = []
        for c in self._copies:
            for part, tensor, original in (("images", c.images, c.original.images),
                                           ("labels", c.labels, c.original.labels)):
                if getattr(c.handed, part) is not tensor or not torch.equal(tensor, original):
                    out.append(f"{c.what} {part}")
        return out

    def verify(self) -> None:
        changed = self.changed()
        if changed:
            raise IsolationError(f"{self.plugin} modified its input in place ({', '.join(changed)}); a plugin "
                                 f"must not write into the data it is handed (copy it first)")

    def __enter__(self) -> Handout:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None or issubclass(kind, Exception):
            try:
                self.verify()
            except IsolationError as err:
                raise err from exc
