"""Countermeasures against unlearnable examples, each an attack that modifies a base paradigm.

``adv_training`` (Madry et al., ICLR 2018), ``iss_jpeg`` and ``iss_gray`` (Liu et al., ICML 2023),
``ueraser`` (Qin et al., 2023), ``mixup`` (Zhang et al., ICLR 2018), ``cutmix`` (Yun et al., ICCV
2019), ``cutout`` (DeVries & Taylor, 2017), ``ortho_projection`` (Sandoval-Segura et al., NeurIPS
2023); what each computes and its published defaults: docs/methods.md, "Countermeasures".

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
the projection are a few tensor lines (``attacks/_ops.py``). Library randomness draws from torch's global generator, which
every base seeds from the cell seed before training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torchvision.transforms import v2

from attacks._ops import MaxLoss, cutout, fit_linear, orthonormal_directions, pgd_linf, project_out, ueraser_augment
from benchmark.choices import check_choice
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Attack, Context, Fitted
from benchmark.registry import ATTACKS
from benchmark.training import Hooks, TrainConfig

BASES = ("scratch", "linear_probe", "frozen_shallow", "full_finetune", "sf_pretrain")
PARADIGM_FIELDS = ("weights", "weights_path", "k", "finetune", "pretrain_on")  # the bases' fields beyond TrainConfig


@dataclass(frozen=True)
class Countermeasure(Attack):
    """A base paradigm, trained on transformed images and/or with hooks in its loop.

    The fields after ``base`` are the base paradigms' own (see ``attacks/paradigms.py``); a base uses
    those it has. Subclasses override ``transform`` (the training set, once) and/or ``hooks``.
    """

    base: str = "scratch"             # the paradigm it modifies: one of BASES
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


@dataclass(frozen=True)
class Mixing(Countermeasure):
    """Each batch mixed with itself shifted by one (a torchvision ``transforms.v2`` mixing transform, ``mixer``),
    λ ~ Beta(alpha, alpha) once per batch; the targets are the same convex combination of one-hot labels."""

    alpha: float = 1.0  # Beta(alpha, alpha)

    mixer: ClassVar[type] = v2.MixUp

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(type(self).name, [(self.alpha > 0, "alpha", self.alpha, "> 0")])

    def hooks(self, data: ImageSet, ctx: Context) -> Hooks:
        mix = self.mixer(alpha=self.alpha, num_classes=data.num_classes)
        return Hooks(batch_hook=lambda model, x, y: mix(x, y))


@ATTACKS.register("mixup")
@dataclass(frozen=True)
class MixUp(Mixing):
    """MixUp (``transforms.v2.MixUp``): images and targets are λ x + (1 - λ) x_shifted."""

    title = "mixup"
    paper = "1710.09412"
    venue = "ICLR"
    year = 2018
    authors = "Zhang, Cisse, Dauphin, Lopez-Paz"


@ATTACKS.register("cutmix")
@dataclass(frozen=True)
class CutMix(Mixing):
    """CutMix (``transforms.v2.CutMix``): a box of area 1 - λ is pasted from the shifted batch; the targets mix
    the labels by the pasted area."""

    mixer = v2.CutMix

    title = "CutMix"
    paper = "1905.04899"
    venue = "ICCV"
    year = 2019
    authors = "Yun, Han, Oh, Chun, Choe, Yoo"


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
