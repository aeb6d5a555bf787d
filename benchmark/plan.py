"""Planning: the cross product of cells, their keys and their clean references.

A cell is one (dataset, defense, attack, backbone, seed). Its key is a hash of the fully resolved
configs plus the protocol version: change any field and the cell is recomputed, change nothing and
it is reused. A cell's seed seeds its generator and its victim, and draws its training sample
(``DatasetConfig.for_seed``: seed s samples with ``train_seed + s``; the test set and the source
pool, and so the zoo, are the same for every seed). The zoo recipe enters a key only through the
sources the cell's plugins declare (``Plugin.zoo_sources``), never through a search of their config
values.

A cell's surrogate threat model (``white-box`` | ``transfer``, ``benchmark.zoo``) applies to the
defenses that declare zoo sources (their surrogate's weights); ``surrogate_threat_model`` says which a
cell ran under (``none`` for a defense without zoo weights). ``transfer`` enters the cell and protected
keys of those defenses and their label (``em[transfer]``); ``white-box`` enters nothing, so the keys
of the papers' setting are the ones written before the option existed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from benchmark import PROTOCOL_VERSION
from benchmark.config import Configured, configure, stable_hash
from benchmark.data import DATASETS, DatasetConfig
from benchmark.errors import UEBenchError
from benchmark.models import get_spec
from benchmark.presets import Preset
from benchmark.registry import ATTACKS, DEFENSES
from benchmark.zoo import SURROGATE_THREAT_MODELS, PretrainConfig, pretrain_config


@dataclass(frozen=True)
class PresetInfo:
    """What a cell records of its preset, for the leaderboard (not part of any key)."""

    description: str = ""
    protocol_note: str = ""
    dataset: str = ""  # the preset's own data set (a run may override it)

    @classmethod
    def of(cls, preset: Preset) -> PresetInfo:
        return cls(preset.description, preset.protocol_note, preset.dataset.name)

    def to_dict(self) -> dict[str, str]:
        return {"description": self.description, "protocol_note": self.protocol_note, "dataset": self.dataset}


@dataclass(frozen=True)
class Cell:
    preset: str
    dataset: DatasetConfig
    defense: Configured
    attack: Configured
    backbone: str
    seed: int
    zoo: PretrainConfig = PretrainConfig()
    preset_info: PresetInfo = field(default=PresetInfo(), compare=False)  # recorded, never in the key
    threat_model: str = "white-box"  # the surrogate's: white-box | transfer (benchmark.zoo)

    @property
    def surrogate_threat_model(self) -> str:
        """The threat model the defense's surrogate ran under; ``none`` when it takes no zoo weights."""
        return self.threat_model if self.defense.plugin.zoo_sources() else "none"

    def _threat(self) -> dict[str, str]:
        return {"threat_model": "transfer"} if self.surrogate_threat_model == "transfer" else {}

    def config(self) -> dict[str, Any]:
        return {"dataset": self.dataset.key(), "defense": self.defense.config(), "attack": self.attack.config(),
                "backbone": get_spec(self.backbone).key(), "seed": self.seed,
                "zoo": zoo_recipe(self.zoo, self.defense, self.attack, backbone=self.backbone),
                "protocol_version": PROTOCOL_VERSION, **self._threat()}

    @property
    def key(self) -> str:
        return stable_hash(self.config(), 24)

    def protected_key(self) -> str:
        """The key of the cell's protected set: shared by every attack and backbone of (data, defense, seed)."""
        return stable_hash({"dataset": self.dataset.key(), "defense": self.defense.config(), "seed": self.seed,
                            "zoo": zoo_recipe(self.zoo, self.defense), "protocol_version": PROTOCOL_VERSION,
                            **self._threat()})

    def describe(self) -> str:
        return f"{self.defense.label} / {self.attack.label} / {self.backbone} / seed {self.seed}"


def zoo_recipe(zoo: PretrainConfig, *plugins: Configured, backbone: str | None = None) -> dict[str, Any]:
    """The part of the zoo recipe that these configured plugins depend on, from the sources and backbones
    they declare (``zoo_sources``, ``zoo_backbones``) plus the cell's ``backbone``: a change to the ``sf``
    recipe then reruns only the cells whose plugins use ``sf``, and one backbone's own recipe only the
    cells that use that backbone's weights."""
    sources = set().union(*(p.plugin.zoo_sources() for p in plugins))
    recipe = zoo.recipe(sources)
    own: dict[str, dict[str, Any]] = {}
    for p in plugins:
        for name, recipes in zoo.recipe(p.plugin.zoo_sources(), p.plugin.zoo_backbones(backbone)).get(
                "backbones", {}).items():
            own[name] = {**own.get(name, {}), **recipes}
    return {**recipe, "backbones": dict(sorted(own.items()))} if own else recipe


SEED_MAX = 2**31 - 1  # seeds feed torch generators as seed * 1_000_003 + offset, which must stay < 2**64


def plan(preset: Preset, *, dataset: DatasetConfig | None = None, defenses: Sequence[str] | None = None,
         attacks: Sequence[str] | None = None, backbones: Sequence[str] | None = None,
         seeds: Sequence[int] | None = None, threat_model: str | None = None) -> list[Cell]:
    """The cross product, with ``clean`` always included as the reference. Everything is checked here,
    before any work: names, fields and their ranges, seeds, each attack against each backbone (e.g. a
    freezing depth ``k`` beyond a backbone's stages) and each plugin's metadata. ``threat_model``
    overrides the preset's surrogate threat model."""
    ds = dataset or preset.dataset
    threat = check_threat_model(threat_model or preset.threat_model)
    DATASETS.get(ds.name)  # an unknown name fails with the valid names
    seed_list = check_seeds(seeds or preset.seeds)
    for kind, protocol in (("defense", preset.defense_protocol), ("attack", preset.attack_protocol)):
        check_protocol(kind, protocol)
    defs = [configure(DEFENSES, s, preset.defense_protocol) for s in _specs("defenses", defenses or preset.defenses)]
    if not any(d.label == "clean" for d in defs):
        defs.insert(0, configure(DEFENSES, "clean", preset.defense_protocol))
    bbs = _names("backbones", backbones or preset.backbones)
    for b in bbs:
        get_spec(b)
    atk_specs = _specs("attacks", attacks or preset.attacks)
    # an attack's protocol may differ per backbone (``attack_protocol["scratch@vit_tiny"]``)
    atks = {b: [configure(ATTACKS, s, preset.attack_protocol, backbone=b) for s in atk_specs] for b in bbs}
    for group, kind in ((defs, "defense"), (atks[bbs[0]], "attack")):
        dupe = first_duplicate([c.label for c in group])
        if dupe is not None:
            raise UEBenchError(f"{kind} {dupe!r} is listed twice")
    for b, configured in atks.items():
        for a in configured:
            a.plugin.check_backbone(b)
    for c in [*defs, *atks[bbs[0]]]:
        type(c.plugin).check_info()
    if threat == "transfer":  # the label keeps white-box and transfer rows of one store apart
        defs = [replace(d, label=f"{d.label}[transfer]") if d.plugin.zoo_sources() else d for d in defs]
    zoo = pretrain_config(preset.zoo)
    info = PresetInfo.of(preset)
    data = {s: ds.for_seed(s) for s in seed_list}  # a seed draws its own training sample (seed 0: ds's own)
    return [Cell(preset.name, data[s], d, atks[b][i], b, s, zoo, info, threat)
            for s in seed_list for d in defs for i in range(len(atk_specs)) for b in bbs]


def check_threat_model(value: Any) -> str:
    if value not in SURROGATE_THREAT_MODELS:
        raise UEBenchError(f"threat_model={value!r} must be one of {SURROGATE_THREAT_MODELS}")
    return value


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds are distinct integers in [0, SEED_MAX]; at least one."""
    values = list(seeds) if isinstance(seeds, (list, tuple)) else None
    if not values or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX for s in values):
        raise UEBenchError(f"seeds must be one or more integers in [0, {SEED_MAX}], got {seeds!r}")
    if len(set(values)) != len(values):
        raise UEBenchError(f"seeds {values} list a seed twice")
    return values


def _specs(what: str, specs: Sequence[str]) -> list[str]:
    values = list(specs) if isinstance(specs, (list, tuple)) else None
    if not values or not all(isinstance(s, str) for s in values):
        raise UEBenchError(f"{what} must be one or more names (strings like 'em' or 'em:mode=class'), got {specs!r}")
    return values


def _names(what: str, names: Sequence[str]) -> list[str]:
    values = _specs(what, names)
    dupe = first_duplicate(values)
    if dupe is not None:
        raise UEBenchError(f"{what}: {dupe!r} is listed twice")
    return values


def first_duplicate(values: Sequence[str]) -> str | None:
    """The alphabetically first value listed more than once, or None."""
    dupes = sorted({x for x in values if values.count(x) > 1})
    return dupes[0] if dupes else None


def check_protocol(kind: str, protocol: Any) -> None:
    """A protocol is a table of tables: ``{"*" | "*@backbone" | name | "name@backbone": {field: value}}``. A ``"*"`` field
    must be a field of some registered plugin of this kind (a typo would otherwise apply to none)."""
    registry = DEFENSES if kind == "defense" else ATTACKS
    if not isinstance(protocol, dict):
        raise UEBenchError(f"{kind}_protocol must be a table of tables, got {type(protocol).__name__}")
    for key, fields in protocol.items():
        if not isinstance(key, str) or not isinstance(fields, dict):
            raise UEBenchError(f"{kind}_protocol[{key!r}] must be a table of fields, got {type(fields).__name__} "
                               f"{fields!r}")
    known = {f.name for n in registry.names() for f in dataclasses.fields(registry.get(n))
             if dataclasses.is_dataclass(registry.get(n))}
    for key in (k for k in protocol if k == "*" or k.startswith("*@")):
        unknown = sorted(set(map(str, protocol[key])) - known)
        if unknown:
            raise UEBenchError(f"{kind}_protocol[{key!r}]: {unknown[0]!r} is a field of no registered {kind}; "
                               f"fields: {', '.join(sorted(known))}")


def reference_key(config: dict) -> str:
    """What a cell shares with its clean reference: everything but the defense and its surrogate's threat model."""
    return stable_hash({k: v for k, v in config.items() if k not in ("defense", "threat_model")})


def with_dataset_overrides(cfg: DatasetConfig, **overrides: Any) -> DatasetConfig:
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
