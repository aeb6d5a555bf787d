"""The engine's checks on a defense's output, and quantization."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Defense, ThreatModel, check_protected, perturbation_stats, quantize
from defenses.random_noise import RandomNoise


def _set(images: torch.Tensor, labels: torch.Tensor | None = None) -> ImageSet:
    labels = torch.arange(len(images)) % 2 if labels is None else labels
    return ImageSet(images, labels, ("a", "b"), "t")


@pytest.fixture
def clean() -> ImageSet:
    return _set(torch.full((4, 3, 8, 8), 100, dtype=torch.uint8))


def test_linf_budget_violation_message(clean):
    bad = clean.images.clone()
    bad[1, 0, 2, 2] += 9
    with pytest.raises(UEBenchError, match=r"defense 'x': linf budget check failed: allowed 8/255, measured 9/255"):
        check_protected("x", ThreatModel("linf", 8 / 255, "sample"), clean, clean.with_images(bad))
    ok = clean.images.clone()
    ok[1, 0, 2, 2] += 8
    check_protected("x", ThreatModel("linf", 8 / 255, "sample"), clean, clean.with_images(ok))


def test_l2_and_l0_budgets(clean):
    bad = clean.images.clone()
    bad[0, :, 0, 0] += 100  # L2 = sqrt(3) * 100/255 = 0.679
    with pytest.raises(UEBenchError, match="l2 budget check failed: allowed 0.5, measured 0.679"):
        check_protected("x", ThreatModel("l2", 0.5, "class"), clean, clean.with_images(bad))
    two = clean.images.clone()
    two[0, 0, 0, 0] += 1
    two[0, 0, 5, 5] += 1
    with pytest.raises(UEBenchError, match="l0 budget check failed: allowed 1, measured 2"):
        check_protected("x", ThreatModel("l0", 1, "class"), clean, clean.with_images(two))
    check_protected("x", ThreatModel("none", 0, "class"), clean, clean.with_images(bad))


def test_shape_label_and_type_checks(clean):
    tm = ThreatModel("linf", 8 / 255, "sample")
    with pytest.raises(UEBenchError, match="must return an ImageSet"):
        check_protected("x", tm, clean, clean.images)
    with pytest.raises(UEBenchError, match="shape check failed"):
        check_protected("x", tm, clean, _set(clean.images[:3]))
    with pytest.raises(UEBenchError, match="label check failed: allowed 0 changed labels, measured 4"):
        check_protected("x", tm, clean, _set(clean.images, 1 - clean.labels))


def test_perturb_runs_the_checks(clean, ctx):
    @dataclass(frozen=True)
    class TooLoud(Defense):
        eps: float = 8 / 255
        norm = "linf"

        def _perturb(self, train, ctx):
            return train.with_images(train.images // 2)

    TooLoud.name = "too_loud"
    with pytest.raises(UEBenchError, match="defense 'too_loud': linf budget check failed"):
        TooLoud().perturb(clean, ctx)


def test_quantize_never_enlarges():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (16, 3, 8, 8), generator=gen, dtype=torch.uint8)
    eps = 8 / 255
    delta = (torch.rand(clean.shape, generator=gen) * 2 - 1) * eps
    out = quantize(clean, clean.float() / 255 + delta)
    stats = perturbation_stats(clean, out)
    assert stats.linf <= 8, f"quantized L-inf {stats.linf}/255 exceeds 8/255"
    diff = (out.float() - clean.float()) / 255
    assert (diff.abs() <= delta.abs() + 1e-6).all(), "quantization enlarged a pixel's change"
    with pytest.raises(UEBenchError, match="NaN"):
        quantize(clean, torch.full(clean.shape, float("nan")))


@pytest.mark.parametrize("mode", ["sample", "class"])
def test_random_noise(mode, tiny_train, ctx):
    out = RandomNoise(mode=mode).perturb(tiny_train, ctx)
    stats = perturbation_stats(tiny_train.images, out.images)
    assert 6 <= stats.linf <= 8, f"random noise L-inf {stats.linf}/255 should be near 8/255"
    delta = out.images.float() - tiny_train.images.float()
    same_class = delta[tiny_train.labels == 0]
    interior = (tiny_train.images[tiny_train.labels == 0] > 8) & (tiny_train.images[tiny_train.labels == 0] < 247)
    agree = (same_class[0] == same_class[1])[interior[0] & interior[1]].float().mean()
    if mode == "class":
        assert agree > 0.95, f"class-wise noise differs within a class ({agree:.2f} agreement)"
    else:
        assert agree < 0.5, f"sample-wise noise is shared between images ({agree:.2f} agreement)"
