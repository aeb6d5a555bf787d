"""Bad input is refused before any work starts: one line, exit code 2, the bad value and the valid ones.

The known holes each have a test (``frozen_shallow:k=99``, ``--train-size 0``, ``seeds = "x"``), data sets
that would crash deep in torch are refused by name, and three property-based tests (hypothesis) fuzz the
plugin-spec parser, the TOML preset loader and the command line: every input either works or fails as a
``UEBenchError`` (through the command line: exit 2 and one line), never with a traceback.
"""

from __future__ import annotations

import os
import string

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import run_benchmark
from benchmark.config import configure, parse_spec
from benchmark.data import DatasetConfig, ImageSet, Splits
from benchmark.data.imageset import check_splits
from benchmark.errors import UEBenchError
from benchmark.models import BACKBONES, body_stages, create_model
from benchmark.plan import plan
from benchmark.presets import PRESETS, load_preset, preset_from_dict
from benchmark.registry import ATTACKS, DEFENSES

# UEBENCH_FUZZ_EXAMPLES raises the number of examples for a longer search (150 keeps CI fast)
FUZZ = settings(max_examples=int(os.environ.get("UEBENCH_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
TINY = {"extends": "quick", "name": "tiny", "dataset": {"train_size": 20, "test_size": 10, "source_size": 20},
        "defenses": ["clean"], "attacks": ["scratch"], "backbones": ["resnet_tiny"]}


class WouldRun(BaseException):
    """Raised instead of running the grid: the command line accepted every input."""


@pytest.fixture
def no_work(monkeypatch):
    """``run`` stops where the work would start (nothing is trained, nothing is written)."""
    import benchmark.execute
    import leaderboard.figures  # noqa: F401  (modules that bind the executor at import time import it
    import leaderboard.submit  # noqa: F401   unpatched here, or the stand-in would outlive this test)

    def refuse(*args, **kwargs):
        raise WouldRun()

    monkeypatch.setattr(benchmark.execute, "LocalExecutor", refuse)
    monkeypatch.setattr(benchmark.execute, "run_grid", refuse)


def one_line_exit_2(argv: list[str], capsys) -> str:
    code = run_benchmark.main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"{argv}: exit code {code}, stderr: {err}"
    assert err.startswith("uebench: error: ") and err.count("\n") == 1 and "Traceback" not in err, \
        f"{argv}: not a one-line error: {err!r}"
    return err


def preset_file(tmp_path, text: str) -> str:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- the known holes, and more bad input

BAD_RUNS = [
    (["--attacks", "frozen_shallow:k=99"], "k=99 is out of range for backbone 'resnet_tiny', which has 4 body stages"),
    (["--attacks", "sf_pretrain:k=7"], "k=7 is out of range"),
    (["--train-size", "0"], "train_size=0 must be an integer in [1, 10000000]"),
    (["--test-size", "-3"], "test_size=-3 must be an integer in [1,"),
    (["--seeds", "-1"], "seeds must be one or more integers in [0, 2147483647]"),
    (["--seeds", "1", "1"], "list a seed twice"),
    (["--backbones", "resnet_tiny", "resnet_tiny"], "'resnet_tiny' is listed twice"),
    (["--defenses", "em:steps=1,steps=2"], "field 'steps' is given twice"),
    (["--defenses", "random_noise:eps=nan"], "cannot read 'nan' as a finite float"),
    (["--defenses", "random_noise:eps=1/0"], "cannot read '1/0' as a finite float"),
    (["--defenses", "ssc:k=9,surrogate_backbone=resnet_tiny"], "ssc: k=9 must be in [1, 4]"),
    (["--defenses", "no_such_pkg.mod:Thing"], "cannot import defense module 'no_such_pkg.mod'"),
    (["--defenses", "collections:OrderedDict"], "bad override 'OrderedDict'"),
    (["--defenses", "json.decoder:JSONDecoder"], "JSONDecoder is not a plugin (a dataclass)"),
    (["--device", "cuda:x"], "--device must be auto, cpu or cuda[:N]"),
    (["--dataset", "hf"], "unknown data set 'hf'"),
]


@pytest.mark.parametrize("extra, message", BAD_RUNS, ids=[" ".join(a) for a, _ in BAD_RUNS])
def test_bad_run_options_are_one_line_errors(extra, message, tmp_path, capsys, no_work):
    err = one_line_exit_2(["run", "--preset", preset_file(tmp_path, 'extends = "quick"\nbackbones = ["resnet_tiny"]'),
                           "--out", str(tmp_path / "out"), *extra], capsys)
    assert message in err, f"expected {message!r} in {err!r}"


def test_a_file_where_a_folder_belongs_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    for option in ("--out", "--cache-dir", "--data-root"):
        err = one_line_exit_2(["run", "--out", str(tmp_path / "out"), option, str(tmp_path / "file")], capsys)
        assert f"{option} " in err and "is a file" in err, err


BAD_PRESETS = [
    ('seeds = "x"', "seeds must be a non-empty list of integers >= 0"),
    ("seeds = [0, -1]", "seeds must be a non-empty list of integers >= 0"),
    ("seeds = [true]", "seeds must be a non-empty list"),
    ("seeds = []", "seeds must be a non-empty list"),
    ('defenses = "em"', "defenses must be a non-empty list of names"),
    ("attacks = [1, 2]", "attacks must be a non-empty list of names"),
    ("backbones = []", "backbones must be a non-empty list of names"),
    ("name = 3", "name must be a string"),
    ('name = "../../x"', "name='../../x' must be 1 to 64 letters"),
    ("dataset = 5", "dataset must be a name or a [dataset] table"),
    ("[dataset]\ntrain_size = \"big\"", "train_size='big' must be an integer"),
    ("[dataset]\ntrain_size = 1.5", "train_size=1.5 must be an integer"),
    ("[dataset]\nsample_seed = -2", "sample_seed=-2 must be an integer in [0,"),
    ("[dataset]\ndownload = \"yes\"", "download='yes' must be true or false"),
    ("defense_protocol = 3", "defense_protocol must be a table"),
    ("[attack_protocol]\nscratch = 3", "[attack_protocol.scratch] must be a table of fields"),
    ("[attack_protocol.scratch]\nepochs = \"x\"", "cannot read 'x' as int"),
    ("[attack_protocol.scratch]\nepochs = 1.5", "1.5 is a float, not an int"),
    ("[attack_protocol.scratch]\nepochs = true", "True is a bool, not an int"),
    ("[attack_protocol.scratch]\nlr = nan", "nan must be a finite number"),
    ("[attack_protocol.scratch]\noptimizer = 7", "7 is an int, not a str"),
    ("[attack_protocol.scratch]\nepocs = 3", "unknown field 'epocs'"),
    ("[attack_protocol.\"*\"]\nepocs = 3", "'epocs' is a field of no registered attack"),
    ("[zoo]\nsupervised = 3", "[zoo.supervised] must be a table of fields"),
    ("[zoo.supervised]\nepochs = \"many\"", "zoo.supervised field 'epochs': cannot read 'many' as int"),
    ("[zoo.sf]\nbogus = 1", "zoo.sf: unknown field 'bogus'"),
    ("[zoo]\nprojection_dim = 0", "projection_dim=0 >= 1"),
    ("[zoo.augment]\ngray_p = 2.0", "gray_p=2.0 must be in [0, 1]"),
    ('extends = "nope"', "unknown preset 'nope'"),
    ("extends = 3", "extends must be a string"),
    ("this is = not toml", "is not valid TOML"),
]


@pytest.mark.parametrize("body, message", BAD_PRESETS, ids=[b.splitlines()[-1][:30] for b, _ in BAD_PRESETS])
def test_bad_presets_are_one_line_errors(body, message, tmp_path, capsys, no_work):
    head = [line for line in ('extends = "quick"', 'backbones = ["resnet_tiny"]') if not body.startswith(line[:5])]
    text = "\n".join([*head, body]) + "\n"
    err = one_line_exit_2(["run", "--preset", preset_file(tmp_path, text), "--out", str(tmp_path / "out")], capsys)
    assert message in err, f"expected {message!r} in {err!r}"


def test_a_preset_that_extends_itself_is_refused(tmp_path, capsys, no_work):
    path = tmp_path / "loop.toml"
    path.write_text(f'extends = "{path}"\n')
    err = one_line_exit_2(["run", "--preset", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "extends itself" in err, err


def test_a_binary_preset_file_is_refused(tmp_path, capsys, no_work):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert "is not valid TOML" in one_line_exit_2(["run", "--preset", str(path)], capsys)


def test_a_good_preset_still_reaches_the_run(tmp_path, no_work):
    with pytest.raises(WouldRun):
        run_benchmark.main(["run", "--preset", preset_file(tmp_path, 'extends = "quick"\nseeds = [0, 1]\n'),
                            "--out", str(tmp_path / "out"), "--attacks", "frozen_shallow:k=4", "--device", "cpu"])


def test_body_stages_are_counted_without_weights():
    for name in ("resnet_tiny", "mobilenet_tiny", "vit_tiny", "convnext_tiny"):
        assert body_stages(name) == create_model(name, 3).num_body_stages, f"{name}: the meta count is wrong"
    assert {body_stages(n) for n in BACKBONES.names()} >= {4}, "every backbone must be countable"


def test_k_is_checked_against_every_planned_backbone():
    preset = preset_from_dict({**TINY, "backbones": ["resnet_tiny", "mobilenet_tiny"]})
    assert len(plan(preset, attacks=["frozen_shallow:k=5"], backbones=["mobilenet_tiny"])) == 1, \
        "k=5 fits mobilenet_tiny's 6 stages"
    with pytest.raises(UEBenchError, match="k=5 is out of range for backbone 'resnet_tiny'"):
        plan(preset, attacks=["frozen_shallow:k=5"])


# ---------------------------------------------------------------- data sets that would crash in torch

def _set(n: int, labels: list[int] | None = None, size: int = 8, classes: int = 2, channels: int = 3) -> ImageSet:
    y = torch.tensor(labels if labels is not None else [i % classes for i in range(n)], dtype=torch.int64)
    return ImageSet(torch.zeros(n, channels, size, size, dtype=torch.uint8), y, tuple("ab"[:classes] or "a"), "toy")


@pytest.mark.parametrize("splits, message", [
    (Splits(_set(4, [0, 0, 0, 0]), _set(2), None), "class 'b' has no train images"),
    (Splits(_set(4), _set(2, [1, 1]), None), "class 'a' has no test images"),
    (Splits(_set(1, [0], classes=1), _set(2), None), "1 class(es)"),
    (Splits(_set(1, [0]), _set(2), None), "the train split holds 1 image(s); at least 2 are needed"),
    (Splits(_set(4), _set(2, size=16), None), "images of different sizes across splits (train 3x8x8, test 3x16x16"),
    (Splits(_set(4), _set(2), _set(4, size=12)), "source 3x12x12"),
    (Splits(_set(4, channels=1), _set(2, channels=1), None), "need 3 channels (RGB)"),
    (Splits(_set(4, size=4), _set(2, size=4), None), "at least 8 x 8 pixels"),
], ids=["empty-train-class", "empty-test-class", "one-class", "one-image", "sizes", "source-size", "gray", "tiny"])
def test_bad_data_sets_are_refused_by_name(splits, message):
    with pytest.raises(UEBenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_splits(DatasetConfig("toy"), splits)
    check_splits(DatasetConfig("toy"), Splits(_set(4), _set(2), _set(4)))


def test_a_sample_smaller_than_the_classes_is_refused():
    from benchmark.data import load_dataset

    with pytest.raises(UEBenchError, match=r"train_size=5 is smaller than its 10 classes.*at least one image per "
                                           r"class \(>= 10\)"):
        load_dataset(DatasetConfig("shapes", train_size=5, test_size=10, source_size=10))


# ---------------------------------------------------------------- fuzzing (hypothesis)

NAMES = sorted(DEFENSES.names()) + sorted(ATTACKS.names())
FIELDS = ["eps", "mode", "steps", "k", "epochs", "lr", "weights", "batch_size", "augment", "surrogate_backbone",
          "optimizer", "patch_size", "bogus", ""]
VALUES = st.one_of(
    st.sampled_from(["0", "1", "-1", "99", "8/255", "1/0", "nan", "inf", "-inf", "1e400", "true", "none", "",
                     "class", "sample", "sgd", "resnet_tiny", "x", "0x10", "1_000", "3.5", " 2 "]),
    st.text(alphabet=string.printable, max_size=8))


@st.composite
def specs(draw) -> str:
    """Plugin specs: mostly well-formed ``name:field=value,...`` with bad parts, sometimes plain noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(alphabet=string.printable.replace(".", ""), max_size=30))
    name = draw(st.one_of(st.sampled_from(NAMES), st.text(alphabet=string.ascii_lowercase + "_:@ ", max_size=10)))
    pairs = draw(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), max_size=3))
    sep = draw(st.sampled_from([",", ",", ";", ",,"]))
    body = sep.join(f"{k}={v}" if draw(st.booleans()) or not k else k for k, v in pairs)
    return f"{name}:{body}" if pairs or draw(st.booleans()) else name


@FUZZ
@given(spec=specs(), kind=st.sampled_from(["defense", "attack"]))
def test_fuzz_plugin_specs(spec, kind):
    registry = DEFENSES if kind == "defense" else ATTACKS
    try:
        parse_spec(spec)
        configured = configure(registry, spec, PRESETS["quick"].defense_protocol if kind == "defense"
                               else PRESETS["quick"].attack_protocol, backbone="resnet_tiny")
        configured.plugin.check_info()
        event("accepted")
    except UEBenchError as exc:
        assert "\n" not in str(exc), f"{spec!r}: a multi-line error: {exc}"
        event("refused")


SCALARS = st.one_of(st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=8), st.sampled_from(["quick", "clean", "scratch", "resnet_tiny", "8/255"]))
TOML_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)
PRESET_KEYS = ["name", "description", "dataset", "defenses", "attacks", "backbones", "seeds", "defense_protocol",
               "attack_protocol", "zoo", "protocol_note", "extends", "bogus"]
GOOD_VALUES = {"defenses": st.lists(st.sampled_from(["clean", "random_noise", "em:mode=class", "lsp:eps=x"]),
                                    min_size=1, max_size=2),
               "attacks": st.lists(st.sampled_from(["scratch", "frozen_shallow:k=9", "linear_probe"]), max_size=2),
               "backbones": st.lists(st.sampled_from(["resnet_tiny", "vit_tiny", "nope"]), max_size=2),
               "seeds": st.lists(st.integers(-1, 3), max_size=3),
               "dataset": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["shapes", "cifar10", "x"]),
                                                             "train_size": st.integers(-1, 50),
                                                             "image_column": SCALARS}),
               "attack_protocol": st.dictionaries(st.sampled_from(["*", "scratch", "scratch@resnet_tiny"]),
                                                  st.dictionaries(st.sampled_from(["epochs", "lr", "augment", "x"]),
                                                                  SCALARS, max_size=2), max_size=2),
               "zoo": st.dictionaries(st.sampled_from(["supervised", "sf", "augment", "temperature", "seed"]),
                                      st.one_of(SCALARS, st.dictionaries(st.sampled_from(["epochs", "lr", "gray_p"]),
                                                                         SCALARS, max_size=2)), max_size=2)}


@st.composite
def preset_tables(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(PRESET_KEYS), unique=True, max_size=5))
    table = {"extends": "quick"} if draw(st.booleans()) else {}
    for key in keys:
        good = GOOD_VALUES.get(key)
        table[key] = draw(good if good is not None and draw(st.booleans()) else TOML_VALUES)
    return table


@FUZZ
@given(table=preset_tables())
def test_fuzz_preset_tables(table):
    try:
        preset = preset_from_dict(table)
        plan(preset)
        event("accepted")
    except UEBenchError as exc:
        assert "\n" not in str(exc), f"{table!r}: a multi-line error: {exc}"
        event("refused")


@FUZZ
@given(text=st.one_of(st.text(max_size=60), st.lists(st.sampled_from(
    ['extends = "quick"', "seeds = [0]", 'seeds = "x"', "[dataset]", "train_size = 0", "[attack_protocol.scratch]",
     "epochs = -1", "epochs = 1", "lr = inf", "[zoo.sf]", "[[seeds]]", "name = 'x'", "a.b.c = 1", "= 1"]),
    max_size=6).map("\n".join)))
def test_fuzz_preset_files(text, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    try:
        plan(load_preset(str(path)))
        event("accepted")
    except UEBenchError as exc:
        assert "\n" not in str(exc), f"{text!r}: a multi-line error: {exc}"
        event("refused")


RUN_OPTIONS = {
    "--preset": st.sampled_from(["quick", "standard", "paper", "nope", "missing.toml", ""]),
    "--dataset": st.sampled_from(["shapes", "cifar10", "hf:", "hf:./x", "mnist", "", "../x"]),
    "--train-size": st.sampled_from(["0", "-1", "5", "100", "x", "1e3", "99999999999"]),
    "--test-size": st.sampled_from(["0", "20", "-5"]),
    "--seeds": st.lists(st.sampled_from(["0", "1", "-1", "x", "2147483648"]), min_size=1, max_size=3),
    "--defenses": st.lists(specs(), min_size=1, max_size=2),
    "--attacks": st.lists(specs(), min_size=1, max_size=2),
    "--backbones": st.lists(st.sampled_from(["resnet_tiny", "vit_tiny", "resnet9000", "", "mobilenet_tiny"]),
                            min_size=1, max_size=2),
    "--device": st.sampled_from(["cpu", "auto", "tpu", "cuda:x", "cuda:99", "", "cpu "]),
}


@FUZZ
@given(options=st.dictionaries(st.sampled_from(sorted(RUN_OPTIONS)), st.none(), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: RUN_OPTIONS[k] for k in keys})))
def test_fuzz_the_command_line(options, tmp_path, capsys, no_work):
    argv = ["run", "--out", str(tmp_path / "out")]
    for option, value in options.items():
        argv += [option, *(value if isinstance(value, list) else [value])]
    try:
        code = run_benchmark.main(argv)
    except WouldRun:
        event("accepted")
        capsys.readouterr()
        return
    except SystemExit as exc:  # argparse: usage and one error line naming the argument
        err = capsys.readouterr().err
        assert exc.code == 2 and "error: " in err.splitlines()[-1] and "Traceback" not in err, err
        event("refused by argparse")
        return
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("uebench: error: "), f"{argv}: {code} {err!r}"
    event("refused")
