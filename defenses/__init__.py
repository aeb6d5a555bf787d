"""Built-in defenses (UE generators). Each module registers itself in ``DEFENSES`` on import."""

from benchmark.registry import DEFENSES
from defenses import ar, clean, cuda, em, lsp, ops, random_noise, rem, ssc, tap  # noqa: F401  (registration)

# defenses/bait.py is not registered yet: its release is not deterministic for a seed (see tests/test_bait.py)

__all__ = ["DEFENSES"]
