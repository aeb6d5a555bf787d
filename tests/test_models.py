"""Backbones: every registered one builds, splits into stages, freezes and replaces its head."""

from __future__ import annotations

import pytest
import torch

from benchmark.errors import UEBenchError
from benchmark.models import BACKBONES, create_model

FAST = [n for n in BACKBONES if n.endswith("_tiny")]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("size", [28, 32])
def test_forward_and_stages(name, size):
    model = create_model(name, 7, image_size=size)
    out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 7), f"{name} at {size}px gave {tuple(out.shape)}"
    stages = model.stages()
    assert len(stages) >= 4, f"{name}: expected stem, >= 2 body stages and a head, got {len(stages)} groups"
    every = {n for n, _ in model.net.named_parameters()}
    assert set().union(*map(set, stages)) == every, f"{name}: stages do not cover every parameter"
    head = {n for n, p in model.net.named_parameters() if any(p is q for q in model.head.parameters())}
    assert head <= set(stages[-1]), f"{name}: the classifier must be in the last group"


@pytest.mark.parametrize("name", FAST)
def test_freeze_stages_keeps_eval_mode(name):
    model = create_model(name, 3)
    model.freeze_stages(1)
    frozen = model.frozen_parameter_names()
    stages = model.stages()
    assert frozen == set(stages[0]) | set(stages[1]), f"{name}: froze {sorted(frozen)[:4]}..."
    model.train()
    for mod_name, module in model.net.named_modules():
        own = [f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)]
        if own and all(n in frozen for n in own):
            assert not module.training, f"{name}: frozen module {mod_name} is in train mode"
    with pytest.raises(UEBenchError, match="out of range"):
        model.freeze_stages(99)


def test_reset_head_and_features():
    model = create_model("resnet_tiny", 10)
    model.reset_head(4)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)
    assert model.features(torch.rand(1, 3, 32, 32)).shape == (1, 128)


def test_unknown_backbone():
    with pytest.raises(UEBenchError, match="unknown backbone 'resnet9000'; valid names: .*resnet_tiny"):
        create_model("resnet9000", 10)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_split_is_the_network_cut_after_the_frozen_stages(name, k):
    model = create_model(name, 5)
    model.freeze_stages(k)
    model.eval()
    prefix, suffix = model.split(k)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(suffix(prefix(x)), model(x), msg=f"{name}, k={k}: suffix(prefix(x)) != model(x)")
    params = {id(p): n for n, p in model.net.named_parameters()}
    in_prefix = {params[id(p)] for p in prefix.parameters()}
    in_suffix = {params[id(p)] for p in suffix.parameters()}
    stages = model.stages()
    assert in_prefix | in_suffix == set(params.values()) and not in_prefix & in_suffix, \
        f"{name}, k={k}: prefix and suffix must share out the parameters, overlap {sorted(in_prefix & in_suffix)[:3]}"
    assert in_prefix == set().union(*map(set, stages[: k + 1])), \
        f"{name}, k={k}: the prefix holds {sorted(in_prefix)[:4]}..., not the stem and the first {k} stages"
    if k:
        assert in_prefix == model.frozen_parameter_names(), f"{name}, k={k}: the prefix is not what freeze_stages froze"
    suffix.train()
    assert model.net.training and all(m.training for m in suffix.modules()), f"{name}: suffix.train() left eval modules"
    with pytest.raises(UEBenchError, match="out of range"):
        model.split(99)
