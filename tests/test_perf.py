"""``uebench perf``, the phase clock, the cost-weighted plan and progress bar, and the training precision."""

from __future__ import annotations

import json

import pytest
import torch

from benchmark import perf
from benchmark.execute import LocalExecutor, run_grid
from benchmark.phases import PhaseClock
from benchmark.plan import plan
from benchmark.presets import preset_from_dict
from benchmark.progress import CostModel, describe_plan, expected_seconds
from benchmark.training import TrainConfig, train, uses_bf16
from run_benchmark import main
from tests.test_runner import TINY


def test_phases_are_exclusive(monkeypatch):
    now = iter([0.0, 1.0, 3.0, 4.0, 10.0])  # outer opens, inner opens, inner closes, outer closes... then extra
    monkeypatch.setattr("benchmark.phases.time.perf_counter", lambda: next(now))
    clock = PhaseClock()
    with clock.timed("outer"):
        with clock.timed("inner"):
            pass
    # outer: 0 -> 1 and 3 -> 4; inner: 1 -> 3
    assert clock.snapshot() == {"outer": 2.0, "inner": 2.0}


def test_precision_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_bf16("auto", cpu) and uses_bf16("auto", cuda)
    assert uses_bf16("bf16", cpu) and not uses_bf16("fp32", cuda)
    with pytest.raises(Exception, match="precision"):
        TrainConfig(precision="fp16")


def test_bf16_trains_under_autocast_and_keeps_float32_weights(tiny_train, monkeypatch):
    from benchmark.models import create_model

    seen = []
    model = create_model("resnet_tiny", 10)
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    train(model, tiny_train.images, tiny_train.labels, TrainConfig(epochs=1, batch_size=20, augment="none",
                                                                    precision="bf16"),
          device=torch.device("cpu"), seed=0)
    assert seen and all(seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_backbone_wide_protocol_applies_to_every_attack_on_that_backbone():
    preset = preset_from_dict({**TINY, "attacks": ["scratch", "full_finetune"],
                               "backbones": ["resnet_tiny", "mobilenet_tiny"],
                               "attack_protocol": {"*": {"precision": "bf16"}, "*@mobilenet_tiny": {"precision": "fp32"},
                                                   "full_finetune@mobilenet_tiny": {"precision": "bf16"}}})
    got = {(c.attack.name, c.backbone): c.attack.plugin.precision for c in plan(preset) if c.defense.label == "clean"}
    assert got == {("scratch", "resnet_tiny"): "bf16", ("full_finetune", "resnet_tiny"): "bf16",
                   ("scratch", "mobilenet_tiny"): "fp32", ("full_finetune", "mobilenet_tiny"): "bf16"}


def test_a_backbone_wide_protocol_field_must_exist():
    with pytest.raises(Exception, match=r"\*@resnet_tiny.*'epoch'"):
        plan(preset_from_dict({**TINY, "attack_protocol": {"*@resnet_tiny": {"epoch": 2}}}))


def test_the_cost_model_uses_history_per_attack_and_backbone():
    rows = [{"status": "ok", "attack": "scratch", "backbone": "resnet_tiny", "dataset": "shapes", "defense": d,
             "seconds": s, "defense_seconds": g, "metrics": {"attack": {"epochs": 6}}}
            for d, s, g in (("clean", 60.0, 0.0), ("em", 100.0, 40.0), ("lsp", 62.0, 0.0))]
    model = CostModel(rows)
    assert model.fit[("scratch", "resnet_tiny", "shapes")] == 60.0  # median of 60, 60, 62
    assert model.generation[("em", "shapes")] == 40.0
    assert model.per_epoch == 10.0
    assert CostModel([]).per_epoch is None  # a new store: the proxy is images over an assumed rate


def test_a_new_store_estimates_from_the_training_size():
    cell = next(c for c in plan(preset_from_dict(dict(TINY))) if c.attack.name == "scratch")
    epochs, size = cell.attack.plugin.epochs, cell.dataset.train_size
    assert CostModel([]).seconds(cell, protected_cached=True) == pytest.approx(epochs * size / 500.0)


def test_the_plan_is_described_and_the_estimate_counts_each_protected_set_once(tmp_path):
    cells = plan(preset_from_dict(dict(TINY)))
    rows = [{"status": "ok", "attack": "scratch", "backbone": "resnet_tiny", "dataset": "shapes",
             "defense": "random_noise", "seconds": 7.0, "defense_seconds": 2.0, "metrics": {}}]
    est = expected_seconds(cells, rows, None)
    assert set(est) == {c.key for c in cells}
    noise = [c for c in cells if c.defense.label == "random_noise"]
    assert est[noise[0].key] == pytest.approx(5.0 + 2.0)
    text = describe_plan(cells, cells[1:], None, est)
    assert f"{len(cells)} cells; 1 finished in the store, {len(cells) - 1} to run" in text


def test_run_logs_the_plan_first(tmp_path, caplog):
    cells = plan(preset_from_dict(dict(TINY)))
    executor = LocalExecutor(tmp_path / "cache", device=torch.device("cpu"), progress=False)
    with caplog.at_level("INFO", logger="benchmark.execute"):
        run_grid(cells, tmp_path / "out", executor)
        run_grid(cells, tmp_path / "out", executor)
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan:")]
    assert plans[0] == f"plan: {len(cells)} cells; 0 finished in the store, {len(cells)} to run"
    assert any("protected sets needed, 0 cached" in p for p in plans)
    assert plans[-1] == f"plan: {len(cells)} cells; {len(cells)} finished in the store, 0 to run"


def test_loop_ratios_are_measured_side_by_side():
    preset = preset_from_dict(dict(TINY))
    rep = perf.measure_loops(preset, ["resnet_tiny"], torch.device("cpu"), repeats=1, images=64)
    rates = rep["images_per_second"]["resnet_tiny"]
    assert set(rates) == {"raw", "loop_none", "loop_crop_flip", "classic_crop_flip"}
    assert all(v > 0 for v in rates.values())
    # the rates are reported to 0.1 image/s, the ratios from the unrounded rates
    assert rep["loop_vs_raw"]["resnet_tiny"]["none"] == pytest.approx(rates["loop_none"] / rates["raw"], rel=0.01)
    assert rep["loop_vs_classic"]["resnet_tiny"] == pytest.approx(
        rates["loop_crop_flip"] / rates["classic_crop_flip"], rel=0.01)


def test_the_grid_is_measured_cold_then_warm():
    grid = perf.measure_grid(preset_from_dict(dict(TINY)), torch.device("cpu"), progress=False)
    cold, warm = grid["cold"], grid["warm"]
    assert cold["cells"] == warm["cells"] == cold["cells_run"] == 3 and warm["cells_run"] == 0
    assert {"data", "attack scratch @ resnet_tiny", "generate random_noise", "leaderboard"} <= set(cold["phases"])
    assert "attack scratch @ resnet_tiny" not in warm["phases"] and cold["peak_rss_mib"] > 0
    assert cold["wall_seconds"] >= sum(v for k, v in cold["phases"].items() if k != "other") - 0.1


def test_perf_command_writes_the_json_report(tmp_path, capsys):
    preset = tmp_path / "tiny.toml"
    preset.write_text('extends = "quick"\nname = "tiny"\nbackbones = ["resnet_tiny"]\n'
                      '[attack_protocol.scratch]\nbatch_size = 16\n', encoding="utf-8")
    assert main(["perf", "--preset", str(preset), "--no-grid", "--images", "32", "--repeats", "1",
                 "--json", str(tmp_path / "perf.json"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "perf.json").read_text())
    assert {"loop_vs_raw", "loop_vs_classic", "machine", "images_per_second", "targets"} <= set(rep)
    assert set(rep["targets"]) == {"loop_vs_raw", "loop_vs_classic"}  # no grid: no grid targets
    assert "loop/classic" in capsys.readouterr().out
    assert main(["perf", "--repeats", "0"]) == 2


@pytest.mark.gpu
def test_cuda_training_keeps_data_on_the_device_in_bf16(tiny_train):
    from benchmark.models import create_model

    seen = []
    model = create_model("resnet_tiny", 10)
    model.register_forward_hook(lambda m, i, o: seen.append((i[0].device.type, torch.is_autocast_enabled("cuda"),
                                                            i[0].is_contiguous(memory_format=torch.channels_last))))
    train(model, tiny_train.images, tiny_train.labels, TrainConfig(epochs=1, batch_size=20), device=torch.device("cuda"),
          seed=0)
    assert seen and all(s == ("cuda", True, True) for s in seen)


def test_targets_say_met_or_missed_and_by_how_much():
    rep = {"loop_vs_raw": {"a": {"none": 0.97, "crop_flip": 0.9}}, "loop_vs_classic": {"a": 2.4},
           "grid": {"cold": {"wall_seconds": 1200.0, "peak_rss_mib": 2048.0}, "warm": {"wall_seconds": 4.0}}}
    got = perf.assess(rep)
    assert got["loop_vs_raw"] == {"measured": 0.9, "target": ">= 0.95", "met": False, "ratio": 0.947}
    assert got["loop_vs_classic"]["met"] and got["warm_wall_seconds"]["met"] and got["peak_rss_mib"]["met"]
    assert got["cold_wall_seconds"] == {"measured": 1200.0, "target": "<= 600", "met": False, "ratio": 2.0}
