"""``tap``: targeted adversarial poisoning (class-targeted adversarial examples as poisons).

Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein, "Adversarial Examples Make Strong Poisons",
NeurIPS 2021 (arXiv 2106.10807); reference code lhfowl/adversarial_poisons (``forgemaster_targeted``,
``forgemaster_base``), also in APBench.

A surrogate is trained on the clean data; then each image gets a targeted adversarial perturbation
towards class ``(y + 1) mod K`` (the reference's fixed label permutation): signed-gradient PGD
minimizing CE(f(aug(x + delta)), target) with step tau * eps (tau = 0.05), 250 passes over the data,
random-normal init, differentiable crop + flip during crafting. Of ``restarts`` independent runs the
one with the lowest final target loss is kept (as the reference does, for the whole set).
Certificate: the surrogate's targeted success rate on the released images (>= 0.9).
Differences: the surrogate uses a cosine schedule (the reference decays in steps); the crafting
augmentation is crop (pad 4) + flip, the reference's differentiable shift + flip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Check, Context, Protected, certificate
from benchmark.registry import DEFENSES
from benchmark.training import AUGMENTS, error_rate, predict, to_float
from defenses._common import (Augment, SurrogateDefense, batches, check_positive, pgd, progress, publish, round_linf,
                              surrogate_config, surrogate_model, train_surrogate)

log = logging.getLogger(__name__)


# the certificate: the surrogate classifies at least this fraction of the released images as their target
# (the paper's poisons fool the crafting model almost always)
SUCCESS_GATE = 0.9


@torch.no_grad()
def target_success(model: torch.nn.Module, out: ImageSet, targets: torch.Tensor, device: torch.device,
                   batch_size: int) -> float:
    """Fraction of the released images the surrogate (eval mode) classifies as their target class."""
    logits = predict(model, out.images, device, batch_size)
    return float((logits.argmax(1) == targets).float().mean()) if len(out) else 0.0


def target_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The reference's fixed permutation of the label space: y -> (y + 1) mod K."""
    return (labels + 1) % num_classes


@DEFENSES.register("tap")
@dataclass(frozen=True)
class TargetedAdversarialPoisoning(SurrogateDefense):
    """Class-targeted adversarial poisons (Fowl et al., NeurIPS 2021)."""

    eps: float = 8 / 255            # L-inf budget, [0, 1] pixel units
    steps: int = 250                # PGD passes over the data
    step_size: float = 0.4 / 255    # PGD step = tau (0.05) x eps, [0, 1] pixel units
    restarts: int = 8               # independent runs; the lowest final target loss wins
    augment: bool = True            # differentiable crop + flip while crafting (the reference's paugment)
    batch_size: int = 512           # images per PGD batch (pbatch)
    surrogate_epochs: int = 40      # clean training of the surrogate
    surrogate_batch_size: int = 128
    lr: float = 0.1                 # surrogate SGD learning rate (momentum 0.9, weight decay 5e-4, cosine)
    surrogate_augment: str = "crop_flip"  # surrogate training augmentation: crop_flip | crop | flip | none

    title = "Adversarial Poisoning (class-targeted)"
    paper = "2106.10807"
    venue = "NeurIPS"
    year = 2021
    authors = "Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein"
    norm = "linf"
    granularity = "sample"

    def __post_init__(self) -> None:
        super().__post_init__()  # budget and surrogate fields
        where = "tap"
        for name in ("steps", "restarts", "batch_size", "surrogate_batch_size"):
            if getattr(self, name) < 1:
                raise UEBenchError(f"{where}: {name}={getattr(self, name)!r} must be >= 1")
        if self.surrogate_epochs < 0:
            raise UEBenchError(f"{where}: surrogate_epochs={self.surrogate_epochs!r} must be >= 0")
        if self.surrogate_augment not in AUGMENTS:
            raise UEBenchError(f"{where}: surrogate_augment={self.surrogate_augment!r} must be one of {AUGMENTS}")
        check_positive(where, step_size=self.step_size, lr=self.lr)

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        gen = ctx.generator()
        dev = ctx.device
        model = surrogate_model(self.surrogate_backbone, self.surrogate, train, ctx)
        cfg = surrogate_config(epochs=self.surrogate_epochs, batch_size=self.surrogate_batch_size, lr=self.lr,
                               augment=self.surrogate_augment)
        if self.surrogate_epochs > 0:
            train_surrogate(model, train.images, train.labels, cfg, ctx, desc="tap surrogate")
        error = error_rate(model, train.images, train.labels, None, dev)
        model.eval()
        targets = target_labels(train.labels, train.num_classes)
        transform = Augment() if self.augment else None
        best, best_loss = None, float("inf")
        for trial in range(self.restarts):
            delta = (torch.randn(train.images.shape, generator=gen) * self.eps).clamp(-self.eps, self.eps)
            loss_sum = 0.0
            for _ in progress(range(self.steps), ctx, f"tap trial {trial + 1}/{self.restarts}"):
                loss_sum, count = 0.0, 0
                for s in batches(len(train), self.batch_size):
                    xb = to_float(train.images[s], dev)
                    new, loss = pgd(model, xb, targets[s].to(dev), delta[s].to(dev), eps=self.eps,
                                    step_size=self.step_size, steps=1, minimize=True, transform=transform, gen=gen)
                    delta[s] = new.cpu()
                    loss_sum, count = loss_sum + loss, count + 1
                loss_sum /= max(1, count)
            log.debug("tap trial %d: target loss %.4f", trial, loss_sum)
            if loss_sum < best_loss:
                best, best_loss = delta, loss_sum
        out = publish(train, round_linf(best, self.eps), "tap")
        success = target_success(model, out, targets, dev, self.batch_size)
        cert = certificate(Check("target_success", success, SUCCESS_GATE, ">="), surrogate_clean_error=error,
                           target_loss=best_loss)
        log.info("tap: %s", cert.describe())
        return Protected(out, cert)
