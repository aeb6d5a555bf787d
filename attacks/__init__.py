"""Built-in attacks (victim paradigms). Each module registers itself in ``ATTACKS`` on import."""

from benchmark.registry import ATTACKS
from attacks import countermeasures, paradigms, scratch  # noqa: F401  (registration)

__all__ = ["ATTACKS"]
