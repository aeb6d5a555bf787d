"""The one training loop every attack (and every surrogate) uses, plus evaluation.

In the spirit of airbench: the whole data set lives on the device as a tensor, augmentation is a few
pure tensor functions applied per batch, and the loop fits on one screen. On CUDA it uses bf16
autocast and channels_last; on the CPU it is deterministic for a given seed.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmark.errors import UEBenchError
from benchmark.faults import kill_point

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "constant")
AUGMENTS = ("crop_flip", "flip", "crop", "none")
PRECISIONS = ("auto", "fp32", "bf16")

# (model, x in [0,1] float, y) -> (x, y); y may become soft targets (N x K float), e.g. for mixup.
BatchHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (model, x, y) -> (loss, logits or None); replaces cross-entropy, e.g. for contrastive pretraining.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(_memory_format(x))
    return F.cross_entropy(logits.float(), y), logits


@dataclass(frozen=True)
class Hooks:
    """What a countermeasure changes in the loop: ``batch_hook`` runs on each batch after the protocol's
    augmentation, ``loss_fn`` replaces cross-entropy. The default changes nothing."""

    batch_hook: BatchHook | None = None
    loss_fn: LossFn = cross_entropy_loss

    @property
    def active(self) -> bool:
        return self.batch_hook is not None or self.loss_fn is not cross_entropy_loss


@dataclass(frozen=True)
class TrainConfig:
    """A training protocol. Defaults: the shared protocol of docs/methods.md (training from scratch)."""

    epochs: int = 60             # passes over the training set
    batch_size: int = 128        # images per step
    lr: float = 0.1              # peak learning rate
    optimizer: str = "sgd"       # sgd (momentum, nesterov off) | adamw | adam
    momentum: float = 0.9        # SGD momentum
    weight_decay: float = 5e-4   # L2 (SGD) or decoupled (AdamW) weight decay
    schedule: str = "cosine"     # cosine to 0 over all steps | constant
    augment: str = "crop_flip"   # crop_flip | crop | flip | none
    crop_padding: int = 4        # pixels of zero padding before the random crop
    grad_clip: float = 0.0       # max gradient norm; 0 = off
    warmup_epochs: float = 0.0   # linear learning-rate warmup before the schedule
    precision: str = "auto"      # auto: bf16 autocast on CUDA, float32 on the CPU | fp32 | bf16 (autocast anywhere)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, "epochs", self.epochs, ">= 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (self.lr > 0, "lr", self.lr, "> 0"),
            (self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}"),
            (self.augment in AUGMENTS, "augment", self.augment, f"one of {AUGMENTS}"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0"),
            (self.crop_padding >= 0, "crop_padding", self.crop_padding, ">= 0"),
            (self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, ">= 0"),
            (self.precision in PRECISIONS, "precision", self.precision, f"one of {PRECISIONS}"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise UEBenchError(f"{type(self).__name__}: {name}={value!r} must be {rule}")

    def train_config(self) -> TrainConfig:
        """The protocol part of a subclass (an attack carries its protocol as fields)."""
        return TrainConfig(**{f: getattr(self, f) for f in TrainConfig.__dataclass_fields__})


@dataclass(frozen=True)
class TrainResult:
    train_accuracy: float  # % on the (augmented) batches of the last epoch
    final_loss: float
    steps: int
    seconds: float


# ---------------------------------------------------------------- augmentation: pure tensor functions

def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset, independently per image."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(3), x)


def augment_batch(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.augment in ("crop_flip", "crop"):
        x = random_crop(x, cfg.crop_padding, gen)
    if cfg.augment in ("crop_flip", "flip"):
        x = random_flip(x, gen)
    return x


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; a CPU tensor bound for CUDA goes through pinned memory, asynchronously."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def to_float(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The one uint8 -> float conversion: uint8 images become [0, 1] floats (other tensors: float), on
    ``device`` when given."""
    if device is not None:
        x = to_device(x, device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


# ---------------------------------------------------------------- the loop

def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a protocol's ``precision`` trains under bf16 autocast on ``device`` (weights, optimizer
    state and the loss stay float32 either way)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to 0 (or constant) over the remaining steps."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _memory_format(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
               params: list[nn.Parameter], *, grad_clip: float = 0.0, loss_fn: LossFn = cross_entropy_loss,
               amp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on a batch: the loss (bf16 autocast when ``amp``), backward, the gradient-norm
    clip of ``params`` (0 = off), the step. Returns (loss, logits or None).

    ``train`` calls it for every batch; the defenses whose surrogate steps interleave with their own
    optimization (BAIT, SSC) call it directly.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss, logits = loss_fn(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return loss, logits


def train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *,
          device: torch.device, seed: int, progress: bool = False, desc: str = "train",
          batch_hook: BatchHook | None = None, loss_fn: LossFn = cross_entropy_loss) -> TrainResult:
    """Train the parameters of ``model`` that require grad, in place.

    ``inputs`` are uint8 images (augmented per ``cfg``, scaled to [0, 1]) or float features
    (used as they are; ``cfg.augment`` must then be 'none').
    """
    if inputs.dtype != torch.uint8 and cfg.augment != "none":
        raise UEBenchError(f"augment={cfg.augment!r} needs uint8 images; got {inputs.dtype} inputs")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UEBenchError("train(): the model has no trainable parameters")
    model.to(device=device, memory_format=torch.channels_last)
    data, targets = to_device(inputs, device), to_device(labels, device)  # the whole set stays on the device
    n = len(data)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, steps_per_epoch, cfg))
    gen = torch.Generator().manual_seed(seed)
    use_amp = uses_bf16(cfg.precision, device)
    start, step, loss_value, correct, seen = time.perf_counter(), 0, float("nan"), 0, 0
    bar = tqdm(range(cfg.epochs), desc=desc, leave=False, disable=not progress, unit="ep")
    for _ in bar:
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        correct, seen = 0, 0
        for i in range(0, n, cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            x, y = data[idx], targets[idx]
            if x.dtype == torch.uint8:
                x = to_float(augment_batch(x, cfg, gen))
            if batch_hook is not None:
                x, y = batch_hook(model, x, y)
            loss, logits = train_step(model, x, y, opt, params, grad_clip=cfg.grad_clip, loss_fn=loss_fn,
                                      amp=use_amp)
            sched.step()
            step += 1
            kill_point("train_step")
            loss_value = float(loss.detach())
            if logits is not None:
                hard = y if y.ndim == 1 else y.argmax(1)
                correct += int((logits.argmax(1) == hard).sum())
                seen += len(y)
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{100 * correct / max(seen, 1):.1f}")
    if not math.isfinite(loss_value) and cfg.epochs > 0:
        raise UEBenchError(f"training diverged (loss {loss_value}); lower lr={cfg.lr}")
    return TrainResult(100.0 * correct / seen if seen else float("nan"), loss_value, step, time.perf_counter() - start)


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model`` that require grad (what ``train`` updates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 512,
            delta: torch.Tensor | None = None, amp: bool = True) -> torch.Tensor:
    """The one evaluation helper: logits for every input, in eval mode, on the CPU.

    uint8 images are scaled to [0, 1]; a ``delta`` (one row per input) is added and the sum clipped to
    [0, 1]. ``amp``: bf16 autocast on CUDA (``error_rate`` measures in float32).
    """
    model.eval()
    model.to(device=device, memory_format=torch.channels_last)
    out = []
    for i in range(0, len(inputs), batch_size):
        x = to_float(inputs[i: i + batch_size], device)
        if delta is not None:
            x = (x + delta[i: i + batch_size].to(device)).clamp(0, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out.append(model(_memory_format(x)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    logits = predict(model, inputs, device)
    return 100.0 * float((logits.argmax(1) == labels.cpu()).float().mean())


def error_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor | None,
               device: torch.device, batch_size: int = 512) -> float:
    """Fraction of ``images + delta`` (``delta`` may be None) the model misclassifies, in float32."""
    if len(images) == 0:
        return 0.0
    logits = predict(model, images, device, batch_size, delta, amp=False)
    return int((logits.argmax(1) != labels.cpu()).sum()) / max(1, len(images))


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d{1,3})?", name):
        raise UEBenchError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UEBenchError(f"--device {name}: no CUDA device is available here")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UEBenchError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device(name)
