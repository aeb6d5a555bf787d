"""The command line: listings, and one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from run_benchmark import main


@pytest.mark.parametrize("what", ["defenses", "attacks", "backbones", "datasets", "presets"])
def test_list(what, capsys):
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    expected = {"defenses": "random_noise", "attacks": "scratch", "backbones": "resnet_tiny",
                "datasets": "fashion-mnist", "presets": "quick"}[what]
    assert expected in out, out


@pytest.mark.parametrize("argv, message", [
    (["run", "--defenses", "nope"], "unknown defense 'nope'; valid names:"),
    (["run", "--attacks", "scratch:epochs=x"], "cannot read 'x' as int"),
    (["run", "--backbones", "resnet9000"], "unknown backbone 'resnet9000'"),
    (["run", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "--dataset", "mnist2"], "unknown data set 'mnist2'"),
    (["run", "--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--plugin", "missing_file.py", "list"], "plugin file 'missing_file.py' does not exist"),
    (["run", "--dataset", "fashion-mnist", "--data-root", "/nonexistent-folder"], "dataset-fashion-mnist"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path):
    code = main(argv + (["--out", str(tmp_path)] if argv[0] == "run" else []))
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, f"not a one-line error: {err!r}"


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--seeds", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2, f"exit code {exc.value.code}, stderr: {err}"
    assert "error: argument --seeds: invalid int value: 'x'" in err, \
        f"the error must name the argument and the bad value: {err!r}"
    assert "Traceback" not in err, err
