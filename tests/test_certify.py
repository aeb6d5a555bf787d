"""Certificates: the shortcut check (it passes on a shortcut and fails without one), and the
certificate of each defense (present, and failed by a configuration that destroys what it certifies).

Data: 200 shapes images of 16x16 (20 per class), generated once per module.
"""

from __future__ import annotations

import pytest
import torch

import defenses.em as em_module
from benchmark.certify import shortcut_check, split_indices
from benchmark.config import configure
from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.plugins import Certificate, Context, Protected, quantize
from benchmark.registry import DEFENSES
from benchmark.shapes import generate
from benchmark.training import error_rate
from defenses.em import ErrorMinimizing

# (default spec, a spec that destroys the shortcut, why it does)
SHORTCUT_DEFENSES = [
    ("random_noise:mode=class", "random_noise:mode=class,eps=0.5/255", "quantization truncates a change < 1/255 to 0"),
    ("lsp", "lsp:eps=0.001", "an L2 budget so small that every pixel's change rounds to 0"),
    ("ar", "ar:eps=0.001", "an L2 budget so small that every pixel's change rounds to 0"),
    ("cuda", "cuda:kernel_size=1", "one 1x1 filter (the identity) for every class: the change no longer "
                                   "depends on the class"),
]
PASS_ON_SMALL_DATA = {"random_noise:mode=class", "lsp", "ops"}  # AR and CUDA need thousands of images to pass


@pytest.fixture(scope="module")
def small() -> ImageSet:
    images, labels, classes = generate("train", 200, seed=0, image_size=16)
    return ImageSet(images, labels, classes, "shapes-16px")


def perturbed(clean: ImageSet, delta: torch.Tensor) -> ImageSet:
    return clean.with_images(quantize(clean.images, clean.images.float() / 255 + delta))


def test_shortcut_check_passes_on_a_class_wise_pattern(small):
    gen = torch.Generator().manual_seed(5)
    pattern = (torch.rand((small.num_classes, *small.image_shape), generator=gen) * 2 - 1) * 8 / 255
    check = shortcut_check(small, perturbed(small, pattern[small.labels]), Context())
    assert (check.name, check.op, check.threshold) == ("shortcut_accuracy", ">=", 0.9), f"wrong check: {check}"
    assert check.passed and check.value >= 0.9, f"a class-wise pattern is a shortcut, but {check.describe()}"


def test_shortcut_check_fails_without_a_shortcut(small):
    gen = torch.Generator().manual_seed(6)
    noise = (torch.rand(small.images.shape, generator=gen) * 2 - 1) * 8 / 255
    sample = shortcut_check(small, perturbed(small, noise), Context())
    assert not sample.passed and sample.value < 0.4, f"sample-wise noise is no shortcut, but {sample.describe()}"
    zero = shortcut_check(small, small.with_images(small.images.clone()), Context())
    assert not zero.passed and zero.value < 0.4, f"no perturbation is no shortcut, but {zero.describe()}"


def test_shortcut_check_is_seeded_and_checks_its_input(small):
    gen = torch.Generator().manual_seed(7)
    pattern = (torch.rand((small.num_classes, *small.image_shape), generator=gen) * 2 - 1) * 2 / 255
    out = perturbed(small, pattern[small.labels])
    first, again = shortcut_check(small, out, Context(seed=3)), shortcut_check(small, out, Context(seed=3))
    assert first == again, f"the same seed gave {first.value} and {again.value}"
    other = ImageSet(out.images, (small.labels + 1) % small.num_classes, small.classes, "relabelled")
    with pytest.raises(UEBenchError, match="does not match the clean set"):
        shortcut_check(small, other, Context())
    with pytest.raises(UEBenchError, match="max_images=1 must be >= 2"):
        shortcut_check(small, out, Context(), max_images=1)


def test_split_is_stratified_disjoint_and_capped():
    labels = torch.arange(1000) % 10
    fit, held = split_indices(labels, 500, torch.Generator().manual_seed(0))
    assert len(fit) + len(held) == 500, f"max_images=500, used {len(fit) + len(held)}"
    assert not set(fit.tolist()) & set(held.tolist()), "an image is both trained on and held out"
    counts = torch.bincount(labels[held], minlength=10)
    assert bool((counts > 0).all()), f"every class must be held out, counts {counts.tolist()}"
    assert 0.15 <= len(held) / 500 <= 0.25, f"held out {len(held)} of 500, expected about 20 %"


def certified(spec: str, data: ImageSet) -> Protected:
    out = configure(DEFENSES, spec).plugin.perturb(data, Context())
    assert isinstance(out.certificate, Certificate), f"{spec}: no certificate ({out.certificate!r})"
    names = [c.name for c in out.certificate.checks]
    assert names == ["shortcut_accuracy"], f"{spec}: the certificate must be the shortcut check, has {names}"
    return out


@pytest.mark.parametrize("spec, destroyed, why", SHORTCUT_DEFENSES, ids=[s for s, _, _ in SHORTCUT_DEFENSES])
def test_shortcut_defense_certificate_fails_when_the_shortcut_is_destroyed(spec, destroyed, why, small):
    value = certified(spec, small).certificate.checks[0].value
    broken = certified(destroyed, small).certificate
    assert not broken.passed, f"{destroyed} ({why}) must fail its certificate: {broken.describe()}"
    assert value >= broken.checks[0].value + 0.3, \
        f"{spec}: held-out accuracy {value:.2f} is not clearly above {broken.checks[0].value:.2f} of {destroyed}"
    if spec in PASS_ON_SMALL_DATA:
        assert value >= 0.9, f"{spec}: its shortcut must pass the check even on {len(small)} images, got {value:.2f}"


def test_ops_certificate_fails_when_the_pixels_go_to_the_wrong_classes(small):
    """OPS has no setting that removes its pixel (it always sets a full corner colour), so the failing case
    moves the released perturbations onto images of other classes: position and colour no longer tell the class."""
    out = certified("ops", small)
    assert out.certificate.passed, f"ops must pass on {len(small)} images: {out.certificate.describe()}"
    delta = out.data.images.float() - small.images.float()
    order = torch.randperm(len(small), generator=torch.Generator().manual_seed(0))
    shuffled = small.with_images((small.images.float() + delta[order]).clamp(0, 255).to(torch.uint8))
    check = shortcut_check(small, shuffled, Context())
    assert not check.passed, f"one-pixel changes unrelated to the class must fail: {check.describe()}"


def test_em_certificate_is_the_error_on_the_released_images(tiny_train, ctx, monkeypatch):
    surrogates = []
    real = em_module.surrogate_model

    def keep(*args, **kwargs):
        surrogates.append(real(*args, **kwargs))
        return surrogates[-1]

    monkeypatch.setattr(em_module, "surrogate_model", keep)
    em = ErrorMinimizing(surrogate_backbone="resnet_tiny", max_rounds=1, steps=1, step_size=0.1 / 255, train_steps=1,
                         batch_size=16)
    out = em.perturb(tiny_train, ctx)
    assert out.certificate is not None, "em must return a certificate"
    (check,) = out.certificate.checks
    assert (check.name, check.op, check.threshold) == ("surrogate_error", "<=", 0.01), f"wrong check: {check}"
    assert not out.certificate.passed, f"one round of a tiny step cannot reach 1 % error: {out.certificate.describe()}"
    assert dict(out.certificate.info) == {"rounds": 1.0}, f"info must report the rounds: {out.certificate.info}"
    again = error_rate(surrogates[0], out.data.images, tiny_train.labels, None, ctx.device)
    assert check.value == pytest.approx(again), \
        f"the certificate ({check.value}) must be the surrogate's error on the released bytes ({again})"


# (spec of a crippled surrogate-based generator, the check it must fail): one step of a tiny size
CRIPPLED = [
    ("tap:surrogate_backbone=resnet_tiny,surrogate_epochs=1,steps=1,step_size=0.1/255,restarts=1", "target_success"),
    ("rem:surrogate_backbone=resnet_tiny,train_steps=1,steps=1,step_size=0.1/255,adv_steps=1,eot=1", "robust_error"),
    ("ssc:surrogate_backbone=resnet_tiny,rounds=1,train_steps=1,pgd_steps=1,step_size=0.1/255", "surrogate_error"),
]


@pytest.mark.parametrize("spec, check_name", CRIPPLED)
def test_crippled_generator_fails_its_own_certificate(spec, check_name, tiny_train, ctx):
    out = configure(DEFENSES, spec).plugin.perturb(tiny_train, ctx)
    assert out.certificate is not None, f"{spec}: no certificate"
    checks = {c.name: c for c in out.certificate.checks}
    assert check_name in checks, f"{spec}: the certificate must check {check_name}, has {sorted(checks)}"
    assert not checks[check_name].passed, f"{spec}: one tiny step cannot reach the objective, yet {checks[check_name]}"
    assert not out.certificate.passed, f"{spec}: a failed check must fail the certificate"
