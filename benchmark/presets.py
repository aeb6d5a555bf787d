"""Presets: a named grid of cells plus its protocol (sizes, epochs, optimizer, augmentation).

A preset is also a TOML file with the same keys (``--preset my.toml``); ``extends = "quick"`` starts
from a built-in preset. Protocol overrides apply per plugin name, ``"*"`` to every attack/defense.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.child import check_timeout
from benchmark.data import DatasetConfig
from benchmark.errors import UEBenchError
from benchmark.registry import Registry


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dataset: DatasetConfig
    defenses: tuple[str, ...]
    attacks: tuple[str, ...]
    backbones: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    defense_protocol: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    attack_protocol: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    zoo: dict[str, Any] = field(default_factory=dict, hash=False)  # PretrainConfig overrides
    protocol_note: str = ""
    cell_timeout: float | None = None  # seconds of plugin work per cell, each cell in a child process; None: no limit
    threat_model: str = "white-box"  # surrogates: the victims' zoo weights (white-box) or independent ones (transfer)


# every built-in defense at its published settings (the plugins' defaults); random noise and em in both modes
ALL_DEFENSES = ("clean", "random_noise", "random_noise:mode=class", "em", "em:mode=class", "tap", "rem", "lsp", "ops",
                "ar", "cuda", "bait", "ssc")

# quick: the tiny victims cannot learn a shift-invariant 8/255 pattern in a short run, so the
# quick protocol trains without augmentation (README, "Presets"; docs/methods.md, "Victim protocol"); standard and paper
# keep the papers' crop + flip.
QUICK = Preset(
    name="quick",
    description="shapes (10k train / 2k test), two CPU-sized backbone families, 1 seed: a CPU run",
    dataset=DatasetConfig("shapes", train_size=10_000, test_size=2_000, source_size=20_000),
    defenses=("clean", "random_noise", "random_noise:mode=class", "em", "em:mode=class", "tap", "rem", "lsp", "ops",
              "ar", "cuda", "bait", "ssc"),
    defense_protocol={"*": {"surrogate_backbone": "resnet_tiny"},
                      "em": {"batch_size": 128, "train_steps": 40, "steps": 1, "step_size": 4 / 255, "max_rounds": 10},
                      "tap": {"surrogate": "supervised", "lr": 0.05, "surrogate_epochs": 3, "surrogate_augment": "none",
                              "steps": 15, "step_size": 2 / 255, "restarts": 1, "augment": False},
                      "rem": {"surrogate": "supervised", "lr": 0.05, "train_steps": 150, "steps": 3,
                              "step_size": 3 / 255, "eot": 1, "adv_steps": 1, "adv_step_size": 4 / 255},
                      "bait": {"parametrization": "direct", "generator": "small", "epochs": 24, "batch_size": 128,
                               "train_portion": 0.15, "surrogate_steps": 6, "augment": "none"},
                      "ssc": {"keep_fraction": 0.75, "rounds": 10, "train_steps": 10, "pgd_steps": 3,
                              "batch_size": 256, "class_subset": 0.2}},
    attacks=("scratch", "linear_probe", "frozen_shallow", "full_finetune", "sf_pretrain"),
    backbones=("resnet_tiny", "mobilenet_tiny"),
    seeds=(0,),
    attack_protocol={"*": {"augment": "none", "batch_size": 128},
                     "scratch": {"epochs": 6, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05},
                     # mobilenet_tiny memorizes shapes under scratch's recipe (15 epochs: 92.8 % train, 20.3 %
                     # validation); far stronger weight decay at a higher lr generalizes in 6 (validation 76.4,
                     # 75.2, 81.2 % over seeds 0-2; docs/methods.md, "Victim protocol")
                     "scratch@mobilenet_tiny": {"lr": 1e-2, "weight_decay": 0.6, "warmup_epochs": 1},
                     "linear_probe": {"epochs": 20, "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0},
                     "frozen_shallow": {"epochs": 3, "lr": 0.05},
                     "full_finetune": {"epochs": 3, "lr": 0.05},
                     "sf_pretrain": {"epochs": 3, "lr": 0.05}},
    zoo={"supervised": {"epochs": 6, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1,
                        "augment": "crop_flip"},
         "sf": {"epochs": 3, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1,
                "batch_size": 256, "augment": "none"},
         # NT-Xent alone for 6 epochs gave features at chance on shapes (linear probe 10.2 %, validation)
         "sf_init": "supervised", "label_weight": 1.0},
    protocol_note="victims train without augmentation (deviates from the papers' crop+flip: the tiny CPU "
                  "networks cannot learn a shifted 8/255 pattern in a short run; docs/methods.md, 'Victim "
                  "protocol'). scratch: AdamW 3e-3, weight decay 0.05, 6 epochs (mobilenet_tiny: "
                  "AdamW 1e-2, weight decay 0.6, 1 warmup epoch); linear probe: Adam 0.01 "
                  "on frozen features, 20 epochs; frozen shallow, full fine-tune, SF-pretrain: SGD 0.05 (not 1e-3), 3 epochs; cosine, "
                  "batch 128. Zoo on 20k procedural glyphs: supervised AdamW 2e-3 with crop+flip, 6 epochs; SF = "
                  "those weights, then 3 epochs of NT-Xent plus cross-entropy on strong views (pure SimCLR does "
                  "not learn in a CPU budget). Generators scaled down to fit a CPU (each checked by its "
                  "certificate): em and ssc stop at their stop error within 10 rounds; tap: 3-epoch surrogate, 15 "
                  "PGD steps of 2/255 without augmentation in crafting (the victims train without it); rem: "
                  "150 surrogate steps, 3 noise steps of 3/255, 1 adversarial step, no EOT; bait: the direct "
                  "parametrization (docs/methods.md), 24 outer epochs on 15 % of the images, 6 surrogate steps each",
)

# quick-cm: the quick grid's data, defenses, protocol and zoo (so its protected sets and zoo weights are the
# quick run's, from the same cache), victims trained with a countermeasure instead. Measured seconds per
# resnet_tiny cell on a 2-core CPU (docs/methods.md "Countermeasures"): on scratch 110-150, 415-450 for the
# three trained 18 epochs, 2-step adversarial training 315; on full_finetune 55-75, adversarial training
# 150-165: about 45 min a defense, 10 h in all.
# UEraser-Max (5 copies) and PGD-10 would cost several times more; both are scaled down and say so in their labels.
QUICK_CM = dataclasses.replace(
    QUICK,
    name="quick-cm",
    description="the quick grid against countermeasures (shapes 10k / 2k, resnet_tiny, 1 seed): a CPU run",
    # each base paradigm itself first: the first column of its countermeasure table
    # on scratch, cutmix, cutout and UEraser-Lite do not learn clean shapes in quick's 6 epochs (17.5, 19.8 and
    # 16.2 %); in 18 they do (89.3, 98.3, 96.2 %), so they train 18
    attacks=("scratch", "adv_training:steps=2,step_size=4/255", "iss_jpeg", "iss_gray",
             "ueraser:repeat_epochs=0,epochs=18", "mixup", "cutmix:epochs=18", "cutout:epochs=18", "ortho_projection",
             "full_finetune", "iss_jpeg:base=full_finetune", "iss_gray:base=full_finetune",
             "ueraser:base=full_finetune,repeat_epochs=0", "ortho_projection:base=full_finetune",
             # adversarial training at 8/255 stays at chance even fine-tuned (10.5 %); at 4/255 it learns (73.1 %)
             "mixup:base=full_finetune", "cutmix:base=full_finetune", "cutout:base=full_finetune",
             "adv_training:base=full_finetune,eps=4/255,steps=2"),
    backbones=("resnet_tiny",),
    protocol_note=QUICK.protocol_note + ". Countermeasures train with their base paradigm's quick protocol; two "
                  "are scaled to a CPU: adversarial training takes 2 PGD steps (published: 10), of 4/255 within "
                  "8/255 on scratch and of 2/255 within 4/255 (REM's other radius) fine-tuned, and UEraser runs its "
                  "Lite form (one augmented copy; published default: the max over 5 copies for 300 epochs); on "
                  "scratch, CutMix, Cutout and UEraser train 18 epochs (in 6 they do not learn clean shapes)",
)

# fashion: the quick grid on real images. At 2.5k Fashion-MNIST images and 6 epochs little shows (clean
# scratch 77 %, the best UE 41 %); at quick's 10k / 2k the UEs collapse scratch (docs/methods.md, "Fashion-MNIST").
# The zoo pretrains on 20k other training images (in-domain, as ImageNet is for CIFAR). One backbone family,
# resnet_tiny (mobilenet_tiny would double the cell time). SSC, BAIT and REM get the budgets measured on
# this data (docs/methods.md, "Fashion-MNIST"): SSC passes its certificate with 30 rounds of 20 steps (0.007; at
# quick's 10 x 10, 0.0335). BAIT does not converge reliably: at quick's budget it binds too little (0.893 < 0.9,
# mean cosine 0.172); where it binds, its class deltas often grow alike (mean cosine 0.216-0.242 > 0.2). With
# twice quick's images it bound once in a probe (bind rate 0.989; mean cosine 0.24), and in the preset's own runs on
# one seed of three (seeds 0, 1, 2: bind rate 0.253, 0.534, 0.951), so the fashion rows of bait are not ranked.
# REM's robust error sat at its gate with quick's 150 surrogate steps (0.100, 0.102, 0.103 on seeds 0-2), so it
# trains twice as long here.
FASHION_BUDGETS: dict[str, dict[str, Any]] = {
    "rem": {"train_steps": 300},
    "bait": {"train_portion": 0.3},
    "ssc": {"rounds": 30, "train_steps": 20},
}
FASHION = dataclasses.replace(
    QUICK,
    name="fashion",
    description="Fashion-MNIST (10k train / 2k test), the quick grid on resnet_tiny, 1 seed: real data on a CPU",
    dataset=DatasetConfig("fashion-mnist", train_size=10_000, test_size=2_000, source_size=20_000),
    defense_protocol={name: {**fields, **FASHION_BUDGETS.get(name, {})}
                      for name, fields in QUICK.defense_protocol.items()},
    backbones=("resnet_tiny",),
    protocol_note=QUICK.protocol_note.replace(
        "20k procedural glyphs", "the 20k Fashion-MNIST training images outside the protected sample")
    + "; on Fashion-MNIST " + "; ".join(f"{name} " + ", ".join(f"{k}={v}" for k, v in fields.items())
                                        for name, fields in FASHION_BUDGETS.items()),
)

STANDARD = Preset(
    name="standard",
    description="Fashion-MNIST (20k train / 5k test), standard-size backbones, 3 seeds: a GPU, or hours on CPU",
    dataset=DatasetConfig("fashion-mnist", train_size=20_000, test_size=5_000, source_size=30_000),
    defenses=ALL_DEFENSES,
    attacks=("scratch", "linear_probe", "frozen_shallow", "full_finetune", "sf_pretrain"),
    backbones=("resnet18", "mobilenet", "vit_tiny_p4"),
    seeds=(0, 1, 2),
    attack_protocol={"scratch": {"epochs": 30}, "linear_probe": {"epochs": 10}, "frozen_shallow": {"epochs": 10},
                     "full_finetune": {"epochs": 10}, "sf_pretrain": {"epochs": 10}},
    # the ViT pretrains with AdamW, as ViTs train (SGD 0.1 is the ResNet recipe); docs/methods.md, "Backbone families"
    zoo={"supervised": {"epochs": 30}, "sf": {"epochs": 60},
         "supervised@vit_tiny_p4": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 2}},
    protocol_note="SGD momentum 0.9, cosine, batch 128, crop (pad 4) + flip; scratch lr 0.1, 30 epochs; "
                  "pretrained inits lr 1e-3 (linear probe 0.1), 10 epochs; zoo pretrained on the 30k training "
                  "images not used as protected data (SGD 0.1, 30 epochs; the ViT with AdamW 1e-3, weight decay "
                  "0.05, 2 warmup epochs); generators at their published settings (the plugins' defaults)",
)

PAPER = Preset(
    name="paper",
    description="CIFAR-10 with BAIT's protocol: ImageNet ResNet-18 at 32x32, SGD 1e-3 cosine, 60 epochs",
    dataset=DatasetConfig("cifar10"),
    defenses=ALL_DEFENSES,
    # BAIT's and SSC's pretrained surrogate: the ImageNet ResNet-18 (CIFAR-10 has no source pool, so the zoo's
    # supervised weights are timm's); em, tap and rem keep their published CIFAR ResNet-18 from scratch
    defense_protocol={"bait": {"surrogate_backbone": "resnet18_in"}, "ssc": {"surrogate_backbone": "resnet18_in"}},
    attacks=("scratch", "linear_probe", "frozen_shallow", "full_finetune", "sf_pretrain"),
    backbones=("resnet18_in",),
    seeds=(0,),
    attack_protocol={"*": {"epochs": 60}, "linear_probe": {"weights": "timm"},
                     "frozen_shallow": {"weights": "timm"}, "full_finetune": {"weights": "timm", "grad_clip": 5.0},
                     "sf_pretrain": {"pretrain_on": "protected"}},
    zoo={"supervised_weights": "timm"},
    protocol_note="SGD momentum 0.9, cosine, batch 128, crop (pad 4) + flip, 60 epochs; pretrained inits: timm "
                  "ImageNet ResNet-18 at 32x32, lr 1e-3 (BAIT); scratch lr 0.1; SF-pretrain: semantic-focused "
                  "pretraining (the zoo's sf recipe, from random init) on the unlabeled protected images, "
                  "then frozen-shallow fine-tuning (CIFAR-10 has no disjoint source pool); generators at "
                  "their published settings, BAIT's and SSC's surrogate the same timm ResNet-18",
)

PRESETS: Registry[Preset] = Registry("preset", also="or a .toml file")
for _preset in (QUICK, QUICK_CM, FASHION, STANDARD, PAPER):
    PRESETS.add(_preset)


def load_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or a preset file (``.toml``)."""
    return _load_preset(name_or_path, ())


def _load_preset(name_or_path: str, seen: tuple[str, ...]) -> Preset:
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UEBenchError(f"a preset is a name or a .toml file, got {name_or_path!r}")
    path = Path(name_or_path)
    if path.suffix != ".toml":
        return PRESETS.get(name_or_path)  # an unknown name fails with the valid names
    if not path.is_file():
        raise UEBenchError(f"preset file {name_or_path!r} does not exist")
    if str(path.resolve()) in seen:
        raise UEBenchError(f"preset file {name_or_path!r} extends itself (through {' -> '.join(seen)})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UEBenchError(f"preset file {name_or_path!r} is not valid TOML: {exc}") from exc
    return preset_from_dict(data, default_name=path.stem, _seen=(*seen, str(path.resolve())))


# A preset's name becomes a folder and page text: letters, digits, then '_', '.', '+', '=' or '-'.
PRESET_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.+=-]{0,62}[A-Za-z0-9])?")
TABLES = ("defense_protocol", "attack_protocol", "zoo")


def check_preset_data(data: dict[str, Any]) -> None:
    """The type of every key of a preset table (a parsed TOML file), so that a bad value fails here in
    one line: texts are strings, plugin and backbone lists are non-empty lists of strings, seeds a list of
    integers >= 0, the dataset a name or a table, protocols tables of tables. Field values inside the
    tables are checked against the plugins' own fields when the preset is planned."""
    for key in ("name", "description", "protocol_note", "extends", "threat_model"):
        if key in data and not isinstance(data[key], str):
            raise UEBenchError(f"preset: {key} must be a string, got {type(data[key]).__name__} {data[key]!r}")
    if "name" in data and not PRESET_NAME.fullmatch(data["name"]):
        raise UEBenchError(f"preset: name={data['name'][:40]!r} must be 1 to 64 letters, digits, '_', '.', '+', "
                           f"'=' or '-', starting and ending with a letter or digit")
    for key in ("defenses", "attacks", "backbones"):
        value = data.get(key, ["-"])
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise UEBenchError(f"preset: {key} must be a non-empty list of names, e.g. {key} = [\"a\", \"b\"]; "
                               f"got {value!r}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds):
        raise UEBenchError(f"preset: seeds must be a non-empty list of integers >= 0, e.g. seeds = [0, 1, 2]; "
                           f"got {seeds!r}")
    if "dataset" in data and not isinstance(data["dataset"], (str, dict)):
        raise UEBenchError(f"preset: dataset must be a name or a [dataset] table, got {data['dataset']!r}")
    for key in TABLES:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise UEBenchError(f"preset: {key} must be a table, got {type(value).__name__} {value!r}")
        for inner, fields in value.items():
            if (key != "zoo" or inner.partition("@")[0] in ("supervised", "sf", "augment")) \
                    and not isinstance(fields, dict):
                raise UEBenchError(f"preset: [{key}.{inner}] must be a table of fields, got "
                                   f"{type(fields).__name__} {fields!r}")


def preset_from_dict(data: dict[str, Any], default_name: str = "custom", *, _seen: tuple[str, ...] = ()) -> Preset:
    if not isinstance(data, dict):
        raise UEBenchError(f"a preset is a table of keys, got {type(data).__name__}")
    valid = {f.name for f in dataclasses.fields(Preset)} | {"extends"}
    unknown = sorted(set(map(str, data)) - valid)
    if unknown:
        raise UEBenchError(f"preset: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
    check_preset_data(data)
    if "name" not in data and not PRESET_NAME.fullmatch(default_name):
        raise UEBenchError(f"preset name {default_name!r} (from the file name) must be letters, digits, '_', '.', "
                           f"'+', '=' or '-'; set name = \"...\" in the file")
    base_name = data.pop("extends", None)
    base = _load_preset(base_name, _seen) if base_name else None
    kwargs: dict[str, Any] = dataclasses.asdict(base) if base else {}
    if base:
        kwargs["dataset"] = base.dataset
    kwargs["name"] = data.get("name", default_name)
    kwargs["description"] = f"based on {base_name}" if base_name else ""
    if "dataset" in data:
        ds = data["dataset"]
        if isinstance(ds, str):
            ds = {"name": ds}
        ds_fields = {f.name for f in dataclasses.fields(DatasetConfig)}
        bad = sorted(set(ds) - ds_fields)
        if bad:
            raise UEBenchError(f"preset [dataset]: unknown key {bad[0]!r}; valid keys: {', '.join(sorted(ds_fields))}")
        start = dataclasses.asdict(base.dataset) if base and "name" not in ds else {}
        kwargs["dataset"] = DatasetConfig(**{**start, **ds})
    for key in ("defenses", "attacks", "backbones", "seeds"):
        if key in data:
            kwargs[key] = tuple(data[key])
    for key in ("defense_protocol", "attack_protocol", "zoo"):
        if key in data:
            merged = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.get(key, {}).items()}
            for plugin, fields in data[key].items():
                merged[plugin] = {**merged.get(plugin, {}), **fields} if isinstance(fields, dict) else fields
            kwargs[key] = merged
    for key in ("description", "protocol_note", "threat_model"):
        if key in data:
            kwargs[key] = data[key]
    if "cell_timeout" in data:
        kwargs["cell_timeout"] = check_timeout(data["cell_timeout"], "preset: cell_timeout")
    missing = [k for k in ("dataset", "defenses", "attacks", "backbones") if k not in kwargs]
    if missing:
        raise UEBenchError(f"preset {kwargs['name']!r} misses {', '.join(missing)} (or use extends = \"quick\")")
    return Preset(**kwargs)
