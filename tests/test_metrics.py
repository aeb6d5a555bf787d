"""Perturbation quality: L-inf / L2 / L0 / PSNR / SSIM on uint8 images."""

from __future__ import annotations

import math

import pytest
import torch

from benchmark.errors import UEBenchError
from benchmark.metrics import PSNR_CAP, gaussian_window, perturbation_quality, psnr, ssim


def _images(n: int = 6, seed: int = 0, size: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(30, 220, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def test_identical_images():
    x = _images()
    q = perturbation_quality(x, x.clone())
    assert q == {"linf": 0.0, "l2_mean": 0.0, "l0_mean": 0.0, "psnr": PSNR_CAP, "ssim": 1.0}, \
        f"identical images should give zero norms, capped PSNR and SSIM 1, got {q}"
    assert all(math.isfinite(v) for v in q.values()), f"non-finite quality values {q}"


def test_norms_on_a_known_change():
    x = _images()
    y = x.clone()
    y[0, :, 2, 3] += 10        # image 0: one position, all 3 channels, +10
    y[1, 0, 0, 0] -= 4         # image 1: one value, -4
    y[1, 2, 5, 5] += 1         # image 1: a second position
    q = perturbation_quality(x, y)
    assert q["linf"] == 10.0, f"linf should be 10 (/255 units), got {q['linf']}"
    l2 = [math.sqrt(3) * 10 / 255, math.sqrt(16 + 1) / 255] + [0.0] * 4
    assert q["l2_mean"] == pytest.approx(sum(l2) / 6, rel=1e-5), f"l2_mean {q['l2_mean']} != {sum(l2) / 6}"
    assert q["l0_mean"] == pytest.approx(3 / 6), f"l0_mean should count changed positions: {q['l0_mean']}"


def test_psnr_matches_the_formula():
    x = _images(2)
    y = x.clone()
    y[0] = (y[0].int() + 5).clamp(0, 255).to(torch.uint8)  # every value +5 (no clipping: values <= 219)
    p = psnr(x.float() / 255, y.float() / 255)
    expected = 10 * math.log10(1 / (5 / 255) ** 2)
    assert float(p[0]) == pytest.approx(expected, abs=1e-3), f"PSNR {float(p[0])} != {expected}"
    assert float(p[1]) == PSNR_CAP, "an unchanged image should get the PSNR cap"
    q = perturbation_quality(x, y)
    assert q["psnr"] == pytest.approx((expected + PSNR_CAP) / 2, abs=1e-3), "psnr is not the mean over images"


def test_ssim_of_constant_images_is_the_luminance_term():
    # sigma = 0 everywhere: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.4, 0.6
    x = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert float(ssim(x, y)[0]) == pytest.approx(expected, rel=1e-6), "SSIM of constant images is wrong"


def test_ssim_properties():
    x = _images(4, size=32).float() / 255
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    small = ssim(x, (x + 0.01 * noise).clamp(0, 1))
    large = ssim(x, (x + 0.1 * noise).clamp(0, 1))
    assert (small > large).all(), f"more noise must lower SSIM: {small} vs {large}"
    assert (small <= 1).all() and (large > -1).all(), "SSIM out of [-1, 1]"
    assert torch.allclose(ssim(x, x.clone()), torch.ones(4)), "SSIM(x, x) must be 1"
    g = gaussian_window()
    assert len(g) == 11 and float(g.sum()) == pytest.approx(1.0), "the window must be 11 taps summing to 1"
    tiny = ssim(x[:, :, :5, :6], x[:, :, :5, :6])
    assert torch.allclose(tiny, torch.ones(4)), "images smaller than the window must still work"


def test_ssim_matches_scipy_reference():
    ndimage = pytest.importorskip("scipy.ndimage")
    import numpy as np

    x = _images(1, size=32)[0].double().numpy() / 255
    y = np.clip(x + np.random.default_rng(0).normal(0, 0.05, x.shape), 0, 1)
    values = []
    for c in range(3):
        def f(img):
            return ndimage.gaussian_filter(img, 1.5, truncate=3.5)[5:-5, 5:-5]  # 11 taps, valid region
        mx, my = f(x[c]), f(y[c])
        sxx, syy, sxy = f(x[c] * x[c]) - mx**2, f(y[c] * y[c]) - my**2, f(x[c] * y[c]) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        values.append((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())
    ours = float(ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None])[0])
    assert ours == pytest.approx(float(np.mean(values)), abs=1e-6), \
        f"SSIM {ours} differs from scipy's {np.mean(values)}"


def test_bad_inputs_are_rejected():
    x = _images()
    with pytest.raises(UEBenchError, match="needs uint8"):
        perturbation_quality(x, x.float())
    with pytest.raises(UEBenchError, match="shapes differ"):
        perturbation_quality(x, x[:3])
