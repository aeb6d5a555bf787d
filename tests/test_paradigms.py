"""Each victim paradigm trains on tiny data and freezes exactly what it says."""

from __future__ import annotations

import pytest
import torch

from benchmark.config import configure
from benchmark.errors import UEBenchError
from benchmark.models import create_model
from benchmark.registry import ATTACKS

FAST = {"epochs": 1, "batch_size": 16, "augment": "none"}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.net.named_parameters()}


def _buffers(model):
    return {n: b.detach().clone() for n, b in model.net.named_buffers()}


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_trains(name, tiny_train, tiny_test, ctx):
    attack = configure(ATTACKS, name, {"*": FAST}).plugin
    fitted = attack.fit(tiny_train, "resnet_tiny", ctx)
    model = fitted.model
    assert fitted.epochs == FAST["epochs"], f"{name}: reported {fitted.epochs} epochs, trained {FAST['epochs']}"
    assert fitted.train_accuracy is not None and 0 <= fitted.train_accuracy <= 100, \
        f"{name}: train accuracy {fitted.train_accuracy} is not a percentage"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert fitted.trainable_parameters == trainable > 0, \
        f"{name}: reported {fitted.trainable_parameters} trainable parameters, the model has {trainable}"
    logits = model(tiny_test.images[:4].float() / 255)
    assert logits.shape == (4, tiny_train.num_classes), f"{name}: output {tuple(logits.shape)}"
    assert not model.training, f"{name}: fit must return the model in eval mode"


@pytest.mark.parametrize("name", ATTACKS.names())
def test_a_cell_does_not_depend_on_what_ran_before(name, tiny_train, tiny_test, ctx):
    attack = configure(ATTACKS, name, {"*": FAST}).plugin
    x = tiny_test.images.float() / 255
    first = attack.fit(tiny_train, "resnet_tiny", ctx).model(x)
    torch.rand(1000)  # another cell, or anything else, moves the global random state
    again = attack.fit(tiny_train, "resnet_tiny", ctx).model(x)
    assert torch.equal(first, again), f"{name}: the same cell gave a different model after other work"


@pytest.mark.parametrize("spec, frozen_groups", [
    ("frozen_shallow", 2),            # stem + first stage
    ("frozen_shallow:k=2", 3),
    ("sf_pretrain", 2),
    ("full_finetune", 0),
    ("linear_probe", -1),             # everything but the classifier
    ("linear_probe:augment=flip", -1),  # the slow path: trained through the whole model
])
@pytest.mark.parametrize("backbone", ["resnet_tiny", "vit_tiny", "convnext_tiny"])
def test_frozen_parameters_do_not_change(spec, frozen_groups, backbone, tiny_train, ctx):
    attack = configure(ATTACKS, spec, {"*": FAST}).plugin
    pretrained = attack.pretrained(tiny_train, backbone, ctx)
    groups = pretrained.stages()
    if frozen_groups == -1:
        head = {id(p) for p in pretrained.head.parameters()}
        expected = {n for n, p in pretrained.net.named_parameters() if id(p) not in head}
    else:
        expected = {n for g in groups[:frozen_groups] for n in g}
    before, buffers = _snapshot(pretrained), _buffers(pretrained)
    model = attack.fit(tiny_train, backbone, ctx).model
    assert model.frozen_parameter_names() == expected, (
        f"{spec} on {backbone} froze {len(model.frozen_parameter_names())} tensors, expected {len(expected)}")
    after = _snapshot(model)
    for n in expected:
        assert torch.equal(before[n], after[n]), f"{spec}: frozen {n} changed during training"
    trainable = set(after) - expected  # the fresh head starts the same in both loads (seeded)
    changed = {n for n in trainable if not torch.equal(before[n], after[n])}
    assert changed, f"{spec} on {backbone}: none of its {len(trainable)} trainable tensors changed"
    head = {n for n, p in model.net.named_parameters() if id(p) in {id(q) for q in model.head.parameters()}}
    assert trainable <= head or changed - head, f"{spec} on {backbone}: only the classifier changed"
    after_buffers = _buffers(model)
    frozen_modules = {n.rsplit(".", 1)[0] for n in expected}
    for n, b in buffers.items():
        if n.rsplit(".", 1)[0] in frozen_modules and "running" in n:
            assert torch.equal(b, after_buffers[n]), f"{spec}: running statistic {n} of a frozen layer changed"


def test_pretrained_starts_from_zoo_weights(tiny_train, ctx):
    attack = configure(ATTACKS, "frozen_shallow", {"*": FAST}).plugin
    a = attack.pretrained(tiny_train, "resnet_tiny", ctx)
    zoo_state, _ = ctx.zoo.build("resnet_tiny", "supervised")
    head = {id(p) for p in a.head.parameters()}
    body = {n: p for n, p in a.net.named_parameters() if id(p) not in head}
    differ = [n for n, p in body.items() if not torch.equal(p, zoo_state[n])]
    assert not differ, f"weights=supervised must load every body tensor of the zoo entry; differ: {differ[:3]}"
    rnd = configure(ATTACKS, "frozen_shallow:weights=random", {"*": FAST}).plugin
    torch.manual_seed(123)  # another global random state: the init must come from the cell's seed alone
    c = rnd.pretrained(tiny_train, "resnet_tiny", ctx)
    torch.manual_seed(ctx.seed)
    fresh = create_model("resnet_tiny", tiny_train.num_classes, tiny_train.image_shape[-1], tiny_train.image_shape[0])
    assert all(torch.equal(p, q) for p, q in zip(c.net.parameters(), fresh.net.parameters())), \
        "weights=random must be the fresh init of the cell's seed (not the zoo, not the global random state)"
    assert not torch.equal(body["conv1.weight"], c.net.conv1.weight), "weights=random must not load the zoo"


def test_bad_options():
    with pytest.raises(UEBenchError, match="finetune='bogus' must be one of"):
        configure(ATTACKS, "sf_pretrain:finetune=bogus")
    with pytest.raises(UEBenchError, match="weights='imagenet' must be one of"):
        configure(ATTACKS, "full_finetune:weights=imagenet")
    with pytest.raises(UEBenchError, match="pretrain_on=protected needs weights=sf"):
        configure(ATTACKS, "sf_pretrain:pretrain_on=protected,weights=supervised")


@pytest.mark.parametrize("spec", ["frozen_shallow", "frozen_shallow:k=2", "sf_pretrain", "linear_probe"])
@pytest.mark.parametrize("backbone", ["resnet_tiny", "mobilenet_tiny"])
def test_a_frozen_part_run_once_trains_the_same_weights(spec, backbone, tiny_train, ctx, monkeypatch):
    from attacks import paradigms

    # two full batches an epoch: a batch of a single image takes another convolution kernel on the CPU
    attack = configure(ATTACKS, spec, {"*": {**FAST, "epochs": 2, "batch_size": 20}}).plugin
    once = _snapshot(attack.fit(tiny_train, backbone, ctx).model)
    monkeypatch.setattr(paradigms, "FROZEN_OUTPUTS_MAX_BYTES", 0)  # the frozen part runs in every step
    every_step = _snapshot(attack.fit(tiny_train, backbone, ctx).model)
    differ = [n for n in once if not torch.equal(once[n], every_step[n])]
    assert not differ, f"{spec} on {backbone}: frozen outputs computed once changed {differ[:3]}"
