"""Plugin contracts: ``Defense`` (a UE generator) and ``Attack`` (a victim training paradigm).

A plugin is a frozen dataclass of hyperparameters (the only place defaults live) plus one private
method. The base classes own the public methods and their checks: a defense's output is verified
here, by the engine, on the uint8 bytes it would publish.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from benchmark.choices import Granularity, Norm, check_choice
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.registry import PLUGIN_NAME
from benchmark.training import TrainConfig

if TYPE_CHECKING:
    from benchmark.zoo import Zoo

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What the engine hands a plugin: device, seed, caches and the data set's source pool."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache_dir: Path | None = None
    progress: bool = False
    dataset_key: dict = field(default_factory=dict)  # identifies the data set, for cache keys
    source: ImageSet | None = None                   # the zoo's pretraining pool (disjoint from train/test)
    zoo: Zoo | None = None                           # pretrained backbones for this data set

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the context seed (``offset`` separates independent streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)


@dataclass(frozen=True)
class ThreatModel:
    norm: Norm                # linf | l2 | l0 | none
    budget: float             # in [0, 1] pixel units for linf and l2 (per image), pixels for l0; 0 for none
    granularity: Granularity  # class | sample | none

    def __post_init__(self) -> None:
        check_choice("threat model", "norm", self.norm, Norm)
        check_choice("threat model", "granularity", self.granularity, Granularity)


@dataclass(frozen=True)
class PerturbationStats:
    """The measured size of a perturbation, on the uint8 images."""

    linf: float      # max over images, in /255 units
    l2_mean: float   # mean over images of the per-image L2 norm, [0, 1] pixel units
    l2_max: float
    l0_max: int      # max over images of pixel positions that changed (any channel)
    l0_mean: float


def perturbation_stats(clean: torch.Tensor, protected: torch.Tensor) -> PerturbationStats:
    diff = protected.to(torch.int16) - clean.to(torch.int16)
    n = diff.shape[0]
    flat = diff.reshape(n, -1).float() / 255.0
    l2 = flat.norm(dim=1)
    l0 = (diff != 0).any(dim=1).reshape(n, -1).sum(dim=1)
    return PerturbationStats(
        linf=float(diff.abs().max()) if n else 0.0, l2_mean=float(l2.mean()) if n else 0.0,
        l2_max=float(l2.max()) if n else 0.0, l0_max=int(l0.max()) if n else 0, l0_mean=float(l0.float().mean()) if n else 0.0,
    )


OPS = ("<=", ">=")


@dataclass(frozen=True)
class Check:
    """One measured number of a certificate and the threshold it must meet (``value op threshold``)."""

    name: str         # what was measured, e.g. "surrogate_error" (a fraction unless the name says otherwise)
    value: float
    threshold: float
    op: str = "<="    # <= | >=

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise UEBenchError(f"certificate check {self.name!r}: op={self.op!r} must be one of {OPS}")

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

    def describe(self) -> str:
        return f"{self.name} {self.value:.3g} {self.op} {self.threshold:.3g} {'pass' if self.passed else 'FAIL'}"


@dataclass(frozen=True)
class Certificate:
    """The numbers that show a defense reached its own objective, measured on the released uint8 bytes.

    ``checks`` carry thresholds and decide the verdict; ``info`` holds further measured numbers that
    have no threshold (e.g. the hit rate of each curriculum stage). A failed certificate is a result:
    the protected set is still used, and the leaderboard shows the failure.
    """

    checks: tuple[Check, ...]
    info: tuple[tuple[str, float], ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def describe(self) -> str:
        parts = [c.describe() for c in self.checks] + [f"{k} {v:.3g}" for k, v in self.info]
        return f"{'passed' if self.passed else 'FAILED'}: " + "; ".join(parts)

    def compact(self) -> str:
        """The checks in one short line: ``surrogate_error=0.004<=0.01; shortcut_accuracy=0.99>=0.9``."""
        return "; ".join(f"{c.name}={c.value:.3g}{c.op}{c.threshold:.3g}" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed,
                "checks": [{"name": c.name, "value": c.value, "threshold": c.threshold, "op": c.op,
                            "passed": c.passed} for c in self.checks],
                "info": {k: v for k, v in self.info}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Certificate:
        def number(v: Any) -> float:  # JSON has no NaN: entries store an unmeasured number as null
            return float("nan") if v is None else float(v)

        checks = tuple(Check(c["name"], number(c["value"]), number(c["threshold"]), c.get("op", "<="))
                       for c in data.get("checks", []))
        return cls(checks, tuple((str(k), number(v)) for k, v in (data.get("info") or {}).items()))


def certificate(*checks: Check, **info: float) -> Certificate:
    """``certificate(Check(...), Check(...), rounds=3)``: the checks plus named extra numbers."""
    return Certificate(tuple(checks), tuple((k, float(v)) for k, v in info.items()))


@dataclass(frozen=True)
class Protected:
    """What a defense returns: the images it would publish and the certificate of its own objective
    (``None`` for defenses that have no objective to reach, such as ``clean``)."""

    data: ImageSet
    certificate: Certificate | None = None


@dataclass(frozen=True)
class Fitted:
    """What an attack returns: the trained classifier and a report of its training."""

    model: nn.Module
    train_accuracy: float | None = None     # % on the (protected) training batches of the last epoch
    epochs: int = 0                         # epochs run
    trainable_parameters: int | None = None


# What plugin metadata may hold, since it becomes page text and links: printable text of a bounded
# length, and a paper that is an arXiv id or an https:// URL (not http://, javascript:, data:, ...).
ARXIV_ID = re.compile(r"\d{4}\.\d{4,5}(v\d+)?")
HTTPS_URL = re.compile(r"https://[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+(:\d{1,5})?(/[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%-]*)?")
TEXT_LIMITS = {"title": 200, "venue": 100, "authors": 500, "paper": 300}  # characters


def paper_url(paper: str) -> str:
    """The link of a plugin's ``paper`` field: an arXiv id becomes its abs page, an https URL stays as it
    is, anything else gives no link (``""``)."""
    paper = (paper or "").strip() if isinstance(paper, str) else ""
    if ARXIV_ID.fullmatch(paper):
        return f"https://arxiv.org/abs/{paper}"
    if len(paper) <= TEXT_LIMITS["paper"] and HTTPS_URL.fullmatch(paper):
        return paper
    return ""


def info_problems(info: dict[str, Any]) -> list[str]:
    """What is wrong with a plugin's metadata (``Plugin.plugin_info()``), one phrase per field; empty
    metadata is fine here (``submit`` asks for more)."""
    problems = []
    name = info.get("name")
    if not isinstance(name, str) or not PLUGIN_NAME.fullmatch(name):
        problems.append(f"name={name!r} must be lower-case ASCII letters, digits and '_', at most 48 characters")
    for key, limit in TEXT_LIMITS.items():
        value = info.get(key, "")
        if not isinstance(value, str):
            problems.append(f"{key} must be a string, got {type(value).__name__}")
        elif len(value) > limit or not value.isprintable():
            problems.append(f"{key}={value[:40]!r}{'...' if len(value) > 40 else ''} must be at most {limit} "
                            f"printable characters (no newlines or control characters), got {len(value)}")
    paper = info.get("paper", "")
    if isinstance(paper, str) and paper.strip() and not paper_url(paper):
        problems.append(f"paper={paper[:60]!r} must be an arXiv id like '2101.04898' or an https:// URL")
    year = info.get("year", 0)
    if not isinstance(year, int) or isinstance(year, bool) or not (year == 0 or 1900 <= year <= 2100):
        problems.append(f"year={year!r} must be an integer in [1900, 2100] (0: unknown)")
    version = info.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        problems.append(f"version={version!r} must be an integer >= 0")
    if not isinstance(info.get("interpretation", False), bool):
        problems.append(f"interpretation={info.get('interpretation')!r} must be True or False")
    return problems


class Plugin:
    """Metadata every plugin carries to the leaderboard (class attributes, not hyperparameters)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""        # arXiv id (e.g. "2101.04898") or an https:// URL
    venue: ClassVar[str] = ""
    year: ClassVar[int] = 0
    authors: ClassVar[str] = ""
    interpretation: ClassVar[bool] = False  # True when the method is the project's reading of an incomplete source
    version: ClassVar[int] = 1              # bump when the code changes what the plugin computes

    def zoo_sources(self) -> frozenset[str]:
        """The zoo sources (``supervised``, ``sf``, ``timm``, ``file``) this configured plugin takes weights
        from; cell and protected-set keys include exactly the recipes of these. A plugin that declares
        nothing is taken to use ``supervised`` (whose recipe every key includes anyway): a plugin that
        reaches the ``sf`` zoo must say so, or its cells are not recomputed when the sf recipe changes."""
        return frozenset({"supervised"})

    def zoo_backbones(self, backbone: str | None) -> frozenset[str] | None:
        """The backbones this configured plugin takes zoo weights for in a cell of ``backbone`` (``None``:
        a protected set, which has no backbone): an attack's is the cell's, a defense's its surrogate's.
        Keys include those backbones' own zoo recipes (a preset's ``zoo["supervised@<backbone>"]``) of the
        sources in ``zoo_sources``; ``None`` (not declared) is taken to mean any backbone, so every
        per-backbone recipe of those sources enters the keys."""
        return None

    @classmethod
    def plugin_info(cls) -> dict[str, Any]:
        return {"name": cls.name, "title": cls.title, "paper": cls.paper, "venue": cls.venue, "year": cls.year,
                "authors": cls.authors, "interpretation": cls.interpretation, "version": cls.version}

    @classmethod
    def check_info(cls) -> None:
        """Refuse metadata that may not become a file name, page text or a link (``info_problems``)."""
        problems = info_problems(cls.plugin_info())
        if problems:
            raise UEBenchError(f"plugin {cls.name!r} ({cls.__qualname__}): bad metadata: " + "; ".join(problems))


@dataclass(frozen=True)
class Defense(Plugin):
    """A UE generator: clean uint8 images in, protected uint8 images out, within a declared budget.

    Subclasses set ``norm`` and ``granularity`` (class attributes) and implement ``_perturb``. A field
    named ``eps`` is the budget unless ``threat_model`` is overridden.
    """

    norm: ClassVar[Norm] = "none"
    granularity: ClassVar[Granularity] = "none"

    def threat_model(self) -> ThreatModel:
        budget = float(getattr(self, "eps", 0.0)) if self.norm != "none" else 0.0
        granularity = getattr(self, "mode", self.granularity)
        return ThreatModel(self.norm, budget, granularity)

    def metadata(self) -> dict[str, Any]:
        tm = self.threat_model()
        return {**self.plugin_info(), "norm": tm.norm, "budget": tm.budget,
                "granularity": tm.granularity}

    def perturb(self, train: ImageSet, ctx: Context) -> Protected:
        """Protect ``train``; the images are checked against the threat model before they are returned.

        ``_perturb`` returns a ``Protected`` (images and certificate); a plain ``ImageSet`` is accepted
        from third-party plugins and carries no certificate.
        """
        out = self._perturb(train, ctx)
        result = out if isinstance(out, Protected) else Protected(out, None)
        check_protected(type(self).name, self.threat_model(), train, result.data)
        if result.certificate is not None and not isinstance(result.certificate, Certificate):
            raise UEBenchError(f"defense {type(self).name!r}: the certificate must be a Certificate, "
                               f"got {type(result.certificate).__name__}")
        return result

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected | ImageSet:
        raise NotImplementedError(f"defense {type(self).name!r} does not implement _perturb")


def check_protected(name: str, tm: ThreatModel, clean: ImageSet, out: Any) -> PerturbationStats:
    """The engine's checks on a defense's output; raises ``UEBenchError`` naming what failed."""
    where = f"defense {name!r}"
    if not isinstance(out, ImageSet):
        raise UEBenchError(f"{where}: perturb must return an ImageSet, got {type(out).__name__}")
    if out.images.shape != clean.images.shape:
        raise UEBenchError(f"{where}: shape check failed: allowed {tuple(clean.images.shape)}, "
                           f"measured {tuple(out.images.shape)}")
    if not torch.equal(out.labels, clean.labels):
        changed = int((out.labels != clean.labels).sum())
        raise UEBenchError(f"{where}: label check failed: allowed 0 changed labels, measured {changed}")
    if out.classes != clean.classes:
        raise UEBenchError(f"{where}: class check failed: the class names changed")
    stats = perturbation_stats(clean.images, out.images)
    measured = {"linf": stats.linf / 255.0, "l2": stats.l2_max, "l0": float(stats.l0_max)}.get(tm.norm)
    if measured is not None and measured > tm.budget + 1e-6:
        shown = (lambda v: f"{v * 255:.4g}/255") if tm.norm == "linf" else (lambda v: f"{v:.6g}")
        raise UEBenchError(f"{where}: {tm.norm} budget check failed: allowed {shown(tm.budget)}, "
                           f"measured {shown(measured)}")
    return stats


def quantize(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Publishable uint8 images from float images in [0, 1] (any range is clipped).

    The change is truncated towards the clean image, so quantization never enlarges the
    perturbation in any norm: a float perturbation within budget stays within budget.
    """
    if not torch.isfinite(perturbed).all():
        raise UEBenchError("the perturbed images contain NaN or infinite values")
    delta = perturbed.float().clamp(0, 1) * 255.0 - clean.float()
    return (clean.float() + torch.trunc(delta + torch.sign(delta) * 1e-4)).clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Attack(Plugin, TrainConfig):
    """A victim training paradigm: protected images in, trained classifier out.

    The training protocol (epochs, lr, optimizer, augmentation, ...) is part of the attack's fields,
    inherited from ``TrainConfig``; subclasses add their own (e.g. the number of frozen stages).
    ``composes`` names the field of an attack that modifies another paradigm (a countermeasure's ``base``):
    ``configure`` then starts it from that paradigm's defaults and preset protocol.
    """

    composes: ClassVar[str] = ""

    def metadata(self) -> dict[str, Any]:
        return self.plugin_info()

    def zoo_backbones(self, backbone: str | None) -> frozenset[str]:
        return frozenset({backbone} if backbone else ())

    def fit(self, train: ImageSet, backbone: str, ctx: Context) -> Fitted:
        """Train a victim on ``train``; ``_fit`` returns a ``Fitted`` (or a bare ``nn.Module``)."""
        out = self._fit(train, backbone, ctx)
        result = out if isinstance(out, Fitted) else Fitted(out) if isinstance(out, nn.Module) else None
        if result is None or not isinstance(result.model, nn.Module):
            raise UEBenchError(f"attack {type(self).name!r}: fit must return a Fitted or an nn.Module, "
                               f"got {type(out).__name__}")
        result.model.eval()
        return result

    def check_backbone(self, backbone: str) -> None:
        """Raise ``UEBenchError`` if this configured attack cannot run on ``backbone``. ``plan`` calls it for
        every planned (attack, backbone) before any work starts; by default there is nothing to check."""

    def _fit(self, train: ImageSet, backbone: str, ctx: Context) -> Fitted | nn.Module:
        raise NotImplementedError(f"attack {type(self).name!r} does not implement _fit")
