"""Layouts and pixels of `digit_scenes`: where each digit goes, and the cluttered canvas under it.

A *layout* is the symbolic scene: per digit its class, colour, size class, source handwriting
(an index into scikit-learn's 1797 bundled 8x8 digits) and pixel box. `sample_layout` draws one
from a `numpy.random.Generator`, keeping every pair of digit boxes below an overlap limit so each
digit stays legible. `render` paints it: a two-colour gradient with blotches, thin distractor
strokes that are not digits, then the digits (upscaled bicubically, used as an alpha mask over a
jittered named colour) in a random paint order, then pixel noise. Everything is a pure function of
the generator's state, so a scene is reproducible from its seed.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

# Eight named ink colours, bright and saturated so they stand out on the (darker) backgrounds.
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (70, 120, 255),
    "yellow": (250, 230, 40),
    "purple": (175, 70, 235),
    "orange": (255, 150, 20),
    "cyan": (30, 225, 230),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = ("small", "large")
BACKGROUND_MAX = 100  # Background gradient colours are drawn per channel from [0, BACKGROUND_MAX].


@dataclasses.dataclass(frozen=True)
class Layout:
    """One scene's digits, in storage order (left to right by box centre)."""

    digits: np.ndarray  # int [n], 0..9
    colours: np.ndarray  # int [n], index into COLOUR_NAMES
    sizes: np.ndarray  # int [n], index into SIZE_NAMES
    sources: np.ndarray  # int [n], index into sklearn's load_digits() images
    boxes: np.ndarray  # int [n, 4] pixel (x1, y1, x2, y2), x2/y2 exclusive
    paint_order: np.ndarray  # int [n], storage indices in the order they are painted

    def __len__(self) -> int:
        return len(self.digits)

    def centres(self, image_size: int) -> np.ndarray:
        """[n, 2] box centres (x, y) as fractions of the canvas."""
        b = self.boxes.astype(np.float64)
        return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], -1) / image_size


def overlap_fraction(a, b) -> float:
    """Intersection area over the smaller box's area (boxes as x1, y1, x2, y2)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a [n, 4] and b [m, 4] -> [n, m]."""
    a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def _place(rng, sides, image_size: int, max_overlap: float):
    """Top-left corners for squares of `sides`, pairwise overlap <= max_overlap."""
    for _ in range(20):
        boxes = []
        for s in sides:
            for _ in range(100):
                x, y = rng.integers(0, image_size - s + 1, size=2)
                box = (int(x), int(y), int(x) + s, int(y) + s)
                if all(overlap_fraction(box, o) <= max_overlap for o in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sides):
            return boxes
    # Fallback that always fits (the config check guarantees it): one digit per grid cell.
    cells = math.ceil(math.sqrt(len(sides)))
    cell = image_size // cells
    boxes = []
    for s, c in zip(sides, rng.permutation(cells * cells)):
        x0, y0 = (c % cells) * cell, (c // cells) * cell
        x, y = x0 + rng.integers(0, cell - s + 1), y0 + rng.integers(0, cell - s + 1)
        boxes.append((int(x), int(y), int(x) + s, int(y) + s))
    return boxes


def sample_layout(rng: np.random.Generator, *, pool: dict[int, np.ndarray], num_digits: int,
                  image_size: int, digit_sides: tuple[int, int], max_overlap: float,
                  heldout: frozenset[tuple[int, int]], want_heldout: bool) -> Layout:
    """A random scene of `num_digits` digits.

    `pool[d]` lists the source images of class d this split may use. Colour-digit pairs in
    `heldout` (pairs of (digit, colour index)) never appear unless `want_heldout`, in which case
    one random digit of the scene is such a pair (the others are unrestricted).
    """
    digits = rng.integers(0, 10, size=num_digits)
    colours = rng.integers(0, len(COLOUR_NAMES), size=num_digits)
    heldout_slot = int(rng.integers(num_digits)) if want_heldout else -1
    pairs = sorted(heldout)
    for i in range(num_digits):
        if i == heldout_slot:
            digits[i], colours[i] = pairs[int(rng.integers(len(pairs)))]
        elif not want_heldout:
            while (int(digits[i]), int(colours[i])) in heldout:
                colours[i] = rng.integers(0, len(COLOUR_NAMES))
    sizes = rng.integers(0, 2, size=num_digits)
    sources = np.array([rng.choice(pool[int(d)]) for d in digits], np.int64)
    sides = [digit_sides[s] for s in sizes]
    boxes = np.array(_place(rng, sides, image_size, max_overlap), np.int64)
    paint = rng.permutation(num_digits)
    order = np.lexsort((boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]))  # left to right
    rank = np.argsort(order)
    return Layout(digits=digits[order], colours=colours[order], sizes=sizes[order],
                  sources=sources[order], boxes=boxes[order], paint_order=rank[paint])


class GlyphBank:
    """Upscaled alpha masks of the source digits, cached per (source, side)."""

    def __init__(self, images: np.ndarray):
        self.images = np.asarray(images, np.float32)  # [N, 8, 8], values 0..16
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def alpha(self, source: int, side: int) -> np.ndarray:
        key = (int(source), int(side))
        if key not in self._cache:
            from PIL import Image  # pylint: disable=import-outside-toplevel

            big = Image.fromarray(self.images[key[0]], mode="F").resize(
                (side, side), Image.Resampling.BICUBIC)
            # Values above 12/16 count as full ink: the thin upscaled strokes stay solid.
            self._cache[key] = np.clip(np.asarray(big) / 12.0, 0.0, 1.0)
        return self._cache[key]


@functools.lru_cache(maxsize=8)
def _grid(size: int):
    """Pixel coordinates in [0, 1] and a 4 -> size bilinear upsampling matrix."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    pos = np.clip((np.arange(size) + 0.5) * 4 / size - 0.5, 0, 3)
    lo = np.minimum(np.floor(pos).astype(int), 2)
    up = np.zeros((size, 4))
    up[np.arange(size), lo] = 1 - (pos - lo)
    up[np.arange(size), lo + 1] = pos - lo
    return xx, yy, up


def _background(rng, size: int) -> np.ndarray:
    """A two-colour gradient in a random direction plus low-frequency blotches, float [S,S,3]."""
    xx, yy, up = _grid(size)
    c0, c1 = rng.uniform(0, BACKGROUND_MAX, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    blotches = (up @ rng.normal(0, 18, size=(3, 4, 4)) @ up.T).transpose(1, 2, 0)
    return c0 + (c1 - c0) * t[..., None] + blotches


def _strokes(rng, size: int, count: int):
    """Thin, semi-transparent open arcs and zigzags (not digits): colour [S,S,3], alpha [S,S,1]."""
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

    colour, alpha = Image.new("RGB", (size, size)), Image.new("L", (size, size), 0)
    draws = ImageDraw.Draw(colour), ImageDraw.Draw(alpha)
    for _ in range(count):
        width = int(rng.integers(1, 3))
        fills = (COLOURS[COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]],
                 int(255 * rng.uniform(0.35, 0.7)))
        if rng.random() < 0.5:
            r = rng.uniform(size / 8, size / 3)
            cx, cy = rng.uniform(0, size, size=2)
            start = rng.uniform(0, 360)
            end = start + rng.uniform(60, 200)
            for draw, fill in zip(draws, fills):
                draw.arc((cx - r, cy - r, cx + r, cy + r), start, end, fill, width)
        else:
            pts = [tuple(rng.uniform(0, size, size=2))]
            for _ in range(int(rng.integers(2, 5))):
                step = rng.uniform(size / 8, size / 3)
                a = rng.uniform(0, 2 * np.pi)
                pts.append((pts[-1][0] + step * np.cos(a), pts[-1][1] + step * np.sin(a)))
            for draw, fill in zip(draws, fills):
                draw.line(pts, fill, width)
    return np.asarray(colour, np.float64), np.asarray(alpha, np.float64)[..., None] / 255.0


INK_THRESHOLD = 0.5  # a pixel belongs to a digit in the segmentation where its ink covers at least half of it


def render(rng: np.random.Generator, layout: Layout, glyphs: GlyphBank, image_size: int,
           num_strokes: tuple[int, int] = (2, 5), noise: float = 6.0):
    """Paints `layout`: returns (uint8 image [S,S,3], occlusion [n], segmentation uint8 [S,S]).

    `occlusion[i]` is the fraction of digit i's ink covered by digits painted after it; `segmentation`
    holds i + 1 where digit i's ink (alpha >= INK_THRESHOLD) is the topmost, 0 elsewhere (background).
    """
    img = _background(rng, image_size)
    colour, alpha = _strokes(rng, image_size, int(rng.integers(num_strokes[0], num_strokes[1] + 1)))
    img += alpha * (colour - img)
    n = len(layout)
    inks = np.zeros((n, image_size, image_size), np.float32)
    for i in layout.paint_order:
        x1, y1, x2, y2 = layout.boxes[i]
        a = glyphs.alpha(layout.sources[i], x2 - x1)
        inks[i, y1:y2, x1:x2] = a
        colour = np.asarray(COLOURS[COLOUR_NAMES[layout.colours[i]]], np.float64)
        colour = np.clip(colour + rng.uniform(-15, 15, size=3), 0, 255)
        patch = img[y1:y2, x1:x2]
        patch += a[..., None] * (colour - patch)
    img = img + rng.normal(0, noise, size=img.shape)
    segmentation = np.zeros((image_size, image_size), np.uint8)
    for i in layout.paint_order:  # later digits paint over earlier ones
        segmentation[inks[i] >= INK_THRESHOLD] = i + 1
    occlusion = np.zeros(n, np.float32)
    rank = np.argsort(layout.paint_order)
    for i in range(n):
        later = [j for j in range(n) if rank[j] > rank[i]]
        if later:
            cover = inks[later].max(0)
            occlusion[i] = float((inks[i] * cover).sum() / max(inks[i].sum(), 1e-9))
    return np.clip(np.round(img), 0, 255).astype(np.uint8), occlusion, segmentation
