"""Built-in defenses (UE generators). Each module registers itself in ``DEFENSES`` on import."""

from benchmark.registry import DEFENSES
from defenses import ar, bait, clean, cuda, em, lsp, ops, random_noise, rem, ssc, tap  # noqa: F401  (registration)

__all__ = ["DEFENSES"]
