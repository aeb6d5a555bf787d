"""``ar``: autoregressive perturbations, one random 3x3 AR process per class.

Sandoval-Segura, Singla, Geiping, Goldblum, Goldstein, Jacobs, "Autoregressive Perturbations for
Data Poisoning", NeurIPS 2022 (arXiv 2206.03693); reference code psandovalsegura/autoregressive-poisoning
(``autoregressive.py``, ``autoregressive_param_finder.py``, ``create_ar_poisons_3channel.py``).

Each class gets an AR process: per channel, 8 random-normal coefficients on the causal 3x3
neighbourhood, normalized to sum to 1. As the reference's parameter finder does, a process is kept
only if it is stable (``trials`` signals from random starts stay finite with an unscaled L-inf norm
<= ``norm_bound``; the finder's help text says L-inf, and the published CIFAR-10 processes meet it)
and distinct (the matching filters of the processes already kept respond to its unit-L2 signal with
at least ``min_response``, the finder's default). Each image gets its own signal: a random-normal
start of size (H + crop) x (W + crop), every pixel after the first two rows and columns replaced by
the AR prediction from its neighbours, the first ``crop`` rows and columns dropped, the rest scaled
to L2 ``eps`` (1.0 for 32x32 RGB, as ISS and APBench evaluate AR). Zero, NaN or infinite signals
(the reference release can divide by a zero norm) are drawn again, never published.
Certificate: ``benchmark.certify.shortcut_check`` on the released bytes (the perturbation alone must
be a learnable shortcut: held-out accuracy of a small CNN trained on it at least 90 %).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError
from benchmark.certify import shortcut_check
from benchmark.plugins import Context, Defense, Protected, certificate
from benchmark.registry import DEFENSES
from defenses._common import l2_norms, normalize_l2, publish, round_l2

log = logging.getLogger(__name__)


def sample_coefficients(count: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    """Random AR coefficients (count x C x 3 x 3): normal, the current pixel's tap 0, each channel's taps sum to 1."""
    b = torch.randn((count, channels, 3, 3), generator=gen)
    b[:, :, 2, 2] = 0
    return b / b.sum(dim=(2, 3), keepdim=True)


def ar_signal(coefficients: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Run the AR recursion over ``start`` (N x C x H x W, one process per image): every pixel from row 2
    and column 2 on becomes sum(coefficients * its 3x3 causal window), in raster order."""
    n, c, h, w = start.shape
    sig = start.permute(2, 3, 0, 1).reshape(h, w, n * c).clone()  # pixel-major: each step reads contiguous rows
    coef = coefficients.permute(2, 3, 0, 1).reshape(3, 3, n * c)
    for r in range(2, h):
        # the two rows above contribute to the whole row at once; the left neighbours sequentially
        row = sum(sig[r - 2 + a, b: b + w - 2] * coef[a, b] for a in range(2) for b in range(3))
        for j in range(2, w):
            row[j - 2] += sig[r, j - 2] * coef[2, 0] + sig[r, j - 1] * coef[2, 1]
            sig[r, j] = row[j - 2]
    return sig.reshape(h, w, n, c).permute(2, 3, 0, 1).contiguous()


def matching_filter(coefficients: torch.Tensor) -> torch.Tensor:
    """The filter that annihilates a process's own signal: its coefficients with -1 on the current pixel."""
    f = coefficients.clone()
    f[:, 2, 2] = -1
    return f.unsqueeze(0)


def response(filt: torch.Tensor, signal: torch.Tensor) -> float:
    return float(F.relu(F.conv2d(signal.unsqueeze(0), filt)).sum())


@DEFENSES.register("ar")
@dataclass(frozen=True)
class AutoregressivePerturbation(Defense):
    """Autoregressive perturbations (Sandoval-Segura et al., NeurIPS 2022)."""

    eps: float = 1.0            # L2 budget per image, [0, 1] pixel units
    crop: int = 4               # rows/columns dropped at the start of each signal (the random seed region)
    trials: int = 3             # signals per candidate process in the stability check
    norm_bound: float = 5.0     # stable: unscaled signal L-inf norm at most this
    min_response: float = 3.0   # distinct: lowest response of the other classes' matching filters
    max_candidates: int = 100_000  # give up after this many candidate processes

    title = "Autoregressive Perturbations"
    paper = "2206.03693"
    venue = "NeurIPS"
    year = 2022
    authors = "Sandoval-Segura, Singla, Geiping, Goldblum, Goldstein, Jacobs"
    norm = "l2"
    granularity = "class"

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise UEBenchError(f"ar: eps={self.eps!r} must be > 0")
        if self.crop < 2:
            raise UEBenchError(f"ar: crop={self.crop!r} must be >= 2 (the first two rows/columns are the random start)")
        if self.trials < 1 or self.max_candidates < 1:
            raise UEBenchError(f"ar: trials={self.trials!r} and max_candidates={self.max_candidates!r} must be >= 1")
        if not self.norm_bound > 0 or self.min_response < 0:
            raise UEBenchError(f"ar: norm_bound={self.norm_bound!r} must be > 0 and "
                               f"min_response={self.min_response!r} >= 0")

    def signals(self, coefficients: torch.Tensor, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        """One unscaled AR signal per row of ``coefficients``, cropped to ``size``."""
        n, c = coefficients.shape[:2]
        start = torch.randn((n, c, size[0] + self.crop, size[1] + self.crop), generator=gen)
        return ar_signal(coefficients, start)[:, :, self.crop:, self.crop:]

    def find_processes(self, count: int, channels: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        """``count`` stable, mutually distinct processes (count x C x 3 x 3).

        The recursion is causal, so the top-left block of a signal depends only on the same block
        of its start: candidates whose small block already exceeds the bound are dropped before the
        full-size signals are computed (same result, a fraction of the work).
        """
        kept: list[torch.Tensor] = []
        tried = 0
        full = (size[0] + self.crop, size[1] + self.crop)
        block = (min(full[0], self.crop + 12), min(full[1], self.crop + 12))
        while len(kept) < count:
            if tried >= self.max_candidates:
                raise UEBenchError(f"ar: found only {len(kept)} of {count} stable, distinct AR processes in "
                                   f"{self.max_candidates} candidates; raise max_candidates or lower min_response")
            batch = min(1024, self.max_candidates - tried)
            tried += batch
            cand = sample_coefficients(batch, channels, gen)
            coef = cand.repeat_interleave(self.trials, 0)
            start = torch.randn((batch * self.trials, channels, *full), generator=gen)
            small = ar_signal(coef, start[:, :, : block[0], : block[1]])[:, :, self.crop:, self.crop:]
            ok = self.stable(small.flatten(1).abs().amax(dim=1).view(batch, self.trials))
            if not bool(ok.any()):
                continue
            rows = ok.repeat_interleave(self.trials)
            sig = ar_signal(coef[rows], start[rows])[:, :, self.crop:, self.crop:]
            stable = self.stable(sig.flatten(1).abs().amax(dim=1).view(-1, self.trials))
            for i, index in enumerate(torch.nonzero(ok).flatten().tolist()):
                if not bool(stable[i]):
                    continue
                last = sig[i * self.trials + self.trials - 1]
                last = last / l2_norms(last[None])[0]
                if kept and min(response(matching_filter(b), last) for b in kept) < self.min_response:
                    continue
                kept.append(cand[index])
                if len(kept) == count:
                    break
        log.debug("ar: %d processes from %d candidates", count, tried)
        return torch.stack(kept)

    def stable(self, peaks: torch.Tensor) -> torch.Tensor:
        """Candidates (rows) whose every trial's unscaled L-inf norm is finite, nonzero and within the bound."""
        return (torch.isfinite(peaks) & (peaks > 0) & (peaks <= self.norm_bound)).all(dim=1)

    def zoo_sources(self) -> frozenset[str]:
        return frozenset()  # no pretrained weights

    def _perturb(self, train: ImageSet, ctx: Context) -> Protected:
        gen = ctx.generator()
        c, h, w = train.image_shape
        processes = self.find_processes(train.num_classes, c, (h, w), gen)
        coefficients = processes[train.labels]
        sig = self.signals(coefficients, (h, w), gen)
        for _ in range(10):
            norms = l2_norms(sig)
            bad = ~torch.isfinite(norms) | (norms <= 0)
            if not bool(bad.any()):
                break
            sig[bad] = self.signals(coefficients[bad], (h, w), gen)
        else:
            raise UEBenchError("ar: some AR signals stay zero, NaN or infinite after 10 redraws")
        out = publish(train, round_l2(normalize_l2(sig, self.eps), self.eps), "ar")
        return Protected(out, certificate(shortcut_check(train, out, ctx)))
