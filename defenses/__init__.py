"""Built-in defenses (UE generators). Each module registers itself in ``DEFENSES`` on import."""

from benchmark.registry import DEFENSES
from defenses import clean, random_noise  # noqa: F401  (registration)

__all__ = ["DEFENSES"]
