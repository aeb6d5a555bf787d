"""Countermeasures against unlearnable examples, each an attack that modifies a base paradigm.

| name | what it changes | where | reference |
|---|---|---|---|
| ``adv_training`` | PGD-10 adversarial examples (L∞ 8/255, step 2/255, Gaussian start) replace each batch | per batch | Madry et al., ICLR 2018 |
| ``iss_jpeg`` | JPEG at quality 10 | the training images, once | Liu et al., ICML 2023 (ISS) |
| ``iss_gray`` | grayscale, the channel count kept | the training images, once | Liu et al., ICML 2023 (ISS) |
| ``ueraser`` | plasma brightness and contrast, channel shuffle, TrivialAugment; max loss over 5 copies | per batch (the loss) | Qin et al., 2023 |
| ``mixup`` | MixUp, Beta(1, 1) | per batch | Zhang et al., ICLR 2018 |
| ``cutmix`` | CutMix, Beta(1, 1) | per batch | Yun et al., ICCV 2019 |
| ``cutout`` | a zeroed square of half the image side (16 px at 32x32) | per batch | DeVries & Taylor, 2017 |
| ``ortho_projection`` | the directions of a linear model fitted on the protected images are projected out | per batch | Sandoval-Segura et al., NeurIPS 2023 |

Every countermeasure has a ``base`` field naming the paradigm it modifies (``scratch`` by default,
``linear_probe``, ``frozen_shallow``, ``full_finetune``, ``sf_pretrain``) and carries the fields those
paradigms have (``weights``, ``k``, ...), so one configured countermeasure is one attack config, with
one cell key; ``configure`` starts it from its base's defaults and preset protocol (``Attack.composes``).
Training is the base's own (``fit_with`` of ``attacks/scratch.py`` and ``attacks/paradigms.py``): a
countermeasure only transforms the training images once (``transform``) and/or puts ``Hooks`` into
the one training loop (``hooks``). The test images are never changed: each method is applied to the
training data only, as in the reference code of UEraser, the projection and the training-time
augmentations (whether the ISS release also transforms its test images was not verified).

Augmentations run batched on tensors: torchvision ``transforms.v2`` (JPEG, Grayscale, MixUp, CutMix)
and kornia (UEraser's augmentations, exactly the reference's ``AugmentationSequential``); Cutout and
the projection are a few tensor lines. Library randomness draws from torch's global generator, which
every base seeds from the cell seed before training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from benchmark.choices import check_choice
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Attack, Context, Fitted
from benchmark.registry import ATTACKS
from benchmark.training import BatchHook, Hooks, TrainConfig, to_float, train

log = logging.getLogger(__name__)

BASES = ("scratch", "linear_probe", "frozen_shallow", "full_finetune", "sf_pretrain")
PARADIGM_FIELDS = ("weights", "weights_path", "k", "finetune", "pretrain_on")  # the bases' fields beyond TrainConfig


@dataclass(frozen=True)
class Countermeasure(Attack):
    """A base paradigm, trained on transformed images and/or with hooks in its loop.

    The fields after ``base`` are the base paradigms' own (see ``attacks/paradigms.py``); a base uses
    those it has. Subclasses override ``transform`` (the training set, once) and/or ``hooks``.
    """

    base: str = "scratch"             # the paradigm it modifies: scratch | linear_probe | frozen_shallow | full_finetune | sf_pretrain
    weights: str = "supervised"       # pretrained bases: zoo source
    weights_path: str = ""            # pretrained bases: checkpoint for weights=file
    k: int = 1                        # frozen_shallow, sf_pretrain: frozen leading stages
    finetune: str = "frozen_shallow"  # sf_pretrain: frozen_shallow | full | linear
    pretrain_on: str = "source"       # sf_pretrain: source | protected

    composes = "base"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(type(self).name, "base", self.base, BASES)
        own = {f.name for f in dataclasses.fields(ATTACKS.get(self.base))}
        for f in dataclasses.fields(Countermeasure):
            if f.name in PARADIGM_FIELDS and f.name not in own and getattr(self, f.name) != f.default:
                raise UEBenchError(f"{type(self).name}: {f.name}={getattr(self, f.name)!r} has no effect on "
                                   f"base={self.base!r}, which has no field {f.name!r}")
        self.paradigm()  # the base's own checks (e.g. k >= 0)

    def paradigm(self) -> Attack:
        """The base paradigm, configured with this countermeasure's fields of it."""
        cls = ATTACKS.get(self.base)
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    def zoo_sources(self) -> frozenset[str]:
        return self.paradigm().zoo_sources()

    def check_backbone(self, backbone: str) -> None:
        self.paradigm().check_backbone(backbone)

    def transform(self, data: ImageSet, ctx: Context) -> ImageSet:
        """The training set the base trains on (once, before training); unchanged by default."""
        return data

    def hooks(self, data: ImageSet, ctx: Context) -> Hooks:
        """What this countermeasure puts into the training loop (``data``: the transformed training set)."""
        return Hooks()

    def _fit(self, data: ImageSet, backbone: str, ctx: Context) -> Fitted:
        data = self.transform(data, ctx)
        return self.paradigm().fit_with(data, backbone, ctx, self.hooks(data, ctx), desc=type(self).name)


# ------------------------------------------------------------------------------------ pure functions

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


def _check(name: str, checks: list[tuple[bool, str, object, str]]) -> None:
    for ok, field, value, rule in checks:
        if not ok:
            raise UEBenchError(f"{name}: {field}={value!r} must be {rule}")


# ------------------------------------------------------------------------------------ the countermeasures

@ATTACKS.register("adv_training")
@dataclass(frozen=True)
class AdvTraining(Countermeasure):
    """Adversarial training: each batch is replaced by its PGD adversarial examples (the reference's
    ``madrys.py`` as APBench and the EM release use it: PGD-10, L∞ 8/255, step 2/255, a Gaussian start of
    std 0.001, the attack run with the model in eval mode, then a training step on the adversarial
    batch). REM also evaluates 4/255 (``eps=4/255``)."""

    eps: float = 8 / 255        # L∞ radius, [0, 1] pixel units
    steps: int = 10             # PGD iterations
    step_size: float = 2 / 255  # per iteration, [0, 1] pixel units
    init_std: float = 0.001     # std of the Gaussian start, [0, 1] pixel units

    title = "Adversarial training (PGD)"
    paper = "1706.06083"
    venue = "ICLR"
    year = 2018
    authors = "Madry, Makelov, Schmidt, Tsipras, Vladu"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(type(self).name, [(0 <= self.eps <= 1, "eps", self.eps, "in [0, 1]"),
                                 (self.steps >= 0, "steps", self.steps, ">= 0"),
                                 (self.step_size >= 0, "step_size", self.step_size, ">= 0"),
                                 (self.init_std >= 0, "init_std", self.init_std, ">= 0")])

    def hooks(self, data: ImageSet, ctx: Context) -> Hooks:
        gen = ctx.generator(offset=71)

        def adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            modes = [m.training for m in model.modules()]
            model.eval()
            try:
                x_adv = pgd_linf(model, x, y, self.eps, self.steps, self.step_size, self.init_std, gen)
            finally:
                for m, mode in zip(model.modules(), modes):
                    m.training = mode
            return x_adv, y

        return Hooks(batch_hook=adversarial)


@ATTACKS.register("iss_jpeg")
@dataclass(frozen=True)
class IssJpeg(Countermeasure):
    """Image Shortcut Squeezing, JPEG: the training images are JPEG-compressed once (torchvision's
    encoder, ``transforms.v2.JPEG``; the reference uses PIL at the same quality)."""

    quality: int = 10  # JPEG quality, 1-100

    title = "Image Shortcut Squeezing: JPEG compression"
    paper = "2301.13838"
    venue = "ICML"
    year = 2023
    authors = "Liu, Zhao, Larson"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(type(self).name, [(1 <= self.quality <= 100, "quality", self.quality, "in [1, 100]")])

    def transform(self, data: ImageSet, ctx: Context) -> ImageSet:
        return data.with_images(v2.JPEG(self.quality)(data.images))


@ATTACKS.register("iss_gray")
@dataclass(frozen=True)
class IssGray(Countermeasure):
    """Image Shortcut Squeezing, grayscale: the training images become gray, their 3 channels kept
    (``Grayscale(3)`` in the reference; one-channel images are left as they are)."""

    title = "Image Shortcut Squeezing: grayscale"
    paper = "2301.13838"
    venue = "ICML"
    year = 2023
    authors = "Liu, Zhao, Larson"

    def transform(self, data: ImageSet, ctx: Context) -> ImageSet:
        c = data.image_shape[0]
        if c == 1:
            return data
        if c != 3:
            raise UEBenchError(f"iss_gray: needs 1- or 3-channel images, got {c} channels")
        return data.with_images(v2.Grayscale(num_output_channels=3)(data.images))


@ATTACKS.register("ueraser")
@dataclass(frozen=True)
class UEraser(Countermeasure):
    """UEraser: the reference's kornia augmentations (plasma brightness, roughness 0.3-0.7 and intensity
    0.5-1, p=0.5; plasma contrast, roughness 0.3-0.7, p=0.5; channel shuffle p=0.5; TrivialAugment) on
    every batch, and for the first ``repeat_epochs`` epochs the loss is the max over ``repeats``
    augmented copies of each image. ``repeat_epochs``: 300 (UEraser-Max, the reference's default, i.e.
    every epoch of any shorter run), 50 (standard), 0 (UEraser-Lite: one copy throughout). The extra
    random JPEG the reference adds against TAP and AR is not part of this attack."""

    repeats: int = 5           # augmented copies of each image whose max loss is taken
    repeat_epochs: int = 300   # epochs with the max loss; one copy afterwards

    title = "UEraser: adversarial augmentations"
    paper = "2303.15127"
    venue = "arXiv"
    year = 2023
    authors = "Qin, Gao, Zhao, Ye, Xu"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(type(self).name, [(self.repeats >= 1, "repeats", self.repeats, ">= 1"),
                                 (self.repeat_epochs >= 0, "repeat_epochs", self.repeat_epochs, ">= 0")])

    def hooks(self, data: ImageSet, ctx: Context) -> Hooks:
        steps_per_epoch = math.ceil(len(data) / self.batch_size)
        return Hooks(loss_fn=MaxLoss(ueraser_augment(), self.repeats, self.repeat_epochs * steps_per_epoch))


def _mixing(transform: v2.Transform) -> BatchHook:
    def hook(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return transform(x, y)
    return hook


@ATTACKS.register("mixup")
@dataclass(frozen=True)
class MixUp(Countermeasure):
    """MixUp (torchvision ``transforms.v2.MixUp``): each batch is mixed with itself shifted by one, with
    one λ ~ Beta(alpha, alpha) per batch; the targets are the same convex combination of one-hot labels."""

    alpha: float = 1.0  # Beta(alpha, alpha)

    title = "mixup"
    paper = "1710.09412"
    venue = "ICLR"
    year = 2018
    authors = "Zhang, Cisse, Dauphin, Lopez-Paz"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(type(self).name, [(self.alpha > 0, "alpha", self.alpha, "> 0")])

    def hooks(self, data: ImageSet, ctx: Context) -> Hooks:
        return Hooks(batch_hook=_mixing(v2.MixUp(alpha=self.alpha, num_classes=data.num_classes)))


@ATTACKS.register("cutmix")
@dataclass(frozen=True)
class CutMix(Countermeasure):
    """CutMix (torchvision ``transforms.v2.CutMix``): a box of area 1 - λ, λ ~ Beta(alpha, alpha), is pasted
    from the batch shifted by one; the targets mix the labels by the pasted area."""

    alpha: float = 1.0  # Beta(alpha, alpha)

    title = "CutMix"
    paper = "1905.04899"
    venue = "ICCV"
    year = 2019
    authors = "Yun, Han, Oh, Chun, Choe, Yoo"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(type(self).name, [(self.alpha > 0, "alpha", self.alpha, "> 0")])

    def hooks(self, data: ImageSet, ctx: Context) -> Hooks:
        return Hooks(batch_hook=_mixing(v2.CutMix(alpha=self.alpha, num_classes=data.num_classes)))


@ATTACKS.register("cutout")
@dataclass(frozen=True)
class Cutout(Countermeasure):
    """Cutout: one square per image is set to 0, its side ``size`` of the image side (16 px at 32x32, the
    CIFAR-10 setting), centred anywhere. The reference cuts after normalization, so its 0 is the data
    set mean; here the cut is in [0, 1] pixels (black) before the network's normalization."""

    size: float = 0.5  # side of the square, a fraction of the image side

    title = "Cutout"
    paper = "1708.04552"
    venue = "arXiv"
    year = 2017
    authors = "DeVries, Taylor"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(type(self).name, [(0 < self.size <= 1, "size", self.size, "in (0, 1]")])

    def hooks(self, data: ImageSet, ctx: Context) -> Hooks:
        _, h, w = data.image_shape
        side_h, side_w = max(1, round(self.size * h)), max(1, round(self.size * w))
        gen = ctx.generator(offset=72)
        return Hooks(batch_hook=lambda model, x, y: (cutout(x, side_h, side_w, gen), y))


@ATTACKS.register("ortho_projection")
@dataclass(frozen=True)
class OrthoProjection(Countermeasure):
    """Orthogonal projection: fit a bias-free linear model W (K x D) on the flattened protected training
    images (the reference: SGD lr 0.1, batch 1024, 20 epochs), take Q from the QR decomposition of its
    row-normalized weights, and train the base on X - Q Qᵀ X.

    Interpretation (the reference's step 2, ``orthogonal_projection_step_2.py``): the victim trains on
    the projected training images; the test images are not projected (the script parses a
    ``--project-test`` flag but evaluates on the unprojected test set). Where this differs: the
    projection runs per batch after the protocol's augmentation (the reference projects once, then
    augments; the same when ``augment=none``), the linear model's schedule is cosine (the reference
    steps down x0.1 at 50 % and 75 %) on shuffled batches, and the reference's extra strong
    augmentations (rotation, affine, colour jitter) are not added: the base paradigm's protocol applies.
    """

    linear_epochs: int = 20        # epochs of the linear model
    linear_lr: float = 0.1         # its SGD learning rate (no momentum, no weight decay)
    linear_batch_size: int = 1024  # its batch size

    title = "Orthogonal projection of the linear shortcut"
    paper = "2305.19254"
    venue = "NeurIPS"
    year = 2023
    authors = "Sandoval-Segura, Singla, Geiping, Goldblum, Goldstein"
    interpretation = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(type(self).name, [(self.linear_epochs >= 1, "linear_epochs", self.linear_epochs, ">= 1"),
                                 (self.linear_lr > 0, "linear_lr", self.linear_lr, "> 0"),
                                 (self.linear_batch_size >= 1, "linear_batch_size", self.linear_batch_size, ">= 1")])

    def linear_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.linear_epochs, batch_size=self.linear_batch_size, lr=self.linear_lr,
                           optimizer="sgd", momentum=0.0, weight_decay=0.0, augment="none")

    def hooks(self, data: ImageSet, ctx: Context) -> Hooks:
        q = orthonormal_directions(fit_linear(data, self.linear_config(), ctx)).to(ctx.device)
        return Hooks(batch_hook=lambda model, x, y: (project_out(x, q), y))
