"""Registry and plugin loading: built-ins, files, entry points, dotted paths, clear errors."""

from __future__ import annotations

import importlib.metadata
import textwrap
from dataclasses import dataclass

import pytest

from benchmark.errors import UEBenchError
from benchmark.plugins import Defense
from benchmark.registry import ATTACKS, DEFENSES, Registry, load_plugin_file

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
