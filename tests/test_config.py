"""Plugin specs, value conversion, labels and presets."""

from __future__ import annotations

import pytest

from benchmark.config import configure, parse_spec, stable_hash
from benchmark.errors import UEBenchError
from benchmark.presets import PRESETS, load_preset
from benchmark.registry import ATTACKS, DEFENSES


def test_parse_spec():
    assert parse_spec("em") == ("em", {})
    assert parse_spec("em:steps=10,mode=class") == ("em", {"steps": "10", "mode": "class"})
    assert parse_spec("pkg.mod:Cls:eps=1") == ("pkg.mod:Cls", {"eps": "1"})
    with pytest.raises(UEBenchError, match="expected field=value"):
        parse_spec("em:steps")


def test_values_are_converted_and_fractions_accepted():
    c = configure(DEFENSES, "random_noise:eps=4/255,mode=class")
    assert abs(c.plugin.eps - 4 / 255) < 1e-12, c.plugin
    assert c.plugin.mode == "class"
    assert c.label == "random_noise(eps=4/255,mode=class)", c.label
    for given, shown in (("0.2", "0.2"), ("0.5", "0.5"), ("0.0157", "0.0157"), ("1/7", "0.142857")):
        label = configure(DEFENSES, f"random_noise:eps={given}").label
        assert label == f"random_noise(eps={shown})", (given, label)


def test_bad_values_name_the_field():
    with pytest.raises(UEBenchError, match="field 'eps'.*'abc'"):
        configure(DEFENSES, "random_noise:eps=abc")
    with pytest.raises(UEBenchError, match="unknown field 'bogus'; valid fields: eps, mode"):
        configure(DEFENSES, "random_noise:bogus=1")
    with pytest.raises(UEBenchError, match="epochs=-1 must be >= 0"):
        configure(ATTACKS, "scratch:epochs=-1")


def test_label_hides_protocol_but_shows_variants():
    protocol = {"*": {"augment": "none"}, "scratch": {"epochs": 3}}
    c = configure(ATTACKS, "scratch", protocol)
    assert c.label == "scratch" and c.plugin.epochs == 3 and c.plugin.augment == "none", c
    v = configure(ATTACKS, "scratch:epochs=5", protocol)
    assert v.label == "scratch(epochs=5)", v.label
    same = configure(ATTACKS, "scratch:epochs=3", protocol)
    assert same.label == "scratch", "a spec equal to the protocol is no variant"


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_presets_resolve():
    for name, preset in PRESETS.items():
        for spec in preset.defenses:
            configure(DEFENSES, spec, preset.defense_protocol)
        for spec in preset.attacks:
            configure(ATTACKS, spec, preset.attack_protocol)


def test_toml_preset(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "quick"\ndefenses = ["clean"]\n[dataset]\ntrain_size = 100\n'
                    '[attack_protocol.scratch]\nepochs = 2\n')
    p = load_preset(str(path))
    assert p.name == "mine" and p.defenses == ("clean",) and p.dataset.train_size == 100, p
    assert p.dataset.name == "shapes" and p.attack_protocol["scratch"]["epochs"] == 2, p
    assert p.attack_protocol["*"] == PRESETS["quick"].attack_protocol["*"], "extends keeps the base protocol"
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "quick"\nbogus = 1\n')
    with pytest.raises(UEBenchError, match="unknown key 'bogus'"):
        load_preset(str(bad))
    with pytest.raises(UEBenchError, match="unknown preset 'nope'"):
        load_preset("nope")


def test_readme_preset_example_is_a_valid_preset(tmp_path):
    """The TOML preset shown in the README loads, and its per-backbone recipe and zoo override apply."""
    import re
    from pathlib import Path

    from benchmark.plan import plan

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert blocks, "the README must show a TOML preset"
    path = tmp_path / "example.toml"
    path.write_text(blocks[0])
    preset = load_preset(str(path))
    cells = {(c.attack.name, c.backbone): c for c in plan(preset, attacks=["scratch"])}
    assert cells[("scratch", "mobilenet_tiny")].attack.plugin.epochs == 10, "the per-backbone recipe did not apply"
    assert cells[("scratch", "resnet_tiny")].attack.plugin.epochs == 3
    assert cells[("scratch", "resnet_tiny")].zoo.supervised.epochs == 4, "the zoo override did not apply"
    assert cells[("scratch", "resnet_tiny")].zoo.supervised.lr == PRESETS["quick"].zoo["supervised"]["lr"], \
        "a zoo override must keep the base preset's other fields"


def test_a_seed_moves_the_training_sample_but_not_the_zoo():
    from benchmark.plan import plan

    preset = PRESETS.get("quick")
    cells = plan(preset, defenses=["clean"], attacks=["scratch"], backbones=["resnet_tiny"], seeds=[0, 3])
    zero, three = cells
    assert zero.dataset.key() == preset.dataset.key(), "seed 0's data keys must stay those written before"
    assert (zero.dataset.train_seed, three.dataset.train_seed) == (0, 3), "seed s must draw sample 0 + s"
    assert zero.protected_key() != three.protected_key() and zero.key != three.key
    assert three.dataset.source_key() == preset.dataset.source_key(), "every seed pretrains on one source pool"
