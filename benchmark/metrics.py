"""Perturbation quality: how large and how visible a defense's change to the images is.

All measures compare the published uint8 images with the clean ones:

| key | meaning |
|---|---|
| ``linf`` | largest change of any pixel value, in /255 units (max over images) |
| ``l2_mean`` | mean over images of the L2 norm of the change, pixel values in [0, 1] |
| ``l0_mean`` | mean over images of the pixel positions changed in any channel |
| ``psnr`` | mean over images of the peak signal-to-noise ratio, dB; an unchanged image counts as ``PSNR_CAP`` |
| ``ssim`` | mean over images of SSIM (Wang et al., IEEE TIP 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1, averaged over channels and valid window positions |
"""

from __future__ import annotations

import math

import torch

from benchmark.errors import UEBenchError
from benchmark.training import to_float

PSNR_CAP = 100.0  # dB given to an image identical to its clean version (its PSNR is infinite)


def psnr(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of float images in [0, 1] (N x C x H x W); identical images get ``PSNR_CAP``."""
    mse = (protected.float() - clean.float()).pow(2).flatten(1).mean(dim=1)
    out = torch.full_like(mse, PSNR_CAP)
    nonzero = mse > 0
    out[nonzero] = (-10 * torch.log10(mse[nonzero])).clamp(max=PSNR_CAP)
    return out


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalized 1-D Gaussian of ``size`` taps."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def band_matrix(taps: torch.Tensor, length: int) -> torch.Tensor:
    """The ``length x (length - len(taps) + 1)`` matrix whose product with a signal is its valid
    correlation with ``taps``: column j holds ``taps`` at rows j to j + len(taps) - 1."""
    out = torch.zeros(length, length - len(taps) + 1, dtype=taps.dtype)
    for j in range(out.shape[1]):
        out[j: j + len(taps), j] = taps
    return out


def ssim(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of float images (N x C x H x W) with a Gaussian window, valid positions only.

    Images smaller than the window use the largest odd window that fits.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise UEBenchError(f"ssim: need two N x C x H x W tensors of one shape, got {tuple(x.shape)} and "
                           f"{tuple(y.shape)}")
    n, c, h, w = x.shape
    size = min(window, h - (1 - h % 2), w - (1 - w % 2))
    # the Gaussian window is separable: a valid 2-D blur is one banded matrix product per axis (float64)
    g = gaussian_window(size, sigma)
    rows, cols = band_matrix(g, h), band_matrix(g, w)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return rows.T @ t @ cols

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(dim=1).float()


def perturbation_quality(clean: torch.Tensor, protected: torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    """Size and visibility of the change from ``clean`` to ``protected`` (uint8 N x C x H x W each)."""
    if clean.dtype != torch.uint8 or protected.dtype != torch.uint8:
        raise UEBenchError(f"perturbation_quality: needs uint8 images, got {clean.dtype} and {protected.dtype}")
    if clean.shape != protected.shape or clean.ndim != 4:
        raise UEBenchError(f"perturbation_quality: shapes differ or are not N x C x H x W: "
                           f"{tuple(clean.shape)} vs {tuple(protected.shape)}")
    n = clean.shape[0]
    if n == 0:
        return {"linf": 0.0, "l2_mean": 0.0, "l0_mean": 0.0, "psnr": PSNR_CAP, "ssim": 1.0}
    linf, l2, l0, ps, ss = 0, [], [], [], []
    for i in range(0, n, batch_size):
        a, b = clean[i: i + batch_size], protected[i: i + batch_size]
        diff = b.to(torch.int16) - a.to(torch.int16)
        linf = max(linf, int(diff.abs().max()))
        l2.append((diff.float() / 255).flatten(1).norm(dim=1))
        l0.append((diff != 0).any(dim=1).flatten(1).sum(dim=1).float())
        fa, fb = to_float(a), to_float(b)
        ps.append(psnr(fa, fb))
        ss.append(ssim(fa, fb))
    out = {"linf": float(linf), "l2_mean": float(torch.cat(l2).mean()), "l0_mean": float(torch.cat(l0).mean()),
           "psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean())}
    if not all(math.isfinite(v) for v in out.values()):
        raise UEBenchError(f"perturbation_quality: non-finite result {out}")
    return out
