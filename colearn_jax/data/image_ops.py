"""Image preprocessing in numpy/PIL: CLIP's eval transform (bicubic short-side resize, centre
crop, mean/std normalisation) and a light random translation for training.

`normalize` works on one image or a stacked batch (the input pipeline applies it once per batch);
`device_normalize` is the same arithmetic in jax.numpy, for pipelines that ship uint8 images to the
device (`config.data.normalize_on_device`): 4x fewer host-to-device bytes, identical model inputs.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_hwc(image) -> np.ndarray:
    """uint8 [H, W] / [H, W, C] with C in 1, 3, 4 -> uint8 [H, W, C]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"Expected a uint8 image, got dtype {image.dtype}.")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected an HW, HW1, HW3 or HW4 image, got shape {image.shape}.")
    return image


def to_rgb_uint8(image) -> np.ndarray:
    """uint8 [H, W] / [H, W, 1] / [H, W, 3] / [H, W, 4] -> uint8 [H, W, 3] (alpha dropped)."""
    image = _as_hwc(image)
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def resize_short_side_center_crop(image, size: int) -> np.ndarray:
    """Bicubic resize so the short side is `size`, then a centre `size x size` crop (uint8 HWC).

    Matches torchvision's `Resize(size, BICUBIC)` + `CenterCrop(size)` on PIL images, the
    transform CLIP and open_clip use at evaluation.
    """
    image = _as_hwc(image)
    h, w = image.shape[:2]
    if h == size and w == size:
        return to_rgb_uint8(image)
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) != (h, w):
        # Resize in the source mode (PIL resizes RGBA with premultiplied alpha), then go to RGB.
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        image = _as_hwc(np.asarray(pil.resize((new_w, new_h), Image.Resampling.BICUBIC)))
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return to_rgb_uint8(image[top : top + size, left : left + size])


def resize_label_map_like_image(label_map, size: int) -> np.ndarray:
    """A per-pixel label map [H, W, C] (segmentation, mask) put through `resize_short_side_center_crop`'s
    geometry with nearest-neighbour sampling, so its pixels stay aligned with the image's; dtype kept."""
    label_map = np.asarray(label_map)
    h, w = label_map.shape[:2]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    rows = np.minimum(((np.arange(top, top + size) + 0.5) * h / new_h).astype(int), h - 1)
    cols = np.minimum(((np.arange(left, left + size) + 0.5) * w / new_w).astype(int), w - 1)
    return label_map[rows[:, None], cols[None, :]]


def _normalize_arithmetic(image) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    return (x - mean) / std


# normalize() of every uint8 value in each channel: [3, 256] float32, the same arithmetic.
_LUT = np.ascontiguousarray(_normalize_arithmetic(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)).T)


def normalize(image) -> np.ndarray:
    """uint8 [..., 3] (one HWC image or a batch) -> float32 `(x / 255 - CLIP_MEAN) / CLIP_STD`.

    uint8 RGB input is looked up per channel in a 256-entry table of that same float32 arithmetic
    (about 2x faster on a batch, bit-identical); other input is computed directly.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim == 0 or image.shape[-1] != 3:
        return _normalize_arithmetic(image)
    out = np.empty(image.shape, np.float32)
    for c in range(3):
        out[..., c] = _LUT[c][image[..., c]]
    return out


def device_normalize(images):
    """`normalize` on the device: uint8 [..., 3] jax/numpy array -> float32 jax.Array, equal to
    `normalize` bit for bit.

    It gathers from the same [3, 256] float32 table that `normalize` uses rather than redoing the
    arithmetic, because XLA rewrites a division by a constant into a multiplication by its
    reciprocal, which differs in the last bit for some values.

    For `config.data.normalize_on_device=True` pipelines, whose batches carry uint8 images: a system
    calls it on `batch["image"]` inside its jitted forward, before the vision tower. Floating-point
    input is returned unchanged (already normalised on the host), so calling it is safe either way.
    Eval padding rows (mask False) then hold normalised zeros instead of zeros; they are masked out.
    """
    import jax.numpy as jnp  # noqa: PLC0415 - this module is numpy-only otherwise

    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if images.dtype != jnp.uint8 or images.ndim == 0 or images.shape[-1] != 3:
        raise TypeError("device_normalize expects uint8 [..., 3] RGB or already-normalised float images, got "
                        f"{images.dtype} {images.shape}.")
    table = jnp.asarray(_LUT)  # [channel, value]
    return table[jnp.arange(3), images.astype(jnp.int32)]


def clip_preprocess(image, size: int) -> np.ndarray:
    """CLIP eval preprocessing: uint8 image of any size -> float32 [size, size, 3]."""
    return normalize(resize_short_side_center_crop(image, size))


def random_translate(image: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Shifts an HWC image by up to `max_shift` pixels in each direction, filling with zeros."""
    if max_shift <= 0:
        return image
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    src = image[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out
