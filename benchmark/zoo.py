"""The zoo: backbones with pretrained weights, built once and cached.

Sources of weights:

- ``random``: no pretraining (the control).
- ``supervised``: supervised pretraining on the data set's source pool (a label set or images
  disjoint from the protected data).
- ``sf``: semantic-focused pretraining on the source pool: SimCLR-style contrastive learning
  (NT-Xent) with strong semantics-preserving augmentation (resized crop, colour jitter, grayscale,
  blur, additive noise), so the shallow layers learn to keep semantics and drop low-level noise.
  With ``label_weight > 0`` a cross-entropy term on the pool's labels, computed on the same strong
  views, is added (supervised contrastive flavour): short CPU runs need it, since NT-Xent alone needs
  thousands of steps before its features carry any class information. With ``sf_init="supervised"``
  the contrastive stage starts from the ``supervised`` weights (supervised, then semantic-focused).
  *Interpretation*: this is the project's reading of the SSC paper's "SF-Pretrain", whose definition
  was not available.
- ``timm``: timm's pretrained weights (the hub for users with a network, or a local file). A data set
  without a source pool (CIFAR-10) may take its ``supervised`` weights from timm
  (``supervised_weights="timm"``): the ImageNet backbone is then the supervised pretrained one.
- ``file``: a local checkpoint (safetensors, or ``torch.load(weights_only=True)``; never unpickled).

A preset may give one backbone its own recipe, ``zoo["supervised@vit_tiny"]`` (fields on top of
``zoo["supervised"]``), as the attack protocol does: the families do not learn under one recipe
(docs/methods.md, "Backbone families"). Backbones without one keep the shared recipe and their keys.

Built checkpoints are cached under ``<cache>/zoo/`` by a hash of everything that made them.

Threat models of a surrogate (``SURROGATE_THREAT_MODELS``): ``white-box`` (the default, the papers'
setting) gives a defense's surrogate the victims' own zoo weights; ``transfer`` gives it weights
pretrained with the same recipe but another seed (the zoo seed + 1) on one half of the source pool
(``Zoo.transfer``, ``source_halves``), so they share no weights and no seed with the victims'. It
trains for twice the epochs, the same number of optimizer steps: with the victims' epochs on half
the images the surrogate is far weaker (quick's resnet_tiny: 34.6 % train accuracy against 86.6 %),
and the threat models would then differ in the surrogate's strength, not only in its independence.
The victims keep the weights from the whole pool.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import PROTOCOL_VERSION
from benchmark.augment import StrongAugment
from benchmark.cache import Cache, tensor_digest
from benchmark.choices import PRETRAINED_SOURCES, WEIGHT_SOURCES, PretrainedSource, WeightSource, check_choice
from benchmark.config import convert_fields, instantiate, stable_hash
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.models import Classifier, create_model, get_spec
from benchmark.phases import PHASES
from benchmark.training import TrainConfig, train

log = logging.getLogger(__name__)


SUPERVISED_WEIGHTS = ("pool", "timm")
SURROGATE_THREAT_MODELS = ("white-box", "transfer")  # whose weights a defense's zoo surrogate starts from
TRANSFER_HALF = 1  # the half of the source pool a transfer surrogate pretrains on


def source_halves(pool: ImageSet) -> tuple[ImageSet, ImageSet]:
    """Two disjoint class-balanced halves of a pool: within each class, in pool order, images at even
    positions go to the first half, odd positions to the second."""
    labels = pool.labels
    rank = torch.zeros_like(labels)
    for k in labels.unique():
        where = (labels == k).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    halves = [(rank % 2 == h).nonzero().flatten() for h in (0, 1)]
    if any(len(h) == 0 for h in halves):
        raise UEBenchError(f"source pool {pool.name!r} has {len(pool.labels)} images: too few to split in two halves")
    return tuple(pool.subset(idx, name=f"{pool.name}-half{h}") for h, idx in enumerate(halves))


@dataclass(frozen=True)
class PretrainConfig:
    """How the zoo pretrains (presets scale these down for CPU runs)."""

    supervised: TrainConfig = TrainConfig(epochs=30, lr=0.1, augment="crop_flip")
    sf: TrainConfig = TrainConfig(epochs=60, lr=1e-3, optimizer="adamw", weight_decay=1e-4, batch_size=256,
                                  augment="none")
    temperature: float = 0.2     # NT-Xent temperature
    projection_dim: int = 64     # SimCLR projector output
    augment: StrongAugment = StrongAugment()
    label_weight: float = 0.0    # sf: weight of cross-entropy on the pool's labels (0 = pure SimCLR)
    sf_init: str = "random"      # sf: start from random weights, or from the 'supervised' zoo weights
    seed: int = 0                # the zoo's own seed: the same pretrained weights for every cell seed
    supervised_weights: str = "pool"  # supervised: pretrain on the source pool | timm: timm's (ImageNet) weights
    # per-backbone recipes, {backbone: {"supervised" | "sf": TrainConfig}}, replacing the shared one
    backbones: dict[str, dict[str, TrainConfig]] = field(default_factory=dict, hash=False)

    def for_backbone(self, backbone: str) -> PretrainConfig:
        """This config with ``backbone``'s own recipes in place of the shared ones."""
        return replace(self, **self.backbones.get(backbone, {}), backbones={})

    def recipe(self, sources: Iterable[str], backbones: Iterable[str] | None = ()) -> dict:
        """The part of this config that weights from ``sources`` depend on, as it enters cache and cell
        keys: everything when ``sf`` is among them, else the supervised recipe and the seed. The
        supervised recipe is always included (sf starts from it with ``sf_init=supervised``, and keys
        written before plugins declared their sources include it); other sources add nothing.

        ``backbones``: the backbones the weights are for (``None``: not known, so all); their own recipes
        of these sources are added under ``"backbones"``, which is left out when there are none (a
        backbone without its own recipe keeps the keys it had before per-backbone recipes existed)."""
        sources = set(sources)
        bad = sorted(sources - set(WEIGHT_SOURCES))
        if bad:
            raise UEBenchError(f"unknown zoo source {bad[0]!r}; valid: {', '.join(WEIGHT_SOURCES)}")
        full = asdict(self)
        if self.supervised_weights == "pool":  # the default stays out of keys written before the field existed
            del full["supervised_weights"]
        del full["backbones"]
        out = full if "sf" in sources else {"supervised": full["supervised"], "seed": full["seed"]}
        if "supervised_weights" in full:
            out = {**out, "supervised_weights": self.supervised_weights}
        used = set(PRETRAINED_SOURCES) if "sf" in sources else sources & set(PRETRAINED_SOURCES)
        names = sorted(self.backbones if backbones is None else set(backbones) & set(self.backbones))
        own = {b: {s: asdict(c) for s, c in sorted(self.backbones[b].items()) if s in used} for b in names}
        own = {b: recipes for b, recipes in own.items() if recipes}
        return {**out, "backbones": own} if own else out

    def __post_init__(self) -> None:
        if self.sf_init not in ("random", "supervised"):
            raise UEBenchError(f"zoo: sf_init={self.sf_init!r} must be 'random' or 'supervised'")
        if self.supervised_weights not in SUPERVISED_WEIGHTS:
            raise UEBenchError(f"zoo: supervised_weights={self.supervised_weights!r} must be one of "
                               f"{SUPERVISED_WEIGHTS}")
        if self.label_weight < 0:
            raise UEBenchError(f"zoo: label_weight={self.label_weight} must be >= 0")
        for backbone, recipes in self.backbones.items():
            get_spec(backbone)  # an unknown name fails with the valid names
            bad = sorted(set(recipes) - set(PRETRAINED_SOURCES))
            if bad or not all(isinstance(c, TrainConfig) for c in recipes.values()):
                raise UEBenchError(f"zoo: the recipes of backbone {backbone!r} must be TrainConfigs named "
                                   f"{' or '.join(PRETRAINED_SOURCES)}; got {sorted(recipes)}")
        if not self.temperature > 0 or self.projection_dim < 1 or self.seed < 0:
            raise UEBenchError(f"zoo: temperature={self.temperature} must be > 0, projection_dim="
                               f"{self.projection_dim} >= 1 and seed={self.seed} >= 0")


class Projected(nn.Module):
    """Backbone features followed by a 2-layer projector, for contrastive pretraining."""

    def __init__(self, backbone: Classifier, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        width = backbone.head.in_features
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.features(x))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized-temperature cross-entropy over 2N views."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _contrastive_loss(cfg: PretrainConfig, gen: torch.Generator):
    def loss_fn(model: Projected, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        v1, v2 = cfg.augment(x, gen), cfg.augment(x, gen)
        feats = model.backbone.features(torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last))
        z = model.projector(feats)
        loss = nt_xent(z[: len(x)], z[len(x):], cfg.temperature)
        if cfg.label_weight > 0:
            loss = loss + cfg.label_weight * F.cross_entropy(model.backbone.head(feats).float(), torch.cat([y, y]))
        return loss, None

    return loss_fn


def pretrain_config(overrides: dict | None) -> PretrainConfig:
    """A ``PretrainConfig`` from a preset's ``zoo`` table: ``{"supervised": {...}, "sf": {...}, ...}``, and
    ``"supervised@<backbone>"`` / ``"sf@<backbone>"`` for one backbone's own recipe (fields on top of the
    shared one). Every value is checked against its field's type (``benchmark.config.convert_fields``)
    and range."""
    if overrides is not None and not isinstance(overrides, dict):
        raise UEBenchError(f"zoo must be a table, got {type(overrides).__name__} {overrides!r}")
    overrides = dict(overrides or {})
    if "backbones" in overrides:
        raise UEBenchError("zoo: give one backbone its own recipe as zoo[\"supervised@<backbone>\"] (or sf@...), "
                           "not zoo.backbones")
    base = PretrainConfig()
    kwargs = {}
    for name in PRETRAINED_SOURCES:
        if name in overrides:
            fields = convert_fields(TrainConfig, overrides.pop(name), f"zoo.{name}")
            kwargs[name] = instantiate(functools.partial(replace, getattr(base, name)), fields, f"zoo.{name}")
    own: dict[str, dict[str, TrainConfig]] = {}
    for key in sorted(k for k in overrides if isinstance(k, str) and "@" in k):
        name, _, backbone = key.partition("@")
        if name not in PRETRAINED_SOURCES:
            raise UEBenchError(f"zoo[{key!r}]: a per-backbone recipe is {' or '.join(PRETRAINED_SOURCES)}"
                               f"@<backbone>, not {name!r}")
        get_spec(backbone)  # an unknown name fails with the valid names
        fields = convert_fields(TrainConfig, overrides.pop(key), f"zoo.{key}")
        shared = kwargs.get(name, getattr(base, name))
        own.setdefault(backbone, {})[name] = instantiate(functools.partial(replace, shared), fields, f"zoo.{key}")
    if own:
        kwargs["backbones"] = own
    if "augment" in overrides:
        fields = convert_fields(StrongAugment, overrides.pop("augment"), "zoo.augment")
        kwargs["augment"] = instantiate(functools.partial(replace, base.augment), fields, "zoo.augment")
    scalars = convert_fields(PretrainConfig, overrides, "zoo")
    return instantiate(functools.partial(replace, base), {**kwargs, **scalars}, "zoo")


def pretrain(backbone: str, source: str, pool: ImageSet, cfg: PretrainConfig, *, device: torch.device,
             progress: bool = False, init: dict[str, torch.Tensor] | None = None) -> Classifier:
    """Pretrain a backbone on ``pool`` (supervised or sf), from ``init`` weights if given; returns it
    with the pool's head."""
    check_choice("pretrain()", "source", source, PretrainedSource)
    cfg = cfg.for_backbone(backbone)
    torch.manual_seed(cfg.seed)
    model = create_model(backbone, pool.num_classes, pool.image_shape[-1], pool.image_shape[0])
    if init is not None:
        model.net.load_state_dict(init)
    if source == "supervised":
        result = train(model, pool.images, pool.labels, cfg.supervised, device=device, seed=cfg.seed,
                       progress=progress, desc=f"pretrain {backbone} (supervised)")
        log.info("supervised pretraining of %s: train accuracy %.1f%% in %.0fs", backbone,
                 result.train_accuracy, result.seconds)
    else:  # sf
        wrapper = Projected(model, cfg.projection_dim)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        result = train(wrapper, pool.images, pool.labels, cfg.sf, device=device, seed=cfg.seed, progress=progress,
                       desc=f"pretrain {backbone} (sf)", loss_fn=_contrastive_loss(cfg, gen))
        log.info("sf pretraining of %s: final NT-Xent %.3f in %.0fs", backbone, result.final_loss, result.seconds)
    return model.cpu()


def load_state(model: Classifier, state: dict[str, torch.Tensor], what: str) -> None:
    """Load weights, skipping the classifier (its shape depends on the label set)."""
    head = {n for n, _ in model.net.named_parameters() if n.startswith(_head_prefix(model))}
    own = model.net.state_dict()
    body = {k: v for k, v in state.items() if k not in head and k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in body and k not in head and not k.endswith("num_batches_tracked")]
    if missing:
        raise UEBenchError(f"{what}: checkpoint does not fit {model.spec.name}; missing or mismatched "
                           f"{len(missing)} tensors, e.g. {missing[:3]}")
    model.net.load_state_dict(body, strict=False)


def _head_prefix(model: Classifier) -> str:
    head = model.head
    for name, module in model.net.named_modules():
        if module is head:
            return name + "."
    return "\0"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``: no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise UEBenchError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UEBenchError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or unsafe files
        raise UEBenchError(f"cannot read checkpoint {str(path)!r} safely: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UEBenchError(f"checkpoint {str(path)!r} is not a state dict of tensors")
    return {k.removeprefix("net."): v for k, v in obj.items()}


class Zoo:
    """Pretrained backbones for one data set, cached by content hash."""

    def __init__(self, cache_dir: str | Path, *, pool: ImageSet | None, pool_key: dict | str,
                 config: PretrainConfig = PretrainConfig(), device: torch.device = torch.device("cpu"),
                 progress: bool = False) -> None:
        self.cache = Cache(cache_dir)
        self.pool = pool
        self.pool_key = pool_key
        self.config = config
        self.device = device
        self.progress = progress

    def with_pool(self, pool: ImageSet) -> Zoo:
        """The same zoo pretraining on another pool (e.g. the protected images, whose labels it never uses)."""
        return Zoo(self.cache.root, pool=pool, pool_key={"images": tensor_digest({"x": pool.images})},
                   config=replace(self.config, label_weight=0.0, sf_init="random"), device=self.device,
                   progress=self.progress)

    def transfer(self) -> Zoo:
        """The zoo of a ``transfer`` surrogate: the same recipe with the zoo seed + 1, on half
        ``TRANSFER_HALF`` of the source pool, for twice the epochs (and warmup epochs), so it takes as
        many optimizer steps as the victims' weights; its cache entries are apart from the victims'."""
        if self.config.supervised_weights != "pool":
            raise UEBenchError(f"threat model 'transfer' pretrains the surrogate on half of the source pool, but this "
                               f"zoo takes its supervised weights from {self.config.supervised_weights!r}; use "
                               f"'white-box' or a data set with a source pool")
        if self.pool is None:
            raise UEBenchError("threat model 'transfer' pretrains the surrogate on half of the source pool, and this "
                               "data set has none; use 'white-box'")
        key = self.pool_key if isinstance(self.pool_key, dict) else {"pool": self.pool_key}
        half = source_halves(self.pool)[TRANSFER_HALF]
        passes = round(len(self.pool.labels) / len(half.labels))  # 2: the same steps on half the images

        def longer(cfg: TrainConfig) -> TrainConfig:
            return replace(cfg, epochs=cfg.epochs * passes, warmup_epochs=cfg.warmup_epochs * passes)

        config = replace(self.config, seed=self.config.seed + 1, supervised=longer(self.config.supervised),
                         sf=longer(self.config.sf),
                         backbones={b: {s: longer(c) for s, c in recipes.items()}
                                    for b, recipes in self.config.backbones.items()})
        return Zoo(self.cache.root, pool=half, pool_key={**key, "half": TRANSFER_HALF}, config=config,
                   device=self.device, progress=self.progress)

    def key(self, backbone: str, source: str) -> str:
        return stable_hash({"backbone": get_spec(backbone).key(), "source": source, "pool": self.pool_key,
                            "config": self.config.recipe({source}, {backbone}), "protocol_version": PROTOCOL_VERSION})

    def build(self, backbone: str, source: str) -> tuple[dict[str, torch.Tensor], bool]:
        """The pretrained state dict (from the cache when present); returns (state, was_cached). With
        ``supervised_weights="timm"`` the supervised weights are timm's (its own cache, not the zoo's)."""
        if source == "supervised" and self.config.supervised_weights == "timm":
            return _timm_weights(backbone, None), False
        if self.pool is None:
            raise UEBenchError(f"this data set has no source pool to pretrain {backbone!r} on; "
                               f"use weights from timm or a file")
        start = time.perf_counter()

        def make() -> tuple[dict[str, torch.Tensor], dict]:
            init = None  # read only when the sf weights are built, not on every cache hit
            if source == "sf" and self.config.sf_init == "supervised":
                init, _ = self.build(backbone, "supervised")
            with PHASES.timed(f"zoo {backbone} ({source})"):
                model = pretrain(backbone, source, self.pool, self.config, device=self.device,
                                 progress=self.progress, init=init)
            return dict(model.net.state_dict()), {"backbone": backbone, "source": source,
                                                  "seconds": time.perf_counter() - start}

        state, meta, hit = self.cache.get_or_build("zoo", self.key(backbone, source), make)
        if hit:
            log.info("zoo: loaded %s (%s) from cache", backbone, source)
        else:
            log.info("zoo: built %s (%s) in %.0fs", backbone, source, meta["seconds"])
        return state, hit

    def get(self, backbone: str, source: str, num_classes: int, image_size: int, in_chans: int = 3,
            path: str | None = None) -> Classifier:
        """A backbone with ``source`` weights and a fresh ``num_classes``-way head."""
        check_choice("zoo", "weight source", source, WeightSource)
        model = create_model(backbone, num_classes, image_size, in_chans)
        if source == "random":
            return model
        if source in PRETRAINED_SOURCES:
            state, _ = self.build(backbone, source)
            load_state(model, state, f"zoo {backbone} ({source})")
        elif source == "timm":
            load_state(model, _timm_weights(backbone, path), f"timm weights for {backbone}")
        else:
            if not path:
                raise UEBenchError("weight source 'file' needs a checkpoint path")
            load_state(model, read_checkpoint(path), f"checkpoint {path}")
        return model


def _timm_weights(backbone: str, path: str | None) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for the spec's architecture: from ``path`` or the hub."""
    import timm

    spec = get_spec(backbone)
    if path:
        return read_checkpoint(path)
    try:
        net = timm.create_model(spec.timm_name, pretrained=True, **spec.kwargs)
    except Exception as exc:  # hub errors come in many types; all mean "not available here"
        raise UEBenchError(f"cannot fetch timm weights for {spec.timm_name!r} ({exc}); pass a local file "
                           f"(weights path) on machines without a network") from exc
    return net.state_dict()
