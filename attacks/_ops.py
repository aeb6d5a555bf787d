"""The tensor maths of the countermeasures (``attacks/countermeasures.py``): pure functions on batches,
plus UEraser's loss (its one piece of state is the step count) and the linear fit of the projection."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.data import ImageSet
from benchmark.plugins import Context
from benchmark.training import TrainConfig, to_float, train

log = logging.getLogger(__name__)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float,
             init_std: float, gen: torch.Generator) -> torch.Tensor:
    """Untargeted L∞ PGD maximizing cross-entropy, from ``x`` plus Gaussian noise of std ``init_std``;
    every iterate stays within ``eps`` of ``x`` and in [0, 1]."""
    noise = torch.randn(x.shape, generator=gen).to(x.device) * init_std
    x_adv = torch.min(torch.max(x + noise, x - eps), x + eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv).float(), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def cutout(x: torch.Tensor, side_h: int, side_w: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one ``side_h`` x ``side_w`` square per image, centred uniformly anywhere in the image and
    clipped at its border (DeVries & Taylor's Cutout)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), generator=gen).to(x.device) - side_h // 2
    cx = torch.randint(0, w, (n, 1), generator=gen).to(x.device) - side_w // 2
    rows, cols = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
    in_rows = (rows >= cy) & (rows < cy + side_h)
    in_cols = (cols >= cx) & (cols < cx + side_w)
    return x.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)


def orthonormal_directions(weight: torch.Tensor) -> torch.Tensor:
    """Q (D x K) with orthonormal columns spanning the rows of ``weight`` (K x D): the QR decomposition of
    the row-normalized weights, as in the reference's ``get_q_matrix``."""
    rows = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q, _ = torch.linalg.qr(rows.T)
    return q


def project_out(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """X - Q Qᵀ X on flattened images: what is left is orthogonal to every column of ``q``."""
    flat = x.flatten(1)
    return (flat - (flat @ q) @ q.T).view_as(x)


def fit_linear(data: ImageSet, cfg: TrainConfig, ctx: Context) -> torch.Tensor:
    """A bias-free linear classifier (logistic regression) on the flattened [0, 1] pixels; its weight, K x D."""
    torch.manual_seed(ctx.seed)
    features = to_float(data.images).flatten(1)
    model = nn.Linear(features.shape[1], data.num_classes, bias=False)
    result = train(model, features, data.labels, cfg, device=ctx.device, seed=ctx.seed, progress=ctx.progress,
                   desc="ortho_projection linear")
    log.info("ortho_projection: the linear model fits %.1f%% of the training images", result.train_accuracy)
    return model.weight.detach()


class MaxLoss:
    """UEraser's loss: the max cross-entropy over ``repeats`` augmented copies of each image for the first
    ``repeat_steps`` steps, then the loss of one augmented copy (UEraser-Lite). The step count is the state."""

    def __init__(self, augment: nn.Module, repeats: int, repeat_steps: int) -> None:
        self.augment, self.repeats, self.repeat_steps, self.step = augment, repeats, repeat_steps, 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.repeats if self.step < self.repeat_steps else 1
        self.step += 1
        logits = model(self.augment(x.repeat(r, 1, 1, 1)))
        losses = F.cross_entropy(logits.float(), y.repeat(r), reduction="none")
        return losses.view(r, -1).max(0).values.mean(), logits[: len(y)]


def ueraser_augment() -> nn.Module:
    """The reference's augmentation (``UEraser`` in lafeat/ueraser, ``ueraser.py``), from kornia."""
    import kornia.augmentation as K  # imported here: only ueraser needs kornia

    return K.AugmentationSequential(
        K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), same_on_batch=False, p=0.5,
                                 keepdim=True),
        K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=0.5),
        K.RandomChannelShuffle(same_on_batch=False, p=0.5, keepdim=True),
        K.auto.TrivialAugment(),
    )
