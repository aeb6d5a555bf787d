"""Process settings for speed: glibc keeps freed memory, so training steps stop paying page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

STEPS = """
import json, resource, sys, torch
from benchmark.runtime import keep_freed_memory
keep = sys.argv[1] == "keep" and keep_freed_memory()
from benchmark.models import create_model
from benchmark.training import TrainConfig, train
torch.manual_seed(0)
images, labels = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (1024,))
cfg = TrainConfig(epochs=1, lr=0.01, augment="none")
train(create_model("resnet_tiny", 10), images[:256], labels[:256], cfg, device=torch.device("cpu"), seed=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
result = train(create_model("resnet_tiny", 10), images, labels, cfg, device=torch.device("cpu"), seed=0)
print(json.dumps({"kept": keep, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "loss": result.final_loss}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_spares_page_faults_and_changes_no_number():
    default, kept = _run("default"), _run("keep")
    assert kept["kept"], "keep_freed_memory() did not take on glibc"
    assert kept["loss"] == default["loss"], f"the loss changed: {default['loss']} -> {kept['loss']}"
    assert kept["faults"] * 4 < default["faults"], \
        f"8 training steps took {kept['faults']} minor page faults with freed memory kept, {default['faults']} without"
