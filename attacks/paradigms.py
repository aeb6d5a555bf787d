"""Victim paradigms that start from a pretrained backbone (the zoo).

| name | init | trainable |
|---|---|---|
| ``linear_probe`` | zoo (``supervised``) | the classifier only |
| ``frozen_shallow`` | zoo (``supervised``) | all but the stem and the first ``k`` stages |
| ``full_finetune`` | zoo (``supervised``) | everything, small learning rate |
| ``sf_pretrain`` | zoo (``sf``), or SF pretraining on the protected images themselves | per ``finetune`` |

Each paradigm declares what it freezes (``freezing()``, a ``Freeze``) and, where it is not the data
set's source pool, what the zoo pretrains on (``pretraining_pool()``); the shared ``_fit`` loads the
zoo weights, applies the declaration and trains the rest through the one training loop.

Protocol defaults (docs/methods.md, "Victim protocol"): SGD momentum 0.9, lr 1e-3 for pretrained inits (BAIT's fine-tuning
protocol), lr 0.1 for the linear probe's head, cosine, batch 128, crop (pad 4) + flip.
References: Li et al., "When Priors Backfire", ICLR 2026 (arXiv 2603.04731) for full fine-tuning;
Wang et al., "Channel-Level Semantic Perturbations", 2026 (arXiv 2605.05224) for frozen shallow
layers and SF-Pretrain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from benchmark.choices import WeightSource, check_choice
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.models import Classifier, body_stages
from benchmark.plugins import Attack, Context, Fitted
from benchmark.registry import ATTACKS
from benchmark.training import Hooks, TrainConfig, to_float, train, trainable_parameters

log = logging.getLogger(__name__)

FINETUNES = ("frozen_shallow", "full", "linear")  # sf_pretrain's finetune field: which paradigm's freezing


@dataclass(frozen=True)
class Freeze:
    """What a paradigm freezes of a pretrained backbone; everything else trains."""

    stages: int = 0           # the stem and the first ``stages`` body stages (0 = nothing)
    head_only: bool = False   # freeze everything but the classifier layer (a linear probe; ``stages`` unused)

    def apply(self, model: Classifier) -> None:
        if self.head_only:
            model.freeze_all_but_head()
        else:
            model.freeze_stages(self.stages)


# the most memory the outputs of a frozen part may take; above it the frozen part runs in every step instead
FROZEN_OUTPUTS_MAX_BYTES = 2 * 2**30


def finetune(model: Classifier, data: ImageSet, cfg: TrainConfig, ctx: Context, freeze: Freeze,
             desc: str, hooks: Hooks = Hooks()) -> Fitted:
    """Freeze what ``freeze`` declares and train the rest of ``model`` on ``data`` (the shared paradigm step),
    with a countermeasure's ``hooks`` in the loop.

    Without augmentation and hooks the frozen part's outputs are the same in every epoch, so they are
    computed once and the trainable rest trains on them (the same loop, the same steps and batches; the
    frozen modules are in eval mode either way): the linear probe's head on the pooled features, the
    rest of the network after ``k`` frozen stages on the last frozen stage's outputs."""
    freeze.apply(model)
    result = None
    if cfg.augment == "none" and not hooks.active and (freeze.head_only or freeze.stages):
        # the weights in channels_last, as ``train`` puts them (another format picks other kernels); the frozen
        # part in eval mode (``train`` puts the trainable rest in train mode)
        model.to(device=ctx.device, memory_format=torch.channels_last).eval()
        prefix, suffix = (model.features, model.head) if freeze.head_only else model.split(freeze.stages)
        outputs = frozen_outputs(prefix, data, ctx.device)
        if outputs is not None:
            result = train(suffix, outputs, data.labels, cfg, device=ctx.device, seed=ctx.seed,
                           progress=ctx.progress, desc=desc)
    if result is None:
        result = train(model, data.images, data.labels, cfg, device=ctx.device, seed=ctx.seed,
                       progress=ctx.progress, desc=desc, batch_hook=hooks.batch_hook, loss_fn=hooks.loss_fn)
    return Fitted(model, train_accuracy=result.train_accuracy, epochs=cfg.epochs,
                  trainable_parameters=trainable_parameters(model))


def frozen_outputs(prefix: Callable[[torch.Tensor], torch.Tensor], data: ImageSet,
                   device: torch.device, batch_size: int = 512) -> torch.Tensor | None:
    """``prefix`` (a frozen part, in eval mode) applied once to every image, as float32 on ``device``; None
    when they would take more than ``FROZEN_OUTPUTS_MAX_BYTES``."""
    outputs = None
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = to_float(data.images[i: i + batch_size], device)
            out = prefix(x.contiguous(memory_format=torch.channels_last)).float()
            if outputs is None:
                size = len(data) * out[0].numel() * 4
                if size > FROZEN_OUTPUTS_MAX_BYTES:
                    log.info("frozen outputs would take %.1f GiB: the frozen part runs in every step", size / 2**30)
                    return None
                outputs = torch.empty((len(data), *out.shape[1:]), device=device)
            outputs[i: i + len(out)] = out
    return outputs


@dataclass(frozen=True)
class PretrainedAttack(Attack):
    """Shared fields of the paradigms that start from zoo weights."""

    lr: float = 1e-3            # BAIT's fine-tuning learning rate
    weights: str = "supervised"  # zoo source: supervised | sf | timm | file | random (control)
    weights_path: str = ""       # checkpoint for weights=file (or a local timm file)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "weights", self.weights, WeightSource)

    def freezing(self) -> Freeze:
        """What this paradigm freezes (the rest trains); nothing unless a subclass says otherwise."""
        return Freeze()

    def pretraining_pool(self, data: ImageSet) -> ImageSet | None:
        """The images the zoo pretrains on for this paradigm: ``None`` = the data set's source pool."""
        return None

    def check_backbone(self, backbone: str) -> None:
        """The stages it freezes must exist in ``backbone`` (counted without building its weights)."""
        freeze = self.freezing()
        if freeze.head_only or not freeze.stages:
            return
        n = body_stages(backbone)
        if freeze.stages > n:
            raise UEBenchError(f"attack {self.name!r}: k={freeze.stages} is out of range for backbone {backbone!r}, "
                               f"which has {n} body stages (k must be in [0, {n}])")

    def _fit(self, data: ImageSet, backbone: str, ctx: Context) -> Fitted:
        return self.fit_with(data, backbone, ctx, Hooks())

    def fit_with(self, data: ImageSet, backbone: str, ctx: Context, hooks: Hooks, desc: str = "") -> Fitted:
        """Load the zoo weights, freeze, train with ``hooks`` in the loop (a countermeasure's; ``_fit`` passes
        none)."""
        model = self.pretrained(data, backbone, ctx, pool=self.pretraining_pool(data))
        return finetune(model, data, self.train_config(), ctx, self.freezing(), f"{desc or self.name} {backbone}",
                        hooks)

    def zoo_sources(self) -> frozenset[str]:
        return frozenset({self.weights} - {"random"})  # random: the control, no zoo weights

    def pretrained(self, data: ImageSet, backbone: str, ctx: Context, pool: ImageSet | None = None) -> Classifier:
        if ctx.zoo is None:
            raise UEBenchError(f"attack {self.name!r} needs the zoo, but the context has none")
        zoo = ctx.zoo if pool is None else ctx.zoo.with_pool(pool)
        c, h, _ = data.image_shape
        torch.manual_seed(ctx.seed)  # the fresh head: the same for a cell whatever ran before it
        return zoo.get(backbone, self.weights, data.num_classes, h, c, self.weights_path or None)


@ATTACKS.register("linear_probe")
@dataclass(frozen=True)
class LinearProbe(PretrainedAttack):
    """Train only the classifier on frozen pretrained features. Without augmentation the features are
    computed once and the head trains on them (same loop, same protocol)."""

    lr: float = 0.1  # head learning rate

    title = "Linear probe on a pretrained backbone"

    def freezing(self) -> Freeze:
        return Freeze(head_only=True)


@ATTACKS.register("frozen_shallow")
@dataclass(frozen=True)
class FrozenShallow(PretrainedAttack):
    """Freeze the stem and the first ``k`` stages of a pretrained backbone, train the rest."""

    k: int = 1  # frozen leading stages (besides the stem)

    title = "Frozen shallow layers (pretrained)"
    paper = "2605.05224"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 0:
            raise UEBenchError(f"frozen_shallow: k={self.k} must be >= 0")

    def freezing(self) -> Freeze:
        return Freeze(stages=self.k)


@ATTACKS.register("full_finetune")
@dataclass(frozen=True)
class FullFinetune(PretrainedAttack):
    """Fine-tune every parameter of a pretrained backbone with a small learning rate."""

    title = "Full fine-tuning (pretrained)"
    paper = "2603.04731"


@ATTACKS.register("sf_pretrain")
@dataclass(frozen=True)
class SFPretrain(PretrainedAttack):
    """Semantic-focused pretraining (SimCLR-style, strong augmentation), then fine-tuning.

    ``pretrain_on=source`` uses the zoo's ``sf`` weights (pretrained on the source pool);
    ``pretrain_on=protected`` pretrains self-supervised on the unlabeled protected images themselves.
    Interpretation: the SSC paper's definition of SF-Pretrain was not available (see zoo.py).
    """

    weights: str = "sf"
    finetune: str = "frozen_shallow"  # frozen_shallow | full | linear
    k: int = 1                        # frozen stages for finetune=frozen_shallow
    pretrain_on: str = "source"       # source | protected

    title = "SF-Pretrain (semantic-focused pretraining), then fine-tuning"
    paper = "2605.05224"
    interpretation = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("sf_pretrain", "finetune", self.finetune, FINETUNES)
        if self.pretrain_on not in ("source", "protected"):
            raise UEBenchError(f"sf_pretrain: pretrain_on={self.pretrain_on!r} must be 'source' or 'protected'")
        if self.pretrain_on == "protected" and self.weights != "sf":
            raise UEBenchError("sf_pretrain: pretrain_on=protected needs weights=sf")

    def freezing(self) -> Freeze:
        """The freezing of the paradigm ``finetune`` names (``k`` stages for frozen_shallow)."""
        freezes = {"frozen_shallow": Freeze(stages=self.k), "full": Freeze(), "linear": Freeze(head_only=True)}
        return freezes[self.finetune]

    def pretraining_pool(self, data: ImageSet) -> ImageSet | None:
        return data if self.pretrain_on == "protected" else None
