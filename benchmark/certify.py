"""Is a perturbation a shortcut by itself? The certificate of the class-wise shortcut defenses.

LSP, OPS, AR, CUDA and class-wise random noise all rest on one claim: the change they add to an
image is, on its own, enough to tell the image's class, and so easy to learn that a victim learns it
instead of the real task (Yu et al., "Availability Attacks Create Shortcuts", KDD 2022). Whether the
released bytes still carry such a shortcut (after rounding to uint8 and clipping to [0, 255]) is
measured directly: a small CNN is trained on the perturbation alone (protected minus clean, no image
content) to predict the labels, and its accuracy on held-out images is the certificate's number. A
shortcut gives near-perfect held-out accuracy; sample-wise noise, or a perturbation that
quantization erased, gives chance.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Check, Context
from benchmark.training import TrainConfig, predict, train

log = logging.getLogger(__name__)

SEED_OFFSET = 424_243    # separates the check's random streams from the defense's own
MIN_STEPS = 100          # optimizer steps at least: a small set gets more epochs, never fewer steps
WIDTHS = (8, 16, 32)     # channels of the three conv layers of the check's CNN


def shortcut_net(channels: int, size: tuple[int, int], num_classes: int) -> nn.Module:
    """Three 3x3 conv + BN + ReLU layers (``WIDTHS`` channels; the last two stride 2), flattened into a
    linear layer: no global pooling, so the classifier sees where a pattern is (a one-pixel shortcut is
    positional). Narrow (8-16-32 channels), so that the check stays within seconds on a CPU."""
    layers: list[nn.Module] = []
    cin, (h, w) = channels, size
    for cout, stride in zip(WIDTHS, (1, 2, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin, h, w = cout, (h - 1) // stride + 1, (w - 1) // stride + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * h * w, num_classes))


def split_indices(labels: torch.Tensor, max_images: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_images`` random images, split per class into 80 % to train on and 20 % held out
    (a class with at least two images keeps one out; a class with one image only trains)."""
    picked = torch.randperm(len(labels), generator=gen)[:max_images]
    fit, held = [], []
    for k in labels[picked].unique().tolist():
        mine = picked[labels[picked] == k]
        cut = min(len(mine) - 1, round(0.8 * len(mine))) if len(mine) > 1 else 1
        fit.append(mine[:cut])
        held.append(mine[cut:])
    return torch.cat(fit), torch.cat(held)


def shortcut_check(clean: ImageSet, protected: ImageSet, ctx: Context, *, threshold: float = 0.9,
                   max_images: int = 5000, epochs: int = 4) -> Check:
    """``Check("shortcut_accuracy", held-out accuracy, threshold, ">=")``: how well the perturbation alone
    predicts the labels. A class-wise shortcut defense intends exactly this (a change that is learnable
    by itself, so the victim learns it instead of the task); if a small CNN cannot learn it from the
    released bytes, the defense did not reach its objective on these data.

    The perturbation is ``protected.images - clean.images`` (uint8 bytes, so what quantization kept),
    divided by its global std so that its scale does not matter. A small positional CNN
    (``shortcut_net``) trains on a class-stratified random 80 % of up to ``max_images`` images for
    ``epochs`` epochs (at least ``MIN_STEPS`` steps: Adam lr 1e-3, batch 128, no augmentation, through
    ``benchmark.training.train``) and the check's value is its accuracy, a fraction in [0, 1], on the
    other 20 %. The split, the initialization and the batches are seeded from ``ctx.seed``, so the
    value is the same for the same seed. It takes about 3 s for 5000 32x32 images on one CPU core.
    """
    if protected.images.shape != clean.images.shape or not torch.equal(protected.labels, clean.labels):
        raise UEBenchError(f"shortcut_check: the protected set {protected.name!r} does not match the clean set "
                           f"{clean.name!r} (shapes {tuple(protected.images.shape)} and "
                           f"{tuple(clean.images.shape)}, or different labels)")
    if max_images < 2 or epochs < 1 or not 0 <= threshold <= 1:
        raise UEBenchError(f"shortcut_check: max_images={max_images!r} must be >= 2, epochs={epochs!r} >= 1 and "
                           f"threshold={threshold!r} in [0, 1]")
    fit, held = split_indices(clean.labels, max_images, ctx.generator(SEED_OFFSET))
    if len(held) == 0:
        raise UEBenchError(f"shortcut_check: {len(clean)} images leave none to hold out; it needs at least "
                           f"two images of some class")
    index = torch.cat([fit, held])
    delta = protected.images[index].float() - clean.images[index].float()
    std = float(delta.std()) if delta.numel() > 1 else 0.0
    delta = delta / std if std > 0 else delta
    labels = clean.labels[index]
    c, h, w = clean.image_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed * 1_000_003 + SEED_OFFSET)
        model = shortcut_net(c, (h, w), clean.num_classes)
    steps_per_epoch = -(-len(fit) // 128)
    cfg = TrainConfig(epochs=max(epochs, -(-MIN_STEPS // steps_per_epoch)), batch_size=128, lr=1e-3,
                      optimizer="adam", weight_decay=0.0, schedule="constant", augment="none")
    train(model, delta[: len(fit)], labels[: len(fit)], cfg, device=ctx.device,
          seed=ctx.seed * 1_000_003 + SEED_OFFSET, desc="shortcut check")
    logits = predict(model, delta[len(fit):], ctx.device)
    accuracy = float((logits.argmax(1) == labels[len(fit):]).float().mean())
    log.debug("shortcut check on %s: held-out accuracy %.3f (%d train, %d held out, std %.3g)", protected.name,
              accuracy, len(fit), len(held), std)
    return Check("shortcut_accuracy", accuracy, threshold, ">=")
