"""SSC (interpretation): channel codes, confinement, the feature change in the subspace, budget, determinism."""

from __future__ import annotations

import pytest
import torch

from benchmark.errors import UEBenchError
from benchmark.plugins import perturbation_stats, quantize
from defenses.ssc import ShallowSemanticCamouflage, channel_codes, confinement, subspace_energy_ratio


def tiny_ssc(**overrides) -> ShallowSemanticCamouflage:
    # resnet_tiny's first stage has 16 channels: keep 12 so that 10 classes get disjoint codes
    fields = dict(surrogate_backbone="resnet_tiny", keep_fraction=0.75, rounds=2, train_steps=2, pgd_steps=5,
                  step_size=2 / 255, batch_size=20)
    return ShallowSemanticCamouflage(**{**fields, **overrides})


def test_channel_codes_are_disjoint_top_channels():
    energy = torch.tensor([5.0, 0.1, 4.0, 3.0, 0.2, 2.0, 1.0, 0.3])
    mask, codes = channel_codes(energy, 0.5, 2)
    assert mask.tolist() == [True, False, True, True, False, True, False, False], f"subspace {mask.tolist()}"
    assert codes.sum(0).max() == 1, "a channel belongs to two class codes"
    assert bool((codes.sum(0) > 0).le(mask).all()), "a code channel lies outside the subspace"
    assert codes.sum(1).tolist() == [2.0, 2.0], f"code sizes {codes.sum(1).tolist()}"


def test_confinement_measures_energy_outside():
    mask = torch.tensor([True, False])
    inside = torch.zeros(1, 2, 3, 3)
    inside[:, 0] = 1.0
    outside = torch.zeros(1, 2, 3, 3)
    outside[:, 1] = 1.0
    assert float(confinement(inside, mask)) == 0.0, "a change inside the subspace has no outside energy"
    assert float(confinement(outside, mask)) == 1.0, "a change outside the subspace is all outside energy"


def test_bad_field_is_rejected():
    with pytest.raises(UEBenchError, match="mode"):
        ShallowSemanticCamouflage(mode="pixel")


def test_class_mode_change_lies_in_subspace(tiny_train, ctx):
    ssc = tiny_ssc()
    result = ssc.perturb(tiny_train, ctx)
    out = result.data
    cert = result.certificate
    assert cert is not None and [(c.name, c.threshold, c.op) for c in cert.checks] == \
        [("surrogate_error", ssc.stop_error, "<=")], f"ssc's certificate must be its surrogate error: {cert}"
    info = dict(cert.info)
    assert set(info) == {"subspace_energy_ratio", "rounds"} and 1 <= info["rounds"] <= ssc.rounds, \
        f"ssc's certificate info: {info}"
    stats = perturbation_stats(tiny_train.images, out.images)
    assert 0 < stats.linf <= 8, f"L-inf {stats.linf}/255 outside (0, 8]"
    model, space = ssc.surrogate(tiny_train, ctx)
    ratio = subspace_energy_ratio(model, ssc.k, tiny_train.images, out.images, space.mask, ctx.device)
    assert ratio == pytest.approx(info["subspace_energy_ratio"], abs=1e-4), "the certificate's ratio differs"
    gen = torch.Generator().manual_seed(1)
    noise = (torch.rand((tiny_train.num_classes, *tiny_train.image_shape), generator=gen) * 2 - 1) * ssc.eps
    noisy = quantize(tiny_train.images, tiny_train.images.float() / 255 + noise[tiny_train.labels])
    baseline = subspace_energy_ratio(model, ssc.k, tiny_train.images, noisy, space.mask, ctx.device)
    assert ratio > 0.5, f"only {ratio:.2f} of the feature change lies in the semantic subspace"
    assert ratio > baseline + 0.05, f"SSC's subspace ratio {ratio:.2f} is not above random noise's {baseline:.2f}"
    again = ssc.perturb(tiny_train, ctx)
    assert torch.equal(out.images, again.data.images), "the same seed must give the same bytes"
    assert again.certificate == cert, "the same seed must give the same certificate"


def test_sample_mode_respects_budget(tiny_train, ctx):
    out = tiny_ssc(mode="sample", rounds=1).perturb(tiny_train, ctx).data
    stats = perturbation_stats(tiny_train.images, out.images)
    assert 0 < stats.linf <= 8, f"L-inf {stats.linf}/255 outside (0, 8]"
    diff = out.images.to(torch.int16) - tiny_train.images.to(torch.int16)
    same = tiny_train.labels == 0
    assert not torch.equal(diff[same][0], diff[same][1]), "sample mode gave two images the same perturbation"
