"""The closed sets of names that the engine and the plugins share, as ``Literal`` types checked in one place.

| type | values | meaning |
|---|---|---|
| ``Norm`` | linf, l2, l0, none | what a defense's budget is measured in |
| ``Granularity`` | class, sample, none | one perturbation per class, one per image, or none |
| ``WeightSource`` | random, supervised, sf, timm, file | where the zoo takes a backbone's weights from |
| ``PretrainedSource`` | supervised, sf | the sources the zoo pretrains itself, on the data set's source pool |
| ``Surrogate`` | scratch, supervised, sf | a surrogate's init (``scratch`` is the zoo source ``random``) |

The tuples (``NORMS``, ...) are read from the types, so each set is written once; ``check_choice``
is the one check, and its error names the bad value and lists the valid ones.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from benchmark.errors import UEBenchError

Norm = Literal["linf", "l2", "l0", "none"]
Granularity = Literal["class", "sample", "none"]
WeightSource = Literal["random", "supervised", "sf", "timm", "file"]
PretrainedSource = Literal["supervised", "sf"]
Surrogate = Literal["scratch", "supervised", "sf"]

NORMS: tuple[str, ...] = get_args(Norm)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
WEIGHT_SOURCES: tuple[str, ...] = get_args(WeightSource)
PRETRAINED_SOURCES: tuple[str, ...] = get_args(PretrainedSource)
SURROGATES: tuple[str, ...] = get_args(Surrogate)


def check_choice(where: str, name: str, value: Any, choices: Any) -> None:
    """Raise unless ``value`` is one of ``choices`` (a ``Literal`` type or a tuple of values)."""
    valid = get_args(choices) or tuple(choices)
    if value not in valid:
        raise UEBenchError(f"{where}: {name}={value!r} must be one of {valid}")

