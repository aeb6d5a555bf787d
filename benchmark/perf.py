"""``uebench perf``: how fast this machine runs the benchmark, as a JSON report (also printed as tables).

Three measurements, each in this process:

- ``loop_vs_raw``: images/s of the training loop (``benchmark.training.train``: batching, augmentation,
  uint8 -> float, the step) divided by images/s of a bare forward + backward + step of the same model on
  one fixed batch that is already a float tensor: the machine's limit for that model. One per backbone,
  with the protocol's augmentation on (crop + flip) and off.
- ``loop_vs_classic``: the loop (crop + flip) divided by a classic ``torch.utils.data.DataLoader`` with
  per-sample PIL transforms (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``) and
  ``num_workers=2``: same model, data, batch size and optimizer step.
- ``grid``: a preset (default ``quick``) run cold (empty cache and store, in a temporary folder) and
  then warm (everything reused): wall seconds, peak resident memory, seconds per phase and per cell.

Each ratio is measured side by side: the two sides alternate over ``repeats`` rounds after a warm-up,
and the median of each side is reported. The protocol (optimizer, learning rate, precision, batch
size) is the preset's ``scratch`` recipe for that backbone.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from benchmark.errors import UEBenchError
from benchmark.phases import PHASES
from benchmark.presets import Preset
from benchmark.training import TrainConfig, make_optimizer, train, train_step, uses_bf16

log = logging.getLogger(__name__)
IMAGES = 2048  # images per timed pass (16 batches of 128)


def recipe(preset: Preset, backbone: str) -> TrainConfig:
    """The preset's ``scratch`` protocol on ``backbone``, as a ``TrainConfig``."""
    from benchmark.config import configure
    from benchmark.registry import ATTACKS

    return configure(ATTACKS, "scratch", preset.attack_protocol, backbone=backbone).plugin.train_config()


def _median_rates(sides: dict[str, Callable[[], float]], repeats: int, images: int) -> dict[str, float]:
    """Images/s of each side (a callable returning the seconds of one pass over ``images`` images): one
    warm-up pass each, then ``repeats`` alternating rounds; the median per side."""
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(fn())
    return {name: images / statistics.median(ts) for name, ts in times.items()}


def _sample(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` shapes images (uint8, 32 x 32) and their labels: the benchmark's own data."""
    from benchmark.shapes import generate

    images, labels, _ = generate("train", n, seed)
    return images, labels


def _model(backbone: str, seed: int = 0) -> torch.nn.Module:
    from benchmark.models import create_model

    torch.manual_seed(seed)
    return create_model(backbone, 10, 32, 3)


def loop_pass(backbone: str, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
              device: torch.device, init: dict) -> Callable[[], float]:
    """One epoch of the training loop over the images, from the same weights each time."""
    def run() -> float:
        model = _model(backbone)
        model.load_state_dict(init)
        return train(model, images, labels, replace(cfg, epochs=1, warmup_epochs=0), device=device, seed=0).seconds
    return run


def raw_pass(backbone: str, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
             device: torch.device, init: dict) -> Callable[[], float]:
    """The same number of steps on one fixed float batch: no data handling at all."""
    def run() -> float:
        model, params, opt = _fresh(backbone, init, cfg, device)
        x = images[: cfg.batch_size].to(device).float().div(255).contiguous(memory_format=torch.channels_last)
        y = labels[: cfg.batch_size].to(device)
        amp = uses_bf16(cfg.precision, device)
        start = time.perf_counter()
        for _ in range(0, len(images), cfg.batch_size):
            train_step(model, x, y, opt, params, amp=amp)
        return _stop(start, device)
    return run


def _fresh(backbone: str, init: dict, cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, list, Any]:
    """The model from ``init`` on the device in training mode, its trainable parameters and optimizer."""
    model = _model(backbone)
    model.load_state_dict(init)
    model.to(device=device, memory_format=torch.channels_last).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, make_optimizer(params, cfg)


def _stop(start: float, device: torch.device) -> float:
    """Seconds since ``start``, once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class _PILSet(torch.utils.data.Dataset):
    """Images kept as PIL images, transformed one at a time: how the field's reference code loads data."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision import transforms
        from torchvision.transforms.functional import to_pil_image

        self.images = [to_pil_image(img) for img in images]
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def classic_pass(backbone: str, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                 device: torch.device, init: dict) -> Callable[[], float]:
    """One epoch through a classic DataLoader (per-sample PIL transforms, two worker processes)."""
    dataset = _PILSet(images, labels)

    def run() -> float:
        model, params, opt = _fresh(backbone, init, cfg, device)
        amp = uses_bf16(cfg.precision, device)
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(0))
        for x, y in loader:
            train_step(model, x.to(device), y.to(device), opt, params, amp=amp)
        return _stop(start, device)
    return run


def measure_loops(preset: Preset, backbones: list[str], device: torch.device, repeats: int,
                  images: int = IMAGES) -> dict[str, Any]:
    """``loop_vs_raw`` (augmentation on and off) and ``loop_vs_classic`` per backbone, over ``images`` images."""
    n = images
    images, labels = _sample(n)
    out: dict[str, Any] = {"loop_vs_raw": {}, "loop_vs_classic": {}, "images_per_second": {}}
    for backbone in backbones:
        cfg = recipe(preset, backbone)
        init = copy.deepcopy(_model(backbone).state_dict())
        sides = {"raw": raw_pass(backbone, images, labels, cfg, device, init),
                 "loop_none": loop_pass(backbone, images, labels, replace(cfg, augment="none"), device, init),
                 "loop_crop_flip": loop_pass(backbone, images, labels, replace(cfg, augment="crop_flip"), device,
                                             init),
                 "classic_crop_flip": classic_pass(backbone, images, labels, cfg, device, init)}
        log.info("perf: timing the training loop of %s (%d rounds)", backbone, repeats)
        rates = _median_rates(sides, repeats, n)
        out["images_per_second"][backbone] = {k: round(v, 1) for k, v in rates.items()}
        out["loop_vs_raw"][backbone] = {"none": round(rates["loop_none"] / rates["raw"], 3),
                                        "crop_flip": round(rates["loop_crop_flip"] / rates["raw"], 3)}
        out["loop_vs_classic"][backbone] = round(rates["loop_crop_flip"] / rates["classic_crop_flip"], 3)
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_preset(preset: Preset, out_dir: Path, device: torch.device, progress: bool) -> dict[str, Any]:
    """Run a preset's grid into ``out_dir`` (as ``uebench run`` does, leaderboard included); its wall
    seconds, phases and cells."""
    from benchmark.execute import LocalExecutor, run_grid
    from benchmark.plan import plan
    from leaderboard.build import publish_run

    PHASES.reset()
    start = time.perf_counter()
    with PHASES.timed("plan"):
        cells = plan(preset)
    executor = LocalExecutor(out_dir / "cache", device=device, progress=progress)
    summary = run_grid(cells, out_dir, executor)
    with PHASES.timed("leaderboard"):
        publish_run(out_dir, cells)
    wall = time.perf_counter() - start
    phases = PHASES.snapshot()
    phases["other"] = max(0.0, wall - sum(phases.values()))
    seconds = [r.seconds for r in summary.ran]
    return {"wall_seconds": round(wall, 1), "cells": len(cells), "cells_run": len(summary.ran),
            "cells_failed": len(summary.failed),
            "seconds_per_cell": round(statistics.mean(seconds), 2) if seconds else 0.0,
            "phases": {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])}}


def measure_grid(preset: Preset, device: torch.device, progress: bool, keep: Path | None = None) -> dict[str, Any]:
    """The preset cold (a new folder: no cache, no store), then warm (the same folder again)."""
    with tempfile.TemporaryDirectory(prefix="uebench-perf-") as tmp:
        out_dir = keep or Path(tmp)
        if keep is not None and any(keep.iterdir() if keep.exists() else ()):
            raise UEBenchError(f"--keep {str(keep)!r} must be a new or empty folder (a cold run starts empty)")
        cold = run_preset(preset, out_dir, device, progress)
        cold["peak_rss_mib"] = round(_peak_rss_mib(), 1)
        warm = run_preset(preset, out_dir, device, progress)
    return {"preset": preset.name, "cold": cold, "warm": warm}


def machine() -> dict[str, Any]:
    import os

    from benchmark.execute import cpu

    info = cpu()
    return {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": info["cpu"], "cpu_capability": info["cpu_capability"],
            "load_average_1m": round(os.getloadavg()[0], 2)}


def report(preset: Preset, device: torch.device, *, repeats: int = 3, grid: bool = True, progress: bool = False,
           keep: Path | None = None, images: int = IMAGES) -> dict[str, Any]:
    """The whole perf report (see the module docstring)."""
    out: dict[str, Any] = {"machine": machine(), "device": str(device), "images_per_pass": images,
                           "repeats": repeats}
    out.update(measure_loops(preset, list(dict.fromkeys(preset.backbones)), device, repeats, images))
    if grid:
        out["grid"] = measure_grid(preset, device, progress, keep)
    out["machine"]["load_average_1m_after"] = machine()["load_average_1m"]
    out["targets"] = assess(out)
    return out


# The targets of the 2-core CPU machine the benchmark is developed on (README, "Performance").
TARGETS = {"loop_vs_raw": (">=", 0.95), "loop_vs_classic": (">=", 1.2), "cold_wall_seconds": ("<=", 600.0),
           "warm_wall_seconds": ("<=", 10.0), "peak_rss_mib": ("<=", 4096.0)}


def assess(rep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target against its measured value (the worst over backbones and augmentation settings), met
    or missed and by how much (``ratio`` = measured / target)."""
    measured: dict[str, float] = {
        "loop_vs_raw": min(v for r in rep["loop_vs_raw"].values() for v in r.values()),
        "loop_vs_classic": min(rep["loop_vs_classic"].values())}
    if "grid" in rep:
        measured.update(cold_wall_seconds=rep["grid"]["cold"]["wall_seconds"],
                        warm_wall_seconds=rep["grid"]["warm"]["wall_seconds"],
                        peak_rss_mib=rep["grid"]["cold"]["peak_rss_mib"])
    out = {}
    for name, value in measured.items():
        op, target = TARGETS[name]
        out[name] = {"measured": value, "target": f"{op} {target:g}", "met": value >= target if op == ">=" else
                     value <= target, "ratio": round(value / target, 3)}
    return out


def tables(rep: dict[str, Any]) -> str:
    """The report as text tables."""
    from tabulate import tabulate

    rows = [[b, r["none"], r["crop_flip"], rep["loop_vs_classic"][b], rep["images_per_second"][b]["raw"],
             rep["images_per_second"][b]["loop_crop_flip"], rep["images_per_second"][b]["classic_crop_flip"]]
            for b, r in rep["loop_vs_raw"].items()]
    text = tabulate(rows, headers=["backbone", "loop/raw (no aug)", "loop/raw (crop+flip)", "loop/classic",
                                   "raw img/s", "loop img/s", "classic img/s"])
    if "grid" in rep:
        g = rep["grid"]
        cold, warm = g["cold"], g["warm"]
        text += (f"\n\n{g['preset']}: {cold['cells']} cells; cold {cold['wall_seconds']:.0f} s "
                 f"({cold['seconds_per_cell']:.1f} s a cell, peak RSS {cold['peak_rss_mib']:.0f} MiB), "
                 f"warm {warm['wall_seconds']:.1f} s\n\n")
        text += tabulate([[k, v] for k, v in cold["phases"].items()], headers=["phase (cold)", "seconds"],
                         floatfmt=".1f")
    rows = [[k, v["measured"], v["target"], "met" if v["met"] else f"missed ({v['ratio']:g}x the target)"]
            for k, v in rep["targets"].items()]
    text += "\n\n" + tabulate(rows, headers=["target", "measured", "wanted", ""], disable_numparse=True)
    m = rep["machine"]
    text += (f"\n\nmachine: {m['cpus']} CPUs, {m['threads']} torch threads, {m['processor']} "
             f"({m.get('cpu_capability', '?')} kernels), device "
             f"{rep['device']}; load average {m['load_average_1m']} before, {m['load_average_1m_after']} after")
    return text


def write(rep: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
