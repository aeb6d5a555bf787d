"""Registries and plugin loading: built-ins, files, entry points, dotted paths, clear errors.

Every named kind (defenses, attacks, backbones, data sets, presets, figures) uses one ``Registry`` class
and fails the same way on an unknown name."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import pytest
import torch

from benchmark.data import DATASETS, DatasetConfig, load_dataset
from benchmark.errors import UEBenchError
from benchmark.models import BACKBONES, get_spec
from benchmark.plugins import Defense
from benchmark.presets import PRESETS, load_preset
from benchmark.registry import ATTACKS, DEFENSES, Registry, load_plugin_file
from leaderboard.figures import FIGURES, reproduce

PLUGIN_SOURCE = '''
from dataclasses import dataclass
from benchmark.plugins import Defense
from benchmark.registry import DEFENSES

@DEFENSES.register("{name}")
@dataclass(frozen=True)
class FilePlugin(Defense):
    title = "from a file"
    def _perturb(self, train, ctx):
        return train
'''


@pytest.fixture
def cleanup():
    names: list[str] = []
    yield names
    for n in names:
        DEFENSES.unregister(n)


def test_builtins_are_registered():
    assert {"clean", "random_noise"} <= set(DEFENSES.names()), DEFENSES.names()
    assert "scratch" in ATTACKS.names(), ATTACKS.names()


def test_unknown_name_lists_valid_names():
    with pytest.raises(UEBenchError, match="unknown defense 'nope'.*clean.*random_noise"):
        DEFENSES.get("nope")


REGISTRIES = {"defense": DEFENSES, "attack": ATTACKS, "backbone": BACKBONES, "data set": DATASETS,
              "preset": PRESETS, "figure": FIGURES}
# The public way each kind is looked up; it must go through the registry.
LOOKUPS = {"defense": DEFENSES.get, "attack": ATTACKS.get, "backbone": get_spec,
           "data set": lambda name: load_dataset(DatasetConfig(name)), "preset": load_preset,
           "figure": lambda name: reproduce(name, PRESETS["quick"], out_dir="never-written",
                                            device=torch.device("cpu"))}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_registry_fails_the_same_way_on_unknown_names(kind):
    registry = REGISTRIES[kind]
    names = registry.names()
    assert registry.kind == kind, f"registry {kind!r} calls itself {registry.kind!r}"
    assert len(names) >= 2, f"{kind}: expected built-in names, found {names}"
    expected = f"unknown {kind} 'no_such_name'; valid names: {', '.join(names)}"
    for lookup in (registry.get, registry.__getitem__, LOOKUPS[kind]):
        with pytest.raises(UEBenchError) as err:
            lookup("no_such_name")
        assert str(err.value).startswith(expected), f"{kind}: {err.value!r} does not start with {expected!r}"
    assert all(name in registry and registry.get(name) is obj for name, obj in registry.items()), \
        f"{kind}: items() disagrees with get()"


def test_registry_holds_any_object_and_families():
    reg: Registry = Registry("loader")
    spec = reg.add({"what": "a spec"}, "two-words")
    assert reg.get("two-words") is spec, "add() must register non-class objects"
    fn = reg.register("fam:<rest>")(lambda: "family")
    assert reg.get("fam:anything/here.txt") is fn and reg.get("fam:") is fn, "a family serves its prefix"
    with pytest.raises(UEBenchError, match=r"unknown loader 'other:x'; valid names: fam:<rest>, two-words$"):
        reg.get("other:x")
    with pytest.raises(UEBenchError, match="lower-case"):
        reg.add(object(), "Not A Name")
    with pytest.raises(UEBenchError, match="already registered"):
        reg.add({"what": "another"}, "two-words")
    assert not hasattr(fn, "name"), "only plugin classes get a name attribute"


def test_duplicate_name_fails():
    reg = Registry("thing", "uebench.test-group")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(UEBenchError, match="already registered"):
        @reg.register("a")
        class B:
            pass


def test_name_must_be_identifier():
    reg = Registry("thing", "uebench.test-group")
    with pytest.raises(UEBenchError, match="identifier"):
        reg.register("not a name")(type("X", (), {}))


def test_plugin_file_registers(tmp_path, cleanup):
    path = tmp_path / "my_ue.py"
    path.write_text(PLUGIN_SOURCE.format(name="file_plugin_x"))
    cleanup.append("file_plugin_x")
    added = load_plugin_file(path)
    assert added == ["defense:file_plugin_x"], added
    assert DEFENSES.get("file_plugin_x").title == "from a file"


def test_plugin_file_errors(tmp_path):
    with pytest.raises(UEBenchError, match="does not exist"):
        load_plugin_file(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UEBenchError, match="failed to import: RuntimeError: boom"):
        load_plugin_file(bad)


def test_plugin_file_name_clash_fails(tmp_path):
    path = tmp_path / "clash.py"
    path.write_text(PLUGIN_SOURCE.format(name="clean"))
    with pytest.raises(UEBenchError, match="already registered"):
        load_plugin_file(path)
    assert DEFENSES.get("clean").__module__ == "defenses.clean", "a clash must not replace the built-in"


def test_dotted_path(tmp_path, monkeypatch, cleanup):
    pkg = tmp_path / "dotted_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(PLUGIN_SOURCE.format(name="dotted_plugin").replace("@DEFENSES.register", "# "))
    monkeypatch.syspath_prepend(str(tmp_path))
    cleanup.append("fileplugin")
    cls = DEFENSES.get("dotted_pkg.mod:FilePlugin")
    assert cls.__name__ == "FilePlugin"
    assert "fileplugin" in DEFENSES, "a dotted-path plugin is registered under its class name"
    with pytest.raises(UEBenchError, match="has no class"):
        DEFENSES.get("dotted_pkg.mod:Missing")


def test_entry_points(monkeypatch, cleanup):
    @dataclass(frozen=True)
    class EntryDefense(Defense):
        title = "from an entry point"

    class FakeEP:
        name = "ep_defense"
        value = "somepkg:EntryDefense"

        def load(self):
            return EntryDefense

    class BrokenEP:
        name = "ep_broken"
        value = "brokenpkg:Nothing"

        def load(self):
            raise ImportError("no such package")

    def fake_entry_points(group=None):
        return [FakeEP(), BrokenEP()] if group == "uebench.defenses" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(DEFENSES, "_entry_points_loaded", False)
    cleanup.append("ep_defense")
    assert DEFENSES.get("ep_defense") is EntryDefense, "entry-point plugin not registered"
    assert "ep_broken" not in DEFENSES, "a broken entry point must be skipped, not registered"
