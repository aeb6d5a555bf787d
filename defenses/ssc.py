"""``ssc``: Shallow Semantic Camouflage, *the project's interpretation*.

Wang, Ni, Zhao, Qin, Ren, "Channel-Level Semantic Perturbations: Unlearnable Examples for Diverse
Training Paradigms", 2026 (arXiv 2605.05224). Only the abstract was available: frozen shallow layers
of a pretrained model filter out non-semantic UE noise ("semantic filtering"); SSC confines UE
generation to a semantically valid, channel-level subspace so that the perturbation passes the
shallow filter. Everything below the abstract's level is our reading (docs/methods.md, "SSC"):

1. h_s = the stem and the first ``k`` stages of a pretrained surrogate (zoo ``supervised`` or ``sf``),
   frozen; the rest of the network and a fresh head stay trainable.
2. The semantic subspace: the channels of h_s with the highest activation energy on the clean data
   (``keep_fraction`` of them); each class gets a disjoint channel code inside it (round robin by energy).
3. PGD (L-inf) on delta minimizes, with dh = h_s(x + delta) - h_s(x):
   (a) confinement: energy of dh outside the subspace over the total energy of dh;
   (b) shortcut: minus the mean (clean-std normalized) change of the class's code channels, plus
       ``suppress`` times the mean absolute change of the other classes' code channels;
   (c) error-minimizing CE through the rest of the network and the head, which train on the perturbed
       data in alternation with the PGD passes (EM-style; stop when the train error < ``stop_error``).
4. ``mode=class`` (one delta per class, gradients summed over the class's images; ``class_subset``
   of the images update the deltas, as EM's class-wise ``--use_subset``) or ``mode=sample``.

The released bytes are rounded to whole uint8 steps within the budget; the certificate is the surrogate's
final train error on them (at most ``stop_error``), with the fraction of the feature change's energy
inside the subspace and the rounds run beside it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.choices import PRETRAINED_SOURCES
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.models import Classifier, body_stages, get_spec
from benchmark.plugins import Check, Context, Defense, Protected, certificate
from benchmark.registry import DEFENSES
from benchmark.training import error_rate, make_optimizer, to_float, train_step
from defenses._common import pick, progress, publish, round_linf, surrogate_config, surrogate_model

log = logging.getLogger(__name__)

MODES = ("class", "sample")


# ---------------------------------------------------------------- the shallow block

def _index(model: Classifier, k: int) -> int:
    """The ``forward_intermediates`` index after the stem and ``k`` body stages."""
    if not 1 <= k <= model.num_body_stages:
        raise UEBenchError(f"ssc: k={k} must be in [1, {model.num_body_stages}] for {model.spec.name}")
    return k if model.spec.family == "resnet" else k - 1  # resnet's index 0 is the stem


def shallow_features(model: Classifier, x: torch.Tensor, k: int) -> torch.Tensor:
    """h_s(x): the N x C x H x W output of the stem and the first ``k`` stages (x in [0, 1])."""
    xn = model.normalize(x).contiguous(memory_format=torch.channels_last)
    return model.net.forward_intermediates(xn, indices=[_index(model, k)], intermediates_only=True)[0]


def forward_with_shallow(model: Classifier, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, h_s(x)) in one forward pass."""
    xn = model.normalize(x).contiguous(memory_format=torch.channels_last)
    feats, inter = model.net.forward_intermediates(xn, indices=[_index(model, k)])
    return model.net.forward_head(feats), inter[0]


# ---------------------------------------------------------------- the subspace (pure functions)

@dataclass(frozen=True)
class Subspace:
    """The semantic channels and the per-class channel codes (masks over the C channels of h_s)."""

    mask: torch.Tensor    # C bool: channels in the semantic subspace
    codes: torch.Tensor   # K x C float: 1 on class k's code channels
    scale: torch.Tensor   # C: clean per-channel std of h_s (normalizes the shortcut term)


def channel_codes(energy: torch.Tensor, keep_fraction: float, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top ``keep_fraction`` channels by energy; deal them to the classes round robin.

    Codes are disjoint when the subspace has at least one channel per class; otherwise classes share
    channels (wrap-around), which is logged.
    """
    c = energy.numel()
    m = max(1, min(c, round(keep_fraction * c)))
    top = torch.argsort(energy, descending=True)[:m]
    mask = torch.zeros(c, dtype=torch.bool, device=energy.device)
    mask[top] = True
    codes = torch.zeros(num_classes, c, device=energy.device)
    if m >= num_classes:
        per = m // num_classes
        for j in range(per * num_classes):
            codes[j % num_classes, top[j]] = 1.0
    else:
        log.warning("ssc: %d subspace channels for %d classes; channel codes are shared", m, num_classes)
        for cls in range(num_classes):
            codes[cls, top[cls % m]] = 1.0
    return mask, codes


def confinement(dh: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample: energy of dh outside the subspace over the total energy of dh (in [0, 1])."""
    energy = dh.float().pow(2).sum((2, 3))  # N x C
    return (energy * (~mask).float()).sum(1) / energy.sum(1).clamp_min(1e-12)


def shortcut(dh: torch.Tensor, labels: torch.Tensor, space: Subspace, suppress: float) -> torch.Tensor:
    """Per sample: -(mean normalized change of the own code) + suppress * mean |change| of other codes."""
    z = dh.float().mean((2, 3)) / space.scale.clamp_min(1e-6)  # N x C
    own = space.codes[labels]
    other = ((space.codes.sum(0, keepdim=True) - own) > 0).float()
    excite = (z * own).sum(1) / own.sum(1).clamp_min(1)
    leak = (z.abs() * other).sum(1) / other.sum(1).clamp_min(1)
    return -excite + suppress * leak


@torch.no_grad()
def subspace_energy_ratio(model: Classifier, k: int, clean: torch.Tensor, perturbed: torch.Tensor,
                          mask: torch.Tensor, device: torch.device, batch_size: int = 512) -> float:
    """Fraction of the energy of h_s(perturbed) - h_s(clean) inside the subspace (uint8 images in)."""
    model.eval()
    inside = total = 0.0
    for i in range(0, len(clean), batch_size):
        dh = (shallow_features(model, to_float(perturbed[i: i + batch_size], device), k)
              - shallow_features(model, to_float(clean[i: i + batch_size], device), k))
        energy = dh.float().pow(2).sum((0, 2, 3))
        inside += float(energy[mask.to(device)].sum())
        total += float(energy.sum())
    return inside / total if total > 0 else float("nan")


# ---------------------------------------------------------------- the plugin

@DEFENSES.register("ssc")
@dataclass(frozen=True)
class ShallowSemanticCamouflage(Defense):
    """Shallow Semantic Camouflage (project's interpretation; see the module docstring)."""

    eps: float = 8 / 255                  # L-inf budget, [0, 1] pixel units
    mode: str = "class"                   # class: one delta per class | sample: one per image
    surrogate_backbone: str = "resnet18"  # zoo backbone of the surrogate
    surrogate_weights: str = "supervised"  # zoo source of the surrogate: supervised | sf
    k: int = 1                            # shallow block = stem + first k stages (the victims' frozen part)
    keep_fraction: float = 0.5            # fraction of h_s channels in the semantic subspace
    confine_weight: float = 1.0           # weight of (a), subspace confinement
    shortcut_weight: float = 1.0          # weight of (b), the channel shortcut
    ce_weight: float = 1.0                # weight of (c), error-minimizing CE through the trainable part
    suppress: float = 1.0                 # weight of the other classes' codes inside (b)
    step_size: float = 0.8 / 255          # PGD step, [0, 1] pixel units
    pgd_steps: int = 10                   # PGD steps per batch per round
    rounds: int = 10                      # max train/perturb rounds
    train_steps: int = 10                 # SGD steps of the trainable part per round
    lr: float = 0.01                      # SGD lr of the trainable part (momentum 0.9, weight decay 5e-4)
    batch_size: int = 256                 # images per SGD step and per PGD batch
    stop_error: float = 0.01              # stop when the surrogate's train error (fraction) is below
    class_subset: float = 1.0             # class mode: fraction of images that update the deltas (EM's --use_subset)

    title = "Shallow Semantic Camouflage (interpretation)"
    paper = "2605.05224"
    venue = "arXiv"
    year = 2026
    authors = "Wang, Ni, Zhao, Qin, Ren"
    interpretation = True
    norm = "linf"
    granularity = "class"

    def __post_init__(self) -> None:
        checks = [
            (0 < self.eps <= 1, "eps", self.eps, "in (0, 1]"),
            (self.mode in MODES, "mode", self.mode, f"one of {MODES}"),
            (self.surrogate_weights in PRETRAINED_SOURCES, "surrogate_weights", self.surrogate_weights,
             f"one of {PRETRAINED_SOURCES}"),
            (self.k >= 1, "k", self.k, ">= 1"),
            (0 < self.keep_fraction <= 1, "keep_fraction", self.keep_fraction, "in (0, 1]"),
            (min(self.confine_weight, self.shortcut_weight, self.ce_weight, self.suppress) >= 0,
             "loss weights", (self.confine_weight, self.shortcut_weight, self.ce_weight, self.suppress), ">= 0"),
            (self.step_size > 0, "step_size", self.step_size, "> 0"),
            (self.pgd_steps >= 1, "pgd_steps", self.pgd_steps, ">= 1"),
            (self.rounds >= 1, "rounds", self.rounds, ">= 1"),
            (self.train_steps >= 0, "train_steps", self.train_steps, ">= 0"),
            (self.lr > 0, "lr", self.lr, "> 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (0 <= self.stop_error < 1, "stop_error", self.stop_error, "in [0, 1)"),
            (0 < self.class_subset <= 1, "class_subset", self.class_subset, "in (0, 1]"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise UEBenchError(f"ssc: {name}={value!r} must be {rule}")
        get_spec(self.surrogate_backbone)  # raises with the valid names
        if self.k > body_stages(self.surrogate_backbone):
            raise UEBenchError(f"ssc: k={self.k} must be in [1, {body_stages(self.surrogate_backbone)}], the body "
                               f"stages of surrogate_backbone {self.surrogate_backbone!r}")

    def surrogate(self, train: ImageSet, ctx: Context) -> tuple[Classifier, Subspace]:
        """The surrogate with h_s frozen, and the subspace from clean statistics of h_s."""
        model = surrogate_model(self.surrogate_backbone, self.surrogate_weights, train, ctx)
        model.freeze_stages(self.k)
        model.to(memory_format=torch.channels_last).eval()
        total = sq = None
        count = 0
        with torch.no_grad():
            for i in range(0, len(train), self.batch_size):
                h = shallow_features(model, to_float(train.images[i: i + self.batch_size], ctx.device), self.k).float()
                s, s2 = h.sum((0, 2, 3)), h.pow(2).sum((0, 2, 3))
                total, sq = (s, s2) if total is None else (total + s, sq + s2)
                count += h.shape[0] * h.shape[2] * h.shape[3]
        energy = sq / count
        scale = (energy - (total / count) ** 2).clamp_min(0).sqrt()
        mask, codes = channel_codes(energy, self.keep_fraction, train.num_classes)
        return model, Subspace(mask, codes, scale)

    def zoo_sources(self) -> frozenset[str]:
        return frozenset({self.surrogate_weights})

    def zoo_backbones(self, backbone: str | None) -> frozenset[str]:
        return frozenset({self.surrogate_backbone})

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            model, space = self.surrogate(train, ctx)
            delta, rounds, pool = self._optimize(model, space, train, ctx)
        out = publish(train, round_linf(delta, self.eps), f"ssc({self.mode})")
        error = error_rate(model, out.images[pool], train.labels[pool], None, ctx.device, self.batch_size)
        ratio = subspace_energy_ratio(model, self.k, train.images, out.images, space.mask, ctx.device, self.batch_size)
        log.info("ssc(%s): %d rounds, surrogate error %.3f on the released images, subspace energy ratio %.2f, %.0fs",
                 self.mode, rounds, error, ratio, time.perf_counter() - start)
        return Protected(out, certificate(Check("surrogate_error", error, self.stop_error, "<="),
                                          subspace_energy_ratio=ratio, rounds=rounds))

    def _loss(self, model: Classifier, space: Subspace, x: torch.Tensor, y: torch.Tensor,
              h_clean: torch.Tensor) -> torch.Tensor:
        logits, h = forward_with_shallow(model, x, self.k)
        dh = h - h_clean
        loss = self.ce_weight * F.cross_entropy(logits.float(), y)
        loss = loss + self.confine_weight * confinement(dh, space.mask).mean()
        return loss + self.shortcut_weight * shortcut(dh, y, space, self.suppress).mean()

    def _optimize(self, model: Classifier, space: Subspace, train: ImageSet,
                  ctx: Context) -> tuple[torch.Tensor, int, torch.Tensor]:
        """EM-style alternation; returns (delta per image on the CPU, rounds run, the indices (CPU) of the
        images that measured the stop error)."""
        dev, gen, n, bs = ctx.device, ctx.generator(), len(train), self.batch_size
        images, labels = train.images.to(dev), train.labels.to(dev)
        rows = train.num_classes if self.mode == "class" else n
        delta = ((torch.rand((rows, *train.image_shape), generator=gen) * 2 - 1) * self.eps).to(dev)
        row_of = labels if self.mode == "class" else torch.arange(n, device=dev)
        # the images whose gradients update delta and that measure the stop error
        used = n if self.mode == "sample" else max(1, round(self.class_subset * n))
        pool = torch.randperm(n, generator=gen)[:used].to(dev)
        # the trainable part's SGD: the surrogates' recipe with gradient clip 5; the steps (train_steps per
        # round, on random batches) are taken here, so the schedule and epochs of the config are not used
        cfg = surrogate_config(epochs=self.rounds, batch_size=bs, lr=self.lr, grad_clip=5.0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg)
        error, rounds = 1.0, 0
        for rounds in progress(range(1, self.rounds + 1), ctx, "ssc rounds"):
            model.train()
            for _ in range(self.train_steps):
                idx = torch.randint(0, n, (bs,), generator=gen).to(dev)
                x = (to_float(images[idx], dev) + delta[row_of[idx]]).clamp(0, 1)
                train_step(model, x, labels[idx], opt, params, grad_clip=cfg.grad_clip)
            model.eval()
            order = pool[torch.randperm(used, generator=gen).to(dev)]
            for i in range(0, used, bs):
                idx = order[i: i + bs]
                delta = self._pgd(model, space, to_float(images[idx], dev), labels[idx], row_of[idx], delta)
            sub = pool.cpu()
            error = error_rate(model, train.images[sub], train.labels[sub], delta[row_of[pool]].cpu(), dev, bs)
            if error < self.stop_error:
                break
        return delta[row_of].cpu(), rounds, pool.cpu()

    def _pgd(self, model: Classifier, space: Subspace, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor,
             delta: torch.Tensor) -> torch.Tensor:
        """``pgd_steps`` signed steps on the rows of ``delta`` this batch uses, in place (class rows sum
        the gradients of their images)."""
        with torch.no_grad():
            h_clean = shallow_features(model, x, self.k)
        used, inverse = torch.unique(rows, return_inverse=True)
        part = delta[used].clone()
        for _ in range(self.pgd_steps):
            part.requires_grad_(True)
            per_image = part[inverse] if self.mode == "sample" else pick(part, inverse)
            loss = self._loss(model, space, (x + per_image).clamp(0, 1), y, h_clean)
            grad, = torch.autograd.grad(loss, part)
            part = (part.detach() - self.step_size * grad.sign()).clamp(-self.eps, self.eps)
        delta[used] = part
        return delta
