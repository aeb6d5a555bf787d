"""``shapes``: the embedded, procedural default data set (no files, deterministic from the seed).

Target task: 10 filled or outlined shapes (circle, square, triangle, star, plus, ellipse, arrow,
crescent, hexagon, tee) at a random position, scale, rotation (within +-30 degrees) and colour, on a
smooth background (a 2x2 colour grid upsampled) with thin distractor strokes. There is no per-pixel
grain and no clutter at the 8-pixel scale, so an 8/255 class-wise pattern is not masked by the
background: the data set is meant as a fair miniature of CIFAR for UEs.

Source pool (for pretraining the zoo): procedural stroke glyphs with a label set disjoint from the
target shapes, on the same kind of background, so pretraining must transfer across tasks.

Images are drawn at twice the output size and box-downsampled, which anti-aliases the edges.
Every image depends only on (seed, split, index): a subset of a larger set is the same images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPE_CLASSES = (
    "circle", "square", "triangle", "star", "plus", "ellipse", "arrow", "crescent", "hexagon", "tee",
)
SPLIT_IDS = {"train": 1, "test": 2, "source": 3}
GLYPH_TABLE_SEED = 20260414  # fixed: the glyph classes are the same for every data seed


def _ngon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _ngon(5, 1.0), _ngon(5, 0.42, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _crescent() -> np.ndarray:
    a = np.linspace(math.radians(50), math.radians(310), 24)
    outer = np.stack([np.cos(a), np.sin(a)], axis=1)
    b = np.linspace(math.radians(300), math.radians(60), 24)
    inner = np.stack([0.45 + 0.75 * np.cos(b), 0.75 * np.sin(b)], axis=1)
    return np.concatenate([outer, inner])


SHAPE_POLYGONS: dict[str, np.ndarray] = {
    "circle": _ngon(40, 0.95),
    "square": np.array([[-0.75, -0.75], [0.75, -0.75], [0.75, 0.75], [-0.75, 0.75]]),
    "triangle": _ngon(3, 1.05) + np.array([0.0, 0.15]),
    "star": _star() * 1.05,
    "plus": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1],
                      [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]) * 0.9,
    "ellipse": _ngon(40, 1.0) * np.array([1.0, 0.5]),
    "arrow": np.array([[-1, -0.22], [0.2, -0.22], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.22], [-1, 0.22]]),
    "crescent": _crescent(),
    "hexagon": _ngon(6, 0.95, 0.0),
    "tee": np.array([[-0.9, -0.9], [0.9, -0.9], [0.9, -0.5], [0.2, -0.5], [0.2, 0.95], [-0.2, 0.95],
                     [-0.2, -0.5], [-0.9, -0.5]]),
}


def _glyph_table(num_classes: int) -> list[list[np.ndarray]]:
    """Each glyph class: 2-3 random strokes (polylines of 3-4 points) in the unit box."""
    rng = np.random.default_rng(GLYPH_TABLE_SEED)
    table = []
    for _ in range(num_classes):
        strokes = []
        for _ in range(rng.integers(2, 4)):
            start = rng.uniform(-0.9, 0.9, size=2)
            steps = rng.normal(0, 0.7, size=(rng.integers(2, 4), 2))
            strokes.append(np.clip(np.cumsum(np.vstack([start, steps]), axis=0), -1, 1))
        table.append(strokes)
    return table


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    grid = rng.integers(0, 256, size=(2, 2, 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    return img, grid.reshape(-1, 3).mean(axis=0)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    lum = float(background @ np.array([0.299, 0.587, 0.114]))
    lo, hi = (0, 100) if lum > 128 else (155, 256)
    colour = rng.integers(lo, hi, size=3)
    colour[rng.integers(0, 3)] = rng.integers(0, 256)  # one free channel keeps hues varied
    return tuple(int(c) for c in colour)


def _place(points: np.ndarray, rng: np.random.Generator, size: int, max_rot_deg: float,
           scale_range: tuple[float, float]) -> np.ndarray:
    theta = math.radians(rng.uniform(-max_rot_deg, max_rot_deg))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    scale = rng.uniform(*scale_range) * size
    margin = scale * 0.9
    centre = rng.uniform(margin, size - margin, size=2)
    return points @ rot.T * scale + centre


def _distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(rng.integers(0, 3)):
        p = rng.uniform(0, size, size=4)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=colour, width=max(1, size // 64))


def render_shape(label: int, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    size = 2 * image_size
    img, bg_mean = _background(rng, size)
    draw = ImageDraw.Draw(img)
    _distractors(draw, rng, size)
    pts = _place(SHAPE_POLYGONS[SHAPE_CLASSES[label]], rng, size, 30.0, (0.2, 0.34))
    colour = _contrasting_colour(rng, bg_mean)
    xy = [tuple(p) for p in pts]
    if rng.random() < 0.5:
        draw.polygon(xy, fill=colour)
    else:
        draw.line(xy + [xy[0]], fill=colour, width=int(rng.integers(3, 6)) * size // 64, joint="curve")
    return np.asarray(img.reduce(2))


def render_glyph(strokes: list[np.ndarray], rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
    size = 2 * image_size
    img, bg_mean = _background(rng, size)
    draw = ImageDraw.Draw(img)
    _distractors(draw, rng, size)
    colour = _contrasting_colour(rng, bg_mean)
    width = int(rng.integers(3, 6)) * size // 64
    theta_rng = np.random.default_rng(rng.integers(2**32))
    placed = _place(np.concatenate(strokes), theta_rng, size, 25.0, (0.26, 0.38))
    start = 0
    for stroke in strokes:
        seg = placed[start:start + len(stroke)]
        start += len(stroke)
        draw.line([tuple(p) for p in seg], fill=colour, width=width, joint="curve")
    return np.asarray(img.reduce(2))


def generate(split: str, n: int, seed: int, image_size: int = 32, num_glyph_classes: int = 24,
             ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """``n`` images of ``split`` ('train', 'test' or 'source'), labels balanced (index mod classes)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    if split == "source":
        table = _glyph_table(num_glyph_classes)
        classes = tuple(f"glyph{i:02d}" for i in range(num_glyph_classes))
    else:
        classes = SHAPE_CLASSES
    k = len(classes)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % k
    for i in range(n):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        if split == "source":
            images[i] = render_glyph(table[labels[i]], rng, image_size)
        else:
            images[i] = render_shape(int(labels[i]), rng, image_size)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), classes
