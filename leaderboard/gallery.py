"""Perturbation gallery: per defense, a row of (clean, protected, amplified difference) triples.

``save_gallery(clean, {"lsp": protected, ...}, "gallery.png")`` picks the first image of each class
(up to ``n``; more from the start of the set if there are fewer classes than ``n``), and draws every
defense's version of the same images. The difference is amplified per row so that its largest
change spans the colour range (mid-grey = no change); the factor is printed beside the row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmark.data import ImageSet
from benchmark.errors import UEBenchError


def pick_images(labels: torch.Tensor, n: int) -> list[int]:
    """The first image of each class in class order, topped up with the first other images, ``n`` in all."""
    picks = [int(torch.nonzero(labels == c)[0]) for c in torch.unique(labels).tolist()][:n]
    for i in range(len(labels)):
        if len(picks) >= n:
            break
        if i not in picks:
            picks.append(i)
    return picks


def _hwc(images: torch.Tensor) -> np.ndarray:
    """uint8 N x C x H x W -> float N x H x W x 3 in [0, 1] (grey images repeated to RGB)."""
    x = images.float().div(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def save_gallery(clean: ImageSet, protected: dict[str, ImageSet], path: str | Path, n: int = 8) -> Path:
    """Write one PNG: a row per defense of ``n`` (clean, protected, amplified difference) triples."""
    if not protected:
        raise UEBenchError("save_gallery: no protected sets to show")
    if n < 1:
        raise UEBenchError(f"save_gallery: n={n!r} must be >= 1")
    for name, prot in protected.items():
        if prot.images.shape != clean.images.shape or not torch.equal(prot.labels, clean.labels):
            raise UEBenchError(f"save_gallery: protected set {name!r} does not match the clean set "
                               f"({tuple(prot.images.shape)} vs {tuple(clean.images.shape)}, or labels differ)")
    picks = pick_images(clean.labels, min(n, len(clean)))
    k = len(picks)
    base = _hwc(clean.images[picks])
    fig = Figure(figsize=(0.75 * 3 * k + 1.6, 0.85 * len(protected) + 0.7))
    axes = fig.subplots(len(protected), 3 * k, squeeze=False)
    for row, (name, prot) in enumerate(protected.items()):
        shown = _hwc(prot.images[picks])
        diff = shown - base
        peak = float(np.abs(diff).max())
        gain = 0.5 / peak if peak > 0 else 1.0
        for j in range(k):
            for col, img in enumerate((base[j], shown[j], (0.5 + diff[j] * gain).clip(0, 1))):
                ax = axes[row, 3 * j + col]
                ax.imshow(img, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(("clean", "protected", "diff")[col], fontsize=6)
        axes[row, 0].set_ylabel(f"{name}\nx{gain:.0f}" if peak > 0 else f"{name}\n(unchanged)", rotation=0,
                                ha="right", va="center", fontsize=7)
    fig.suptitle(f"{clean.name}: clean / protected / difference (amplified per row)", fontsize=9)
    fig.tight_layout()
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
