"""The engine's checks on a defense's output and an attack's model, certificates, and quantization."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from torch import nn

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import (Attack, Certificate, Check, Defense, Fitted, Protected, ThreatModel, certificate,
                               check_protected, perturbation_stats, quantize)
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


def _defense(returns):
    @dataclass(frozen=True)
    class Returns(Defense):
        def _perturb(self, train, ctx):
            return returns(train)

    Returns.name = "returns"
    return Returns()


def test_perturb_wraps_a_plain_image_set(clean, ctx):
    out = _defense(lambda train: train.with_images(train.images.clone())).perturb(clean, ctx)
    assert isinstance(out, Protected), f"perturb must return a Protected, got {type(out).__name__}"
    assert out.certificate is None, f"a plain ImageSet carries no certificate, got {out.certificate}"
    assert torch.equal(out.data.images, clean.images), "the wrapped images changed"
    cert = certificate(Check("x", 0.1, 0.2))
    kept = _defense(lambda train: Protected(train.with_images(train.images.clone()), cert)).perturb(clean, ctx)
    assert kept.certificate is cert, "perturb must pass a Certificate through unchanged"


def test_perturb_rejects_a_certificate_of_the_wrong_type(clean, ctx):
    bad = _defense(lambda train: Protected(train, {"surrogate_error": 0.0}))
    with pytest.raises(UEBenchError, match="defense 'returns': the certificate must be a Certificate, got dict"):
        bad.perturb(clean, ctx)
    with pytest.raises(UEBenchError, match="must return an ImageSet, got Tensor"):
        _defense(lambda train: Protected(train.images, None)).perturb(clean, ctx)


def test_fit_accepts_fitted_or_module_and_rejects_the_rest(clean, ctx):
    def attack(returns):
        @dataclass(frozen=True)
        class Returns(Attack):
            def _fit(self, train, backbone, ctx):
                return returns()

        Returns.name = "returns"
        return Returns()

    model = nn.Linear(2, 2).train()
    fitted = attack(lambda: Fitted(model, train_accuracy=50.0, epochs=3, trainable_parameters=6)).fit(clean, "b", ctx)
    assert fitted.model is model and not model.training, "fit must return the Fitted's model in eval mode"
    assert (fitted.train_accuracy, fitted.epochs, fitted.trainable_parameters) == (50.0, 3, 6), \
        f"fit changed the report: {fitted}"
    bare = attack(lambda: nn.Linear(2, 2)).fit(clean, "b", ctx)
    assert isinstance(bare, Fitted) and bare.train_accuracy is None, f"a bare module must be wrapped: {bare}"
    for wrong, shown in ((lambda: {"model": model}, "dict"), (lambda: Fitted("not a model"), "Fitted")):
        with pytest.raises(UEBenchError, match=f"attack 'returns': fit must return a Fitted or an nn.Module, "
                                               f"got {shown}"):
            attack(wrong).fit(clean, "b", ctx)


def test_certificate_verdicts_and_round_trip():
    ok, bad = Check("surrogate_error", 0.004, 0.01, "<="), Check("shortcut_accuracy", 0.5, 0.9, ">=")
    assert ok.passed and not bad.passed, f"verdicts wrong: {ok.describe()}, {bad.describe()}"
    assert not Check("x", float("nan"), 1.0).passed, "a NaN measurement must fail its check"
    cert = certificate(ok, bad, rounds=3)
    assert not cert.passed and certificate(ok).passed, "a certificate passes only when every check does"
    assert cert.compact() == "surrogate_error=0.004<=0.01; shortcut_accuracy=0.5>=0.9", f"compact: {cert.compact()}"
    assert Certificate.from_dict(cert.to_dict()) == cert, "to_dict / from_dict must round-trip"
    stored = {"checks": [{"name": "e", "value": None, "threshold": 0.1, "op": "<="}], "info": {"r": None}}
    assert not Certificate.from_dict(stored).passed, "a null (NaN in JSON) measurement must read back as failed"
    with pytest.raises(UEBenchError, match="op='<' must be one of"):
        Check("x", 1.0, 1.0, "<")


def test_threat_model_names_are_checked():
    """A misspelt norm would skip the engine's budget check: the threat model refuses it, listing the valid ones."""
    with pytest.raises(UEBenchError, match=r"norm='Linf' must be one of \('linf', 'l2', 'l0', 'none'\)"):
        ThreatModel("Linf", 8 / 255, "sample")
    with pytest.raises(UEBenchError, match="granularity='image' must be one of"):
        ThreatModel("linf", 8 / 255, "image")


@pytest.mark.parametrize("mode", ["sample", "class"])
def test_random_noise(mode, tiny_train, ctx):
    result = RandomNoise(mode=mode).perturb(tiny_train, ctx)
    out = result.data
    assert (result.certificate is None) == (mode == "sample"), \
        f"random_noise(mode={mode}): certificate {result.certificate} (only class mode has a shortcut to certify)"
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
