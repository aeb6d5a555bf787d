"""``em``: error-minimizing noise (min-min), sample-wise or class-wise.

Huang, Ma, Erfani, Bailey, Wang, "Unlearnable Examples: Making Personal Data Unexploitable",
ICLR 2021 (arXiv 2101.04898); reference code HanxunH/Unlearnable-Examples (``perturbation.py``).

The bi-level min-min problem min_theta min_delta CE(f_theta(x + delta), y) is solved by alternation:
``train_steps`` SGD steps of a surrogate on (x + delta, y), then PGD that *minimizes* the surrogate's
loss over delta (starting from the current delta), until the surrogate's error on the perturbed
training data falls below ``stop_error``. Sample-wise: 20 steps of 0.8/255 per round over every
image, stop at 1 % error. Class-wise: one delta per class; each batch runs 1 step from its class
deltas and each class delta becomes the batch mean of its images' deltas; the update and the stop
error (10 %) use a 20 % subset of the data, as the README's class-wise command (``--use_subset``).
The surrogate trains without augmentation, batch 512, SGD lr 0.1, gradient clip 5. The certificate is
the final surrogate's error on the released uint8 images (those that measure the stop error), which
must be at most the stop error: the objective reached on the bytes that are published.

Differences from the reference code: the surrogate's optimizer (momentum) restarts at each round,
because every round calls the shared training loop; ``max_rounds`` caps the alternation (the
reference loops until the stop error is reached).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Check, Context, Protected, certificate
from benchmark.registry import DEFENSES
from benchmark.training import error_rate, to_float
from defenses._common import (SurrogateDefense, batches, broadcast_classwise, check_positive, class_means, pgd,
                              progress, publish, round_linf, surrogate_config, surrogate_model, train_surrogate)

log = logging.getLogger(__name__)

MODES = ("sample", "class")
DEFAULT_STEPS = {"sample": 20, "class": 1}
DEFAULT_STOP = {"sample": 0.01, "class": 0.1}


@DEFENSES.register("em")
@dataclass(frozen=True)
class ErrorMinimizing(SurrogateDefense):
    """Error-minimizing noise (Huang et al., ICLR 2021)."""

    eps: float = 8 / 255            # L-inf budget, [0, 1] pixel units
    mode: str = "sample"            # sample: one delta per image | class: one delta per class
    steps: int | None = None        # PGD steps per round; None = 20 (sample) / 1 (class)
    step_size: float = 0.8 / 255    # PGD step, [0, 1] pixel units
    stop_error: float | None = None  # stop when the surrogate's train error (fraction) is below; None = 0.01 / 0.1
    train_steps: int = 10           # surrogate SGD steps per round
    batch_size: int = 512           # images per surrogate step and per PGD batch
    lr: float = 0.1                 # surrogate SGD learning rate (momentum 0.9, weight decay 5e-4)
    grad_clip: float = 5.0          # surrogate gradient-norm clip
    class_subset: float = 0.2       # class mode: fraction of images that update the deltas and measure the stop error
    max_rounds: int = 100           # cap on train/perturb rounds (not in the paper)

    title = "Unlearnable Examples (error-minimizing noise)"
    paper = "2101.04898"
    venue = "ICLR"
    year = 2021
    authors = "Huang, Ma, Erfani, Bailey, Wang"
    norm = "linf"
    granularity = "sample"

    def __post_init__(self) -> None:
        super().__post_init__()  # budget and surrogate fields
        where = "em"
        if self.mode not in MODES:
            raise UEBenchError(f"{where}: mode={self.mode!r} must be one of {MODES}")
        if self.steps is not None and self.steps < 1:
            raise UEBenchError(f"{where}: steps={self.steps!r} must be >= 1 (or none for the mode's default)")
        if self.stop_error is not None and not 0 <= self.stop_error <= 1:
            raise UEBenchError(f"{where}: stop_error={self.stop_error!r} must be in [0, 1] (or none)")
        if not 0 < self.class_subset <= 1:
            raise UEBenchError(f"{where}: class_subset={self.class_subset!r} must be in (0, 1]")
        for name in ("train_steps", "batch_size", "max_rounds"):
            if getattr(self, name) < 1:
                raise UEBenchError(f"{where}: {name}={getattr(self, name)!r} must be >= 1")
        check_positive(where, step_size=self.step_size, lr=self.lr)
        if self.grad_clip < 0:
            raise UEBenchError(f"{where}: grad_clip={self.grad_clip!r} must be >= 0")

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        steps = self.steps or DEFAULT_STEPS[self.mode]
        stop = DEFAULT_STOP[self.mode] if self.stop_error is None else self.stop_error
        gen = ctx.generator()
        n, k = len(train), train.num_classes
        dev = ctx.device
        model = surrogate_model(self.surrogate_backbone, self.surrogate, train, ctx)
        cfg = surrogate_config(epochs=1, batch_size=self.batch_size, lr=self.lr, schedule="constant",
                               grad_clip=self.grad_clip)
        if self.mode == "sample":
            delta = (torch.rand(train.images.shape, generator=gen) * 2 - 1) * self.eps
            watch = torch.arange(n)
        else:
            class_delta = (torch.rand((k, *train.image_shape), generator=gen) * 2 - 1) * self.eps
            watch = torch.randperm(n, generator=gen)[: max(1, round(self.class_subset * n))]
        order, cursor = torch.randperm(n, generator=gen), 0
        error, rounds = 1.0, 0
        bar = progress(range(self.max_rounds), ctx, f"em({self.mode})")
        for rounds in range(1, self.max_rounds + 1):
            # (1) train the surrogate for train_steps batches of the perturbed data
            take = self.train_steps * self.batch_size
            if cursor + take > n:
                order, cursor = torch.cat([order[cursor:], torch.randperm(n, generator=gen)]), 0
            idx, cursor = order[cursor: cursor + take], cursor + take
            current = delta[idx] if self.mode == "sample" else broadcast_classwise(class_delta, train.labels[idx])
            x = (to_float(train.images[idx]) + current).clamp(0, 1)
            train_surrogate(model, x, train.labels[idx], cfg, ctx, desc="em surrogate", offset=rounds)
            # (2) minimize the surrogate's loss over the perturbation
            model.eval()
            if self.mode == "sample":
                for s in batches(n, self.batch_size):
                    xb, yb = to_float(train.images[s], dev), train.labels[s].to(dev)
                    new, _ = pgd(model, xb, yb, delta[s].to(dev), eps=self.eps, step_size=self.step_size,
                                 steps=steps, minimize=True)
                    delta[s] = new.cpu()
                error = error_rate(model, train.images, train.labels, delta, dev, self.batch_size)
            else:
                sub = watch[torch.randperm(len(watch), generator=gen)]
                for s in batches(len(sub), self.batch_size):
                    ib = sub[s]
                    xb, yb = to_float(train.images[ib], dev), train.labels[ib].to(dev)
                    new, _ = pgd(model, xb, yb, broadcast_classwise(class_delta, train.labels[ib]).to(dev),
                                 eps=self.eps, step_size=self.step_size, steps=steps, minimize=True)
                    means, present = class_means(new, yb, k)
                    class_delta[present.cpu()] = means[present].clamp(-self.eps, self.eps).cpu()
                error = error_rate(model, train.images[watch], train.labels[watch],
                                   broadcast_classwise(class_delta, train.labels[watch]), dev, self.batch_size)
            bar.update(1)
            bar.set_postfix(error=f"{100 * error:.1f}%")
            log.debug("em(%s) round %d: surrogate error %.2f%%", self.mode, rounds, 100 * error)
            if error < stop:
                break
        bar.close()
        if error >= stop:
            log.warning("em(%s): surrogate error %.2f%% still above %.2f%% after max_rounds=%d", self.mode,
                        100 * error, 100 * stop, self.max_rounds)
        final = delta if self.mode == "sample" else broadcast_classwise(class_delta, train.labels)
        out = publish(train, round_linf(final, self.eps), f"em({self.mode})")
        # the certificate: the final surrogate's error on the released bytes of the images that measure the stop
        released = error_rate(model, out.images[watch], train.labels[watch], None, dev, self.batch_size)
        log.debug("em(%s): surrogate error %.2f%% on the released images", self.mode, 100 * released)
        return Protected(out, certificate(Check("surrogate_error", released, stop, "<="), rounds=rounds))
