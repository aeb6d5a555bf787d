"""``bait``: class-wise perturbations bound to incorrect targets against a pretrained surrogate.

Li, Xu, Cai, Fang, Wu, Lao, Ling, Wang, "When Priors Backfire: On the Vulnerability of Unlearnable
Examples to Pretraining", ICLR 2026 (arXiv 2603.04731). Follows the official code (``perturbation.py``,
``toolbox.py``, ``models/GAN.py``) as far as it is known:

- class noise delta_k = eps * mean over class-k images of G(x), G an encoder-residual-decoder CNN with
  a tanh output (about 41M parameters as published; ``generator=small`` for CPU presets);
- per outer epoch: (1) one look-ahead SGD step of a functional copy of the surrogate on
  (x + delta_y, y) -> theta'; (2) a pass over the data: one Adam step on G minimizing
  CE(f_theta'(clip(x + delta_t)), t) with t != y, then each present class's stored delta = the batch
  class mean; (3) one real SGD step (``surrogate_steps``) of the surrogate on (x + delta_y, y);
- targets t follow a curriculum over thirds of the epochs: most confusable wrong class, uniform random
  wrong class, least likely class (``select_targets``).

The look-ahead is computed with ``torch.func.functional_call``. As in the official code (``higher``
with ``copy_initial_weights=True`` and a detached stored delta), no gradient reaches G through theta',
so theta' is built without a second-order graph by default. Deviations: the least-likely target
excludes the true class (the official argmin may pick it), x + delta is clipped to [0, 1] in the
surrogate steps too, and the release rounds delta to whole uint8 steps (the official uint8 cast
truncates). Class means and the per-target gather are one-hot products, so a seed gives the same bytes.

``parametrization="direct"`` (the project's documented variant, not in the paper) optimizes the class
noise itself, a K x C x H x W tensor: each outer batch takes one signed step of ``direct_step`` on
delta against the same loss CE(f_theta'(clip(x + delta_t)), t), with the same targets, look-ahead and
surrogate steps, and clamps it to [-eps, eps]. The outer loss depends on G only through the class
means, and every class-wise delta within eps is the class mean of some G, so the set of releasable
perturbations is the same; what is lost is G's amortization and smoothness prior. It exists because
the small generator does not become class-specific in a CPU budget: G never sees labels, and the
surrogate's first BatchNorm (train mode) cancels any pattern shared by the batch, so a G that is
still one shared pattern gets no useful signal.

Certificate (``release_certificate``, on the released bytes, final surrogate in eval mode): the bind
rate of uniformly random wrong targets (>= 0.9), the surrogate error on x + delta_y (<= 0.1), the
class-specific part of the noise (>= 0.5), the mean cosine between class deltas (<= 0.2), and the
target hit rate of each curriculum stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.models import get_spec
from benchmark.plugins import Certificate, Check, Context, Defense, Protected, certificate
from benchmark.registry import DEFENSES
from benchmark.training import (AUGMENTS, TrainConfig, augment_batch, error_rate, make_optimizer, predict, to_float,
                                train_step)
from defenses._common import batches, class_means, pick, publish, round_linf, surrogate_model

log = logging.getLogger(__name__)

# generator size -> (base width, residual blocks); "published" is the official AdvGAN-style network
GENERATORS = {"published": (16, 8), "small": (4, 2)}
STAGES = ("hard", "random", "least")
PARAMETRIZATIONS = ("generator", "direct")


# ---------------------------------------------------------------- the generator

class ResnetBlock(nn.Module):
    """CycleGAN residual block: reflect pad, conv, BatchNorm, ReLU, reflect pad, conv, BatchNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.BatchNorm2d(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """Encoder (6 convs, 3 downsamplings) - residual bottleneck - decoder (6 transposed convs), tanh.

    Widths ``w, 2w, ..., 32w``; ``w=16`` and 8 blocks is the published network (about 41M parameters).
    """

    def __init__(self, channels: int = 3, width: int = 16, blocks: int = 8) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(6)]
        enc: list[nn.Module] = []
        for i, w in enumerate(widths):
            enc += [nn.Conv2d(channels if i == 0 else widths[i - 1], w, 3, stride=1 + i % 2, padding=1),
                    nn.InstanceNorm2d(w), nn.ReLU()]
        dec: list[nn.Module] = []
        for i, w in enumerate(reversed(widths[:-1])):
            stride = 2 if i % 2 == 0 else 1
            dec += [nn.ConvTranspose2d(widths[-1 - i], w, 3, stride=stride, padding=1, output_padding=stride - 1,
                                       bias=False), nn.InstanceNorm2d(w), nn.ReLU()]
        dec += [nn.ConvTranspose2d(widths[0], channels, 3, stride=1, padding=1, bias=False), nn.Tanh()]
        self.encoder = nn.Sequential(*enc)
        self.bottleneck = nn.Sequential(*[ResnetBlock(widths[-1]) for _ in range(blocks)])
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.bottleneck(self.encoder(x)))
        if out.shape[-2:] != x.shape[-2:]:  # sizes that are not multiples of 8
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


# ---------------------------------------------------------------- pure functions

def curriculum_stage(epoch: int, epochs: int) -> str:
    """The target rule for an outer epoch: thirds of the run (30/30/30 of the published 90)."""
    return STAGES[min(2, 3 * epoch // max(epochs, 1))]


def select_targets(logits: torch.Tensor, labels: torch.Tensor, stage: str, gen: torch.Generator) -> torch.Tensor:
    """Incorrect targets per sample: ``hard`` = argmax over k != y, ``random`` = uniform over k != y,
    ``least`` = argmin over k != y. Never the true class (needs at least two classes)."""
    n, k = logits.shape
    if k < 2:
        raise UEBenchError(f"bait: needs at least 2 classes to pick incorrect targets, got {k}")
    true = F.one_hot(labels, k).bool()
    if stage == "hard":
        return logits.float().masked_fill(true, float("-inf")).argmax(1)
    if stage == "least":
        return logits.float().masked_fill(true, float("inf")).argmin(1)
    if stage == "random":
        shift = torch.randint(1, k, (n,), generator=gen).to(labels.device)
        return (labels + shift) % k
    raise UEBenchError(f"bait: unknown target stage {stage!r}; valid: {', '.join(STAGES)}")


@dataclass(frozen=True)
class LookAhead:
    """A functional copy of a model's state: parameters theta' and (cloned) buffers."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


def lookahead_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, momentum_buffers: dict[str, torch.Tensor] | None = None,
                   create_graph: bool = False) -> LookAhead:
    """One SGD step (PyTorch's SGD rule) of a functional copy of ``model`` on CE(model(x), y).

    The model's own parameters and buffers are not changed (BatchNorm statistics update the clones).
    With ``create_graph`` theta' stays differentiable with respect to the model's parameters.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    logits = functional_call(model, ({**params, **frozen}, buffers), (x,))
    grads = torch.autograd.grad(F.cross_entropy(logits.float(), y), list(params.values()), create_graph=create_graph)
    new: dict[str, torch.Tensor] = dict(frozen)
    for (name, p), g in zip(params.items(), grads):
        d = g + weight_decay * p
        buf = (momentum_buffers or {}).get(name)
        if buf is not None and momentum:
            d = momentum * buf + d
        step = p - lr * d
        new[name] = step if create_graph else step.detach()
    return LookAhead(new, buffers)


def call(model: nn.Module, state: LookAhead, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, (state.params, state.buffers), (x,))


# ---------------------------------------------------------------- the plugin

@DEFENSES.register("bait")
@dataclass(frozen=True)
class Bait(Defense):
    eps: float = 8 / 255                  # L-inf budget, [0, 1] pixel units
    epochs: int = 90                      # outer epochs (30 per curriculum stage)
    generator: str = "published"          # published (~41M params) | small (CPU presets)
    pretrained_surrogate: bool = True     # zoo 'supervised' weights; False = random init
    surrogate_backbone: str = "resnet18"  # zoo backbone of the surrogate (fresh K-way head)
    surrogate_lr: float = 0.1             # SGD learning rate of the surrogate (look-ahead and real steps)
    momentum: float = 0.9                 # surrogate SGD momentum
    weight_decay: float = 5e-4            # surrogate SGD weight decay
    grad_clip: float = 5.0                # max gradient norm of the real surrogate step
    surrogate_steps: int = 1              # real surrogate steps per epoch, on its batch (official --meta_warmup_step)
    generator_lr: float = 1e-3            # Adam learning rate of G
    batch_size: int = 512                 # images per generator step and per surrogate step
    train_portion: float = 1.0            # fraction of the images G trains on (official --use_subset option)
    augment: str = "crop_flip"            # augmentation of the surrogate's batch (the official loader's)
    parametrization: str = "generator"    # generator (published: delta_k = eps * class mean of G(x)) | direct
    direct_step: float = 0.8 / 255        # direct: signed step on delta per outer batch, [0, 1] pixel units

    title = "BAIT: binding perturbations to incorrect targets"
    paper = "2603.04731"
    venue = "ICLR"
    year = 2026
    authors = "Li, Xu, Cai, Fang, Wu, Lao, Ling, Wang"
    norm = "linf"
    granularity = "class"

    def __post_init__(self) -> None:
        checks = [
            (0 < self.eps <= 1, "eps", self.eps, "in (0, 1]"),
            (self.epochs >= 1, "epochs", self.epochs, ">= 1"),
            (self.generator in GENERATORS, "generator", self.generator, f"one of {tuple(GENERATORS)}"),
            (self.surrogate_lr > 0, "surrogate_lr", self.surrogate_lr, "> 0"),
            (0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0"),
            (self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0 = off)"),
            (self.surrogate_steps >= 1, "surrogate_steps", self.surrogate_steps, ">= 1"),
            (self.generator_lr > 0, "generator_lr", self.generator_lr, "> 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (0 < self.train_portion <= 1, "train_portion", self.train_portion, "in (0, 1]"),
            (self.augment in AUGMENTS, "augment", self.augment, f"one of {AUGMENTS}"),
            (self.parametrization in PARAMETRIZATIONS, "parametrization", self.parametrization,
             f"one of {PARAMETRIZATIONS}"),
            (self.direct_step > 0, "direct_step", self.direct_step, "> 0"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise UEBenchError(f"bait: {name}={value!r} must be {rule}")
        get_spec(self.surrogate_backbone)  # raises with the valid names

    def zoo_sources(self) -> frozenset[str]:
        return frozenset({"supervised"} if self.pretrained_surrogate else ())

    def zoo_backbones(self, backbone: str | None) -> frozenset[str]:
        return frozenset({self.surrogate_backbone})

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            run = self.class_noise(train, ctx)
        # whole uint8 steps, so that every image of a class gets exactly the same change (up to clipping)
        released = round_linf(run.delta, self.eps)
        out = publish(train, released[train.labels], "bait")
        cert = release_certificate(run.surrogate, train, out, released, ctx, self.batch_size, run.hit_rates)
        log.info("bait (%s): %s", self.parametrization, cert.describe())
        return Protected(out, cert)

    def class_noise(self, train: ImageSet, ctx: Context) -> BaitRun:
        """Run the bi-level optimization; returns the class noise (K x C x H x W, CPU), the final surrogate
        and the target hit rate of each curriculum stage (averaged over the stage's generator steps)."""
        start = time.perf_counter()
        dev, gen, k, cl = ctx.device, ctx.generator(), train.num_classes, torch.channels_last
        images, labels = train.images.to(dev), train.labels.to(dev)
        model = surrogate_model(self.surrogate_backbone, "supervised" if self.pretrained_surrogate else "scratch",
                                train, ctx).to(memory_format=cl)
        direct = self.parametrization == "direct"
        net = None if direct else Generator(train.image_shape[0], *GENERATORS[self.generator]).to(dev, memory_format=cl)
        opt_g = None if net is None else torch.optim.Adam(net.parameters(), lr=self.generator_lr)
        # the surrogate's protocol: its SGD steps (look-ahead and real) and the augmentation of its batch
        protocol = TrainConfig(batch_size=self.batch_size, lr=self.surrogate_lr, optimizer="sgd",
                               momentum=self.momentum, weight_decay=self.weight_decay, augment=self.augment,
                               grad_clip=self.grad_clip)
        params = [p for p in model.parameters() if p.requires_grad]
        opt_s = make_optimizer(params, protocol)
        delta = torch.zeros(k, *train.image_shape, device=dev)
        n, bs = len(train), self.batch_size
        pool = torch.randperm(n, generator=gen)[: max(1, round(self.train_portion * n))].to(dev)
        hits = {stage: 0 for stage in STAGES}
        seen = {stage: 0 for stage in STAGES}
        loss_g = float("nan")
        for epoch in tqdm(range(self.epochs), desc=f"bait ({self.parametrization})", unit="ep", leave=False,
                          disable=not ctx.progress):
            stage = curriculum_stage(epoch, self.epochs)
            batch = pool[torch.randperm(len(pool), generator=gen)[:bs].to(dev)]
            xs = to_float(augment_batch(images[batch], protocol, gen))
            ys = labels[batch]
            # (1) look-ahead: theta' from one SGD step of a functional copy on (x + delta_y, y)
            model.train()
            buffers = {name: opt_s.state[p]["momentum_buffer"] for name, p in model.named_parameters()
                       if "momentum_buffer" in opt_s.state.get(p, {})}
            theta = lookahead_step(model, (xs + delta[ys]).clamp(0, 1).contiguous(memory_format=cl), ys,
                                   lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay,
                                   momentum_buffers=buffers)
            # (2) a pass of outer steps binding delta_t to the incorrect target t
            epoch_hits = epoch_seen = 0
            order = pool[torch.randperm(len(pool), generator=gen).to(dev)]
            for i in range(0, len(order), bs):
                idx = order[i: i + bs]
                xb, yb = to_float(images[idx]).contiguous(memory_format=cl), labels[idx]
                with torch.no_grad():
                    target = select_targets(call(model, theta, xb), yb, stage, gen)
                if direct:
                    rows = delta.detach().requires_grad_(True)
                    logits = call(model, theta, (xb + pick(rows, target)).clamp(0, 1).contiguous(memory_format=cl))
                    loss = F.cross_entropy(logits.float(), target)
                    grad, = torch.autograd.grad(loss, rows)
                    delta = (delta - self.direct_step * grad.sign()).clamp(-self.eps, self.eps)
                else:
                    means, _ = class_means(net(xb), yb, k)
                    x_adv = (xb + self.eps * pick(means, target)).clamp(0, 1).contiguous(memory_format=cl)
                    logits = call(model, theta, x_adv)
                    loss = F.cross_entropy(logits.float(), target)
                    opt_g.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_g.step()
                    with torch.no_grad():
                        means, present = class_means(net(xb), yb, k)
                        delta[present] = (self.eps * means[present]).clamp(-self.eps, self.eps)
                loss_g = float(loss.detach())
                epoch_hits += int((logits.detach().argmax(1) == target).sum())
                epoch_seen += len(yb)
            hits[stage] += epoch_hits
            seen[stage] += epoch_seen
            log.debug("bait epoch %d (%s): outer loss %.3f, target hit rate %.2f", epoch, stage, loss_g,
                      epoch_hits / max(epoch_seen, 1))
            # (3) real steps of the surrogate on the look-ahead batch with the updated noise
            for _ in range(self.surrogate_steps):
                train_step(model, (xs + delta[ys]).clamp(0, 1), ys, opt_s, params, grad_clip=protocol.grad_clip)
        release = delta.detach() if net is None else self._release(net, images, labels, k)
        rates = {stage: hits[stage] / seen[stage] for stage in STAGES if seen[stage]}
        log.info("bait (%s): %d epochs, outer loss %.3f, target hit rate per stage %s, %.0fs", self.parametrization,
                 self.epochs, loss_g, ", ".join(f"{s} {r:.2f}" for s, r in rates.items()),
                 time.perf_counter() - start)
        return BaitRun(release.cpu(), model.eval(), rates)

    @torch.no_grad()
    def _release(self, net: Generator, images: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """delta_k = eps * mean of G(x) over all class-k training images (G in eval mode), clamped."""
        net.eval()
        sums = torch.zeros(k, *images.shape[1:], device=images.device)
        counts = torch.zeros(k, device=images.device)
        for i in range(0, len(images), self.batch_size):
            xb, yb = to_float(images[i: i + self.batch_size]), labels[i: i + self.batch_size]
            means, _ = class_means(net(xb.contiguous(memory_format=torch.channels_last)), yb, k)
            c = torch.bincount(yb, minlength=k).float()
            sums += means * c.view(-1, 1, 1, 1)
            counts += c
        return (self.eps * sums / counts.clamp(min=1).view(-1, 1, 1, 1)).clamp(-self.eps, self.eps)


@dataclass(frozen=True)
class BaitRun:
    delta: torch.Tensor              # K x C x H x W class noise (float, before rounding), CPU
    surrogate: nn.Module             # the final surrogate (eval mode)
    hit_rates: dict[str, float]      # curriculum stage -> fraction of outer-step samples classified as their target


# the release gate (see docs/methods.md, "Certificates"): the noise binds wrong targets on the surrogate
BIND_GATE = 0.9           # random-target bind rate >=
ERROR_GATE = 0.1          # surrogate error on x + delta_y <=
CLASS_SPECIFIC_GATE = 0.5  # ||delta - mean_k delta|| / ||delta|| >=
COSINE_GATE = 0.2         # mean cosine between two classes' deltas <=


def class_structure(delta: torch.Tensor) -> tuple[float, float]:
    """(class-specific part ||delta - mean_k delta|| / ||delta||, mean cosine between different classes' deltas)."""
    flat = delta.flatten(1).double()
    total = float(flat.norm())
    specific = float((flat - flat.mean(0, keepdim=True)).norm()) / total if total > 0 else 0.0
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.t()
    k = len(flat)
    mean_cos = float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1))) if k > 1 else 0.0
    return specific, mean_cos


@torch.no_grad()
def release_certificate(model: nn.Module, train: ImageSet, out: ImageSet, released: torch.Tensor, ctx: Context,
                        batch_size: int, hit_rates: dict[str, float]) -> Certificate:
    """BAIT's objective measured on the release with the final surrogate in eval mode.

    ``released`` is the rounded class noise (K x C x H x W, whole uint8 steps). The bind rate adds the
    noise of a uniformly random wrong class t to each clean image and counts argmax == t; the error is
    the surrogate's on the published images (x + delta_y).
    """
    model.eval()
    gen = ctx.generator(101)
    step = (released * 255).round().to(torch.int16)
    hits = 0
    for s in batches(len(train), batch_size):
        y = train.labels[s]
        t = select_targets(torch.zeros(len(y), train.num_classes), y, "random", gen)
        x = (train.images[s].to(torch.int16) + step[t]).clamp(0, 255).to(torch.uint8)
        hits += int((predict(model, x, ctx.device, batch_size).argmax(1) == t).sum())
    bind = hits / max(1, len(train))
    error = error_rate(model, out.images, out.labels, None, ctx.device, batch_size)
    specific, mean_cos = class_structure(released)
    return certificate(Check("bind_rate", bind, BIND_GATE, ">="), Check("surrogate_error", error, ERROR_GATE, "<="),
                       Check("class_specific", specific, CLASS_SPECIFIC_GATE, ">="),
                       Check("mean_class_cosine", mean_cos, COSINE_GATE, "<="),
                       **{f"hit_rate_{stage}": rate for stage, rate in hit_rates.items()})
