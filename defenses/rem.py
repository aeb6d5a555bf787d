"""``rem``: robust error-minimizing noise (min-min-max).

Fu, He, Liu, Shen, Tao, "Robust Unlearnable Examples: Protecting Data Against Adversarial Learning",
ICLR 2022 (arXiv 2203.14533); reference code fshp971/robust-unlearnable-examples
(``generate_robust_em.py``, ``attacks/robust_workers.py``).

min_theta E_T min_delta max_{||rho|| <= rho_a} CE(f_theta(T(x + delta) + rho), y). The surrogate
trains for ``train_steps`` steps (batch 128, SGD lr 0.1); at each step the batch's defensive noise
delta is found by PGD from a random start (10 steps of 1.6/255, radius 8/255) whose gradient is taken
through an inner adversarial example (10 steps of 0.8/255, radius rho_a = 4/255) and averaged over
``eot`` random crop + flip augmentations T; the surrogate then trains on the adversarial example of
T(x + delta) (adversarial training). After training, the noise of every image is regenerated with
the final surrogate. Differences: a cosine learning-rate schedule (the reference decays by 10 every
2000 steps); more steps than an epoch are rounded up to whole epochs.
Certificate: the final surrogate's robust error (its own rho_a adversary) on the released images
(<= 0.1; the reference has no stop rule, so this is EM's class-wise stop error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Check, Context, Protected, certificate
from benchmark.registry import DEFENSES
from benchmark.training import error_rate, to_float
from defenses._common import (Augment, SurrogateDefense, batches, ce_loss, check_positive, pgd, progress, publish,
                              round_linf, steps_plan, surrogate_config, surrogate_model, train_surrogate)

log = logging.getLogger(__name__)

# the certificate: the surrogate's robust error (PGD at rho_a) on the released images stays at most this;
# the reference has no stop rule, so the project uses EM's class-wise stop error
ROBUST_ERROR_GATE = 0.1


@DEFENSES.register("rem")
@dataclass(frozen=True)
class RobustErrorMinimizing(SurrogateDefense):
    """Robust error-minimizing noise (Fu et al., ICLR 2022)."""

    eps: float = 8 / 255            # L-inf budget of the defensive noise, [0, 1] pixel units
    steps: int = 10                 # defensive-noise PGD steps
    step_size: float = 1.6 / 255    # defensive-noise PGD step
    adv_eps: float = 4 / 255        # rho_a: radius of the inner adversarial perturbation
    adv_steps: int = 10             # inner adversarial PGD steps
    adv_step_size: float = 0.8 / 255  # inner adversarial PGD step
    eot: int = 5                    # augmentations averaged per defensive-noise step (samp-num)
    train_steps: int = 5000         # surrogate SGD steps (rounded up to whole epochs)
    batch_size: int = 128           # images per surrogate step and per noise batch
    lr: float = 0.1                 # surrogate SGD learning rate (momentum 0.9, weight decay 5e-4, cosine)

    title = "Robust Unlearnable Examples (robust error-minimizing noise)"
    paper = "2203.14533"
    venue = "ICLR"
    year = 2022
    authors = "Fu, He, Liu, Shen, Tao"
    norm = "linf"
    granularity = "sample"

    def __post_init__(self) -> None:
        super().__post_init__()  # budget and surrogate fields
        where = "rem"
        if not 0 <= self.adv_eps <= 1:
            raise UEBenchError(f"{where}: adv_eps={self.adv_eps!r} must be in [0, 1]")
        for name in ("steps", "eot", "train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UEBenchError(f"{where}: {name}={getattr(self, name)!r} must be >= 1")
        if self.adv_steps < 0:
            raise UEBenchError(f"{where}: adv_steps={self.adv_steps!r} must be >= 0")
        check_positive(where, step_size=self.step_size, adv_step_size=self.adv_step_size, lr=self.lr)

    # -- the two inner problems, as pure functions of (model, batch)

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """max over rho: the inner adversarial example of ``x`` (random start), detached."""
        if self.adv_steps == 0 or self.adv_eps == 0:
            return x.detach()
        start = ((torch.rand(x.shape, generator=gen) * 2 - 1) * self.adv_eps).to(x.device)
        rho, _ = pgd(model, x.detach(), y, start, eps=self.adv_eps, step_size=self.adv_step_size,
                     steps=self.adv_steps, minimize=False)
        return (x + rho).detach()

    def defensive_noise(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:
        """min over delta of the adversarial loss, expectation over augmentations (random start)."""

        def robust_loss(m: nn.Module, xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
            # the adversarial offset is a constant: the gradient flows through xt only (as the reference)
            adv = self.adversarial(m, xt, yt, gen)
            return ce_loss(m, xt + (adv - xt.detach()), yt)

        start = ((torch.rand(x.shape, generator=gen) * 2 - 1) * self.eps).to(x.device)
        delta, _ = pgd(model, x, y, start, eps=self.eps, step_size=self.step_size, steps=self.steps, minimize=True,
                       loss_fn=robust_loss, transform=Augment(), eot=self.eot, gen=gen)
        return delta

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        gen = ctx.generator()
        dev = ctx.device
        model = surrogate_model(self.surrogate_backbone, self.surrogate, train, ctx)
        augment = Augment()

        def min_min_max(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            m.eval()
            delta = self.defensive_noise(m, x, y, gen)
            defended = augment((x + delta).clamp(0, 1), gen)
            adv = self.adversarial(m, defended, y, gen)
            m.train()
            return adv, y

        epochs, subset = steps_plan(self.train_steps, len(train), self.batch_size, gen)
        images, labels = train.images, train.labels
        if subset is not None:
            images, labels = images[subset], labels[subset]
        cfg = surrogate_config(epochs=epochs, batch_size=self.batch_size, lr=self.lr)
        result = train_surrogate(model, images, labels, cfg, ctx, desc="rem surrogate", batch_hook=min_min_max)
        model.eval()
        delta = torch.empty(train.images.shape)
        for s in progress(list(batches(len(train), self.batch_size)), ctx, "rem noise"):
            xb, yb = to_float(train.images[s], dev), train.labels[s].to(dev)
            delta[s] = self.defensive_noise(model, xb, yb, gen).cpu()
        out = publish(train, round_linf(delta, self.eps), "rem")
        robust = self.robust_error(model, out, dev, gen)
        cert = certificate(Check("robust_error", robust, ROBUST_ERROR_GATE, "<="),
                           clean_error=error_rate(model, out.images, out.labels, None, dev, self.batch_size),
                           surrogate_steps=result.steps)
        log.info("rem: %s", cert.describe())
        return Protected(out, cert)

    def robust_error(self, model: nn.Module, out: ImageSet, device: torch.device, gen: torch.Generator) -> float:
        """The surrogate's error on adversarial examples (its own rho_a adversary) of the released images."""
        model.eval()
        wrong = 0
        for s in batches(len(out), self.batch_size):
            xb, yb = to_float(out.images[s], device), out.labels[s].to(device)
            adv = self.adversarial(model, xb, yb, gen)
            with torch.no_grad():
                wrong += int((model(adv.contiguous(memory_format=torch.channels_last)).argmax(1) != yb).sum())
        return wrong / max(1, len(out))

