"""BAIT: the target curriculum, the look-ahead step, class-wise release, budget and determinism."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from benchmark.errors import UEBenchError
from benchmark.models import create_model
from benchmark.plugins import perturbation_stats
from defenses.bait import (STAGES, Bait, Generator, class_structure, curriculum_stage, lookahead_step,
                           select_targets)

LOGITS = torch.tensor([[5.0, 4.0, 1.0, 0.0],
                       [0.0, 9.0, 3.0, -1.0],
                       [2.0, 2.5, 7.0, 1.0],
                       [-3.0, 1.0, 0.5, 2.0]])  # the last row's true class has the lowest logit
LABELS = torch.tensor([0, 1, 2, 0])


def tiny_bait(**overrides) -> Bait:
    """A BAIT small enough for a test (the published generator, epochs and batch are far larger)."""
    fields = dict(epochs=3, generator="small", surrogate_backbone="resnet_tiny", batch_size=16, augment="none")
    return Bait(**{**fields, **overrides})


@pytest.mark.parametrize("stage, expected", [("hard", [1, 2, 1, 3]), ("least", [3, 3, 3, 2])])
def test_deterministic_targets(stage, expected):
    got = select_targets(LOGITS, LABELS, stage, torch.Generator().manual_seed(0))
    assert got.tolist() == expected, f"stage {stage}: targets {got.tolist()}, expected {expected}"
    assert not bool((got == LABELS).any()), f"stage {stage} picked a true class: {got.tolist()}"


def test_random_targets_are_uniform_over_wrong_classes():
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(4000, dtype=torch.long)
    got = select_targets(torch.zeros(4000, 4), labels, "random", gen)
    assert not bool((got == labels).any()), "the random stage picked the true class"
    counts = torch.bincount(got, minlength=4)[1:].float() / 4000
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04), f"wrong classes not uniform: {counts.tolist()}"


def test_curriculum_thirds():
    stages = [curriculum_stage(e, 90) for e in (0, 29, 30, 59, 60, 89)]
    assert stages == ["hard", "hard", "random", "random", "least", "least"], f"90-epoch curriculum: {stages}"
    assert [curriculum_stage(e, 3) for e in range(3)] == ["hard", "random", "least"], "3-epoch curriculum"


def test_lookahead_changes_copy_not_original():
    torch.manual_seed(0)
    model = create_model("resnet_tiny", 4, 16).train()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    state = lookahead_step(model, x, y, lr=0.1, weight_decay=5e-4)
    after = model.state_dict()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"the look-ahead changed the original model: {changed[:3]}"
    names = [n for n, _ in model.named_parameters()]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, state.params[n])]
    # (a few tensors get zero gradient: timm zero-initializes each block's last BatchNorm scale)
    assert len(moved) > 0.8 * len(names), f"the functional copy moved only {len(moved)} of {len(names)} parameters"
    stats = [n for n in state.buffers if "running_mean" in n and not torch.equal(state.buffers[n], before[n])]
    assert stats, "the copy's BatchNorm statistics should update in train mode (on the clones)"
    # theta' is exactly one step of PyTorch's SGD
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(twin(x), y).backward()
    opt.step()
    for n, p in twin.named_parameters():
        assert torch.allclose(p, state.params[n], atol=1e-6), f"theta' differs from an SGD step at {n}"
    graph = lookahead_step(model, x, y, lr=0.1, create_graph=True)
    assert graph.params["net.fc.weight"].grad_fn is not None, "create_graph=True must keep theta' differentiable"


def test_published_generator_size():
    n = sum(p.numel() for p in Generator(3, 16, 8).parameters())
    assert 40e6 < n < 42e6, f"the published generator should have about 41M parameters, has {n}"


def test_bad_field_is_rejected():
    with pytest.raises(UEBenchError, match="generator"):
        Bait(generator="huge")


def test_release_is_classwise_in_budget_and_deterministic(tiny_train, ctx):
    bait = tiny_bait()
    out = bait.perturb(tiny_train, ctx)
    stats = perturbation_stats(tiny_train.images, out.data.images)
    assert 0 < stats.linf <= 8, f"L-inf {stats.linf}/255 outside (0, 8]"
    diff = out.data.images.to(torch.int16) - tiny_train.images.to(torch.int16)
    free = (tiny_train.images >= 8) & (tiny_train.images <= 247)  # pixels the [0, 255] clip cannot touch
    for c in range(tiny_train.num_classes):
        sel = tiny_train.labels == c
        d, m = diff[sel], free[sel]
        spread = d.masked_fill(~m, -999).amax(0) - d.masked_fill(~m, 999).amin(0)
        both = m.sum(0) >= 2
        assert int(spread[both].max()) == 0, f"class {c}: perturbations differ between its images"
    cert = out.certificate
    assert cert is not None, "bait must return a certificate"
    names = {c.name for c in cert.checks}
    assert names == {"bind_rate", "surrogate_error", "class_specific", "mean_class_cosine"}, f"checks: {names}"
    again = bait.perturb(tiny_train, ctx)
    assert torch.equal(out.data.images, again.data.images), "the same seed must give the same bytes"


def test_class_structure_of_shared_and_distinct_noise():
    shared = torch.ones(4, 3, 8, 8).mul(0.01)
    specific, cos = class_structure(shared)
    assert specific < 1e-6 and cos > 0.999, f"one shared pattern: class-specific {specific}, cosine {cos}"
    distinct = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    specific, cos = class_structure(distinct)
    assert specific > 0.8 and abs(cos) < 0.2, f"independent patterns: class-specific {specific}, cosine {cos}"


@pytest.mark.slow
def test_direct_parametrization_binds_on_a_tiny_set(tiny_train, ctx):
    """The direct variant passes its certificate on 40 images against a random-init surrogate (60 outer
    steps; a 16/255 budget so that so few steps suffice), and every curriculum stage's hit rate is
    recorded; one epoch of the generator path does not bind."""
    direct = tiny_bait(parametrization="direct", epochs=60, batch_size=40, eps=16 / 255, direct_step=2 / 255,
                       pretrained_surrogate=False).perturb(tiny_train, ctx).certificate
    assert direct.passed, f"direct BAIT should pass its certificate on a tiny set: {direct.describe()}"
    bind = {c.name: c for c in direct.checks}["bind_rate"]
    assert bind.passed, f"direct BAIT should bind on a tiny set: {direct.describe()}"
    info = dict(direct.info)
    assert {f"hit_rate_{s}" for s in STAGES} <= set(info), f"per-stage hit rates missing: {sorted(info)}"
    assert all(0 <= info[f"hit_rate_{s}"] <= 1 for s in STAGES), f"hit rates outside [0, 1]: {info}"
    generator = tiny_bait(epochs=1, batch_size=40, pretrained_surrogate=False).perturb(tiny_train, ctx).certificate
    assert not generator.passed, f"one epoch of the small generator cannot bind, yet: {generator.describe()}"


def test_parametrization_is_validated():
    with pytest.raises(UEBenchError, match="parametrization"):
        Bait(parametrization="lookup")
