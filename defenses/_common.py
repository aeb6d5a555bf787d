"""Shared pieces of the UE generators, written once.

- surrogates: a backbone from the zoo (``scratch`` = random init, ``supervised``/``sf`` = pretrained on
  the data set's source pool) trained through the one training loop (``benchmark.training.train``);
- PGD on a perturbation (minimize or maximize a loss, L-inf projection, optional differentiable
  augmentation with expectation over transformations);
- class-wise broadcasting, class means and the per-row gather as one-hot products (deterministic
  backward), L2 projection, and rounding a float perturbation to whole uint8 steps without leaving the
  budget (then ``quantize`` publishes it).

Evaluation (``predict``, ``error_rate``) and the uint8 -> float conversion (``to_float``) are the
training module's, shared with the attacks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmark.choices import Surrogate, check_choice
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.models import Classifier, create_model, get_spec
from benchmark.plugins import Context, Defense, quantize
from benchmark.training import (BatchHook, TrainConfig, TrainResult, cross_entropy_loss, random_crop, random_flip,
                                to_float, train)

log = logging.getLogger(__name__)

# (model, x, y) -> scalar loss; x is the (augmented) perturbed batch in [0, 1]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def check_surrogate(where: str, backbone: str, surrogate: str) -> None:
    """Validate the surrogate fields shared by the surrogate-based defenses."""
    get_spec(backbone)  # raises with the valid names
    check_choice(where, "surrogate", surrogate, Surrogate)


def check_linf_budget(where: str, eps: float) -> None:
    """An L-inf budget ``eps`` in [0, 1] pixel units must be in (0, 1]."""
    if not 0 < eps <= 1:
        raise UEBenchError(f"{where}: eps={eps!r} must be in (0, 1]")


@dataclass(frozen=True)
class SurrogateDefense(Defense):
    """Base of the defenses that craft against a surrogate classifier of their own (em, tap, rem): the
    surrogate's two fields, their checks with the L-inf budget's, and the zoo source they declare."""

    surrogate_backbone: str = "resnet18"  # surrogate architecture (a registered backbone)
    surrogate: str = "scratch"            # surrogate init: scratch | supervised | sf (zoo weights)

    def __post_init__(self) -> None:
        where = type(self).name or type(self).__name__
        check_linf_budget(where, getattr(self, "eps", 0.0))
        check_surrogate(where, self.surrogate_backbone, self.surrogate)

    def zoo_sources(self) -> frozenset[str]:
        return frozenset({self.surrogate} - {"scratch"})  # scratch = random init, no zoo weights

    def zoo_backbones(self, backbone: str | None) -> frozenset[str]:
        return frozenset({self.surrogate_backbone})


def check_positive(where: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise UEBenchError(f"{where}: {name}={value!r} must be > 0")


def ce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loop's cross-entropy, loss only (PGD's ``LossFn``)."""
    return cross_entropy_loss(model, x, y)[0]


# ---------------------------------------------------------------- surrogates

def surrogate_model(backbone: str, surrogate: str, data: ImageSet, ctx: Context, offset: int = 0) -> Classifier:
    """A fresh ``num_classes``-way surrogate on ``ctx.device``; its init is seeded from ``ctx.seed``."""
    source = "random" if surrogate == "scratch" else surrogate
    channels, size = data.image_shape[0], data.image_shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed * 1_000_003 + 7919 + offset)
        if ctx.zoo is not None:
            model = ctx.zoo.get(backbone, source, data.num_classes, size, channels)
        elif source == "random":
            model = create_model(backbone, data.num_classes, size, channels)
        else:
            raise UEBenchError(f"surrogate={surrogate!r} needs the zoo, but the context has none")
    return model.to(ctx.device)


def surrogate_config(*, epochs: int, batch_size: int, lr: float, augment: str = "none",
                     schedule: str = "cosine", grad_clip: float = 0.0) -> TrainConfig:
    """The surrogates' protocol: SGD momentum 0.9, weight decay 5e-4 (the UE papers' ResNet-18 recipe)."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="sgd", momentum=0.9,
                       weight_decay=5e-4, schedule=schedule, augment=augment, grad_clip=grad_clip)


def train_surrogate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, ctx: Context,
                    *, desc: str, offset: int = 0, batch_hook: BatchHook | None = None) -> TrainResult:
    """Train ``model`` in place through the one training loop, seeded from the context."""
    model.train()
    result = train(model, inputs, labels, cfg, device=ctx.device, seed=ctx.seed * 1_000_003 + offset,
                   progress=ctx.progress, desc=desc, batch_hook=batch_hook)
    model.eval()
    return result


def steps_plan(steps: int, n: int, batch_size: int, gen: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """How to run ``steps`` optimizer steps through the epoch-based loop: (epochs, subset).

    Fewer steps than one epoch: one epoch over a random subset of ``steps * batch_size`` examples.
    Otherwise whole epochs over everything (rounded up), subset ``None``.
    """
    per_epoch = max(1, math.ceil(n / batch_size))
    if steps < per_epoch:
        return 1, torch.randperm(n, generator=gen)[: steps * batch_size]
    return math.ceil(steps / per_epoch), None


# ---------------------------------------------------------------- PGD on a perturbation

@dataclass(frozen=True)
class Augment:
    """Differentiable crop (zero padding) + horizontal flip, for expectation over transformations."""

    padding: int = 4

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return random_flip(random_crop(x, self.padding, gen), gen)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, *, eps: float, step_size: float,
        steps: int, minimize: bool, loss_fn: LossFn = ce_loss, transform: Augment | None = None, eot: int = 1,
        gen: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Signed-gradient PGD on ``delta`` within the L-inf ball of radius ``eps``, keeping x + delta in [0, 1].

    ``minimize`` selects error-minimizing (EM, REM, targeted TAP) or error-maximizing steps. With a
    ``transform``, each step sums the gradients over ``eot`` random augmentations of x + delta.
    Returns the new delta (detached) and the loss of the last step. The model is not modified.
    """
    delta = project_box(x, delta.detach().clamp(-eps, eps))
    last = float("nan")
    for _ in range(steps):
        delta.requires_grad_(True)
        grad = torch.zeros_like(delta)
        total = 0.0
        for _ in range(eot if transform is not None else 1):
            xin = (x + delta).clamp(0, 1)
            if transform is not None:
                xin = transform(xin, gen)
            loss = loss_fn(model, xin, y)
            grad += torch.autograd.grad(loss, delta)[0]
            total += float(loss.detach())
        last = total / (eot if transform is not None else 1)
        with torch.no_grad():
            step = grad.sign() * step_size
            delta = delta.detach() - step if minimize else delta.detach() + step
            delta = project_box(x, delta.clamp(-eps, eps))
    return delta.detach(), last


def project_box(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The part of ``delta`` that keeps x + delta inside [0, 1]."""
    return (x + delta).clamp(0, 1) - x


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def progress(iterable, ctx: Context, desc: str, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not ctx.progress)


# ---------------------------------------------------------------- class-wise, L2, publishing

def broadcast_classwise(class_delta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One perturbation per class (K x C x H x W) -> one per image (N x C x H x W)."""
    return class_delta[labels.to(class_delta.device)]


def class_means(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means of ``values`` (N x ...) -> (K x ..., mask of present classes); absent classes get 0.

    A one-hot matrix product, so that forward and backward are deterministic on every device
    (``index_add_`` and the backward of indexing accumulate in a thread-dependent order).
    """
    onehot = F.one_hot(labels.to(values.device), num_classes).to(values.dtype)  # N x K
    counts = onehot.sum(0)
    means = (onehot.t() @ values.reshape(len(values), -1)) / counts.clamp(min=1)[:, None]
    return means.reshape(num_classes, *values.shape[1:]), counts > 0


def pick(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]`` as a one-hot product: the backward of indexing with repeated indices sums in a
    thread-dependent order on the CPU, which would break bitwise determinism."""
    onehot = F.one_hot(index, rows.shape[0]).to(rows.dtype)
    return (onehot @ rows.reshape(rows.shape[0], -1)).reshape(len(index), *rows.shape[1:])


def l2_norms(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each perturbation (first dim) into the L2 ball of radius ``eps``."""
    norms = l2_norms(delta).clamp_min(1e-12)
    scale = (eps / norms).clamp(max=1.0)
    return delta * scale.view(-1, *([1] * (delta.ndim - 1)))


def normalize_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each perturbation to L2 norm exactly ``eps`` (zero perturbations are an error)."""
    norms = l2_norms(delta)
    if not torch.isfinite(norms).all() or bool((norms <= 0).any()):
        raise UEBenchError("cannot normalize a zero, NaN or infinite perturbation to the L2 budget")
    return delta * (eps / norms).view(-1, *([1] * (delta.ndim - 1)))


def round_linf(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Whole uint8 steps (/255) nearest to ``delta``, within the L-inf budget."""
    k = math.floor(eps * 255 + 1e-6)
    return torch.round(delta * 255).clamp(-k, k) / 255


def round_l2(delta: torch.Tensor, eps: float, tries: int = 8) -> torch.Tensor:
    """Whole uint8 steps (/255) near ``delta`` whose per-image L2 norm stays within ``eps``.

    Rounding to nearest keeps more of the perturbation than truncation; where rounding overshoots the
    budget the image's delta is shrunk and rounded again, and as a last resort truncated (which never
    enlarges any component, so it stays within a budget the float delta respects).
    """
    delta = project_l2(delta.float(), eps)
    out = torch.round(delta * 255) / 255
    for _ in range(tries):
        over = l2_norms(out) > eps
        if not bool(over.any()):
            return out
        shrink = (eps / l2_norms(out[over])).view(-1, *([1] * (delta.ndim - 1)))
        delta[over] = delta[over] * shrink
        out[over] = torch.round(delta[over] * 255) / 255
    over = l2_norms(out) > eps
    out[over] = torch.trunc(delta[over] * 255) / 255
    return out


def publish(train: ImageSet, delta: torch.Tensor, name: str) -> ImageSet:
    """Add a perturbation already on the uint8 grid (see ``round_linf``/``round_l2``) and quantize."""
    images = quantize(train.images, to_float(train.images) + delta.cpu().float())
    return train.with_images(images, name=f"{train.name}+{name}")
