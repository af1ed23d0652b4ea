"""On-device image augmentations in JAX: SimCLR's pipeline (Chen et al. 2020, Sec. 3 and App. A).

Every op takes one float image [H, W, C] in [0, 1] and a PRNG key, so a batch is augmented with
`jax.vmap` over per-example keys (`colearn_jax.train.rng.per_example_keys`): row i draws the same
numbers whatever the mesh, and a resumed run draws the same numbers as an uninterrupted one. The
parameters follow the reference implementation (google-research/simclr, data_util.py):

* random resized crop: area fraction U(0.08, 1), aspect ratio log-uniform in (3/4, 4/3); candidates
  that do not fit are rejected (a fixed number of tries, vectorised; none fitting -> the whole image);
  the crop is resized back bicubically; optionally object-aware (Mishra et al. 2022): placed to contain
  a given object box;
* horizontal flip, p = 0.5;
* colour distortion at strength s, applied with p = 0.8: brightness (multiplicative, factor in
  [1 - 0.8s, 1 + 0.8s]), contrast (0.8s), saturation (0.8s), hue (shift up to 0.2s of a turn), in a
  random order, clipped to [0, 1] after each; then grayscale with p = 0.2;
* Gaussian blur, p = 0.5: sigma U(0.1, 2.0), kernel 2 * (side // 20) + 1 (about 10% of the side),
  separable, zero-padded ('SAME') like the reference.

Beyond the paper, for data with foreground masks: `background_swap` (Ryali, Schwab & Morcos 2021) puts
each image's foreground on another image's background, whose own foreground `erase` fills in first.
For handwriting: `random_affine`, a small rotation / scale / shear about the centre, optionally with an
elastic distortion (the affine and elastic distortions of Simard, Steinkraus & Platt 2003, Sec. 2), which
keeps an image's caption true.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

GRAY_WEIGHTS = jnp.array([0.2989, 0.5870, 0.1140])  # tf.image.rgb_to_grayscale
CROP_TRIES = 10


def grayscale(image: jax.Array) -> jax.Array:
    gray = image @ GRAY_WEIGHTS.astype(image.dtype)
    return jnp.repeat(gray[..., None], image.shape[-1], axis=-1)


# ----------------------------------------------------------------------------- colour
def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.max(rgb, axis=-1)
    c = v - jnp.min(rgb, axis=-1)
    s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
    safe_c = jnp.where(c > 0, c, 1.0)
    h = jnp.where(v == r, (g - b) / safe_c, jnp.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
    h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    k = lambda n: (n + h * 6.0) % 6.0  # noqa: E731
    f = lambda n: v - v * s * jnp.clip(jnp.minimum(k(n), 4.0 - k(n)), 0.0, 1.0)  # noqa: E731
    return jnp.stack([f(5.0), f(3.0), f(1.0)], axis=-1)


def adjust_brightness(image, factor):
    return image * factor


def adjust_contrast(image, factor):
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)
    return (image - mean) * factor + mean


def adjust_saturation(image, factor):
    hsv = rgb_to_hsv(image)
    return hsv_to_rgb(hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * factor, 0.0, 1.0)))


def adjust_hue(image, delta):
    hsv = rgb_to_hsv(image)
    return hsv_to_rgb(hsv.at[..., 0].set((hsv[..., 0] + delta) % 1.0))


def color_jitter(image, key, strength: float):
    """Brightness, contrast, saturation and hue at `strength`, in a random order, clipped after each."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    k_order, kb, kc, ks, kh = jax.random.split(key, 5)
    factors = (
        jax.random.uniform(kb, (), minval=max(1.0 - b, 0.0), maxval=1.0 + b),
        jax.random.uniform(kc, (), minval=1.0 - c, maxval=1.0 + c),
        jax.random.uniform(ks, (), minval=1.0 - s, maxval=1.0 + s),
        jax.random.uniform(kh, (), minval=-h, maxval=h),
    )
    ops = (
        lambda x: adjust_brightness(x, factors[0]),
        lambda x: adjust_contrast(x, factors[1]),
        lambda x: adjust_saturation(x, factors[2]),
        lambda x: adjust_hue(x, factors[3]),
    )
    order = jax.random.permutation(k_order, 4)

    def body(i, x):
        return jnp.clip(jax.lax.switch(order[i], ops, x), 0.0, 1.0)

    return jax.lax.fori_loop(0, 4, body, image)


def random_color_distortion(image, key, strength: float = 1.0, p_jitter: float = 0.8, p_gray: float = 0.2):
    k_apply, k_jitter, k_gray = jax.random.split(key, 3)
    image = jnp.where(jax.random.uniform(k_apply) < p_jitter, color_jitter(image, k_jitter, strength), image)
    return jnp.where(jax.random.uniform(k_gray) < p_gray, grayscale(image), image)


# ----------------------------------------------------------------------------- geometry
def crop_box(key, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries: int = CROP_TRIES, box=None):
    """(top, left, height, width) as fractions of the image side; the whole image if no try fits.

    `box` (x1, y1, x2, y2 fractions; optional): object-aware cropping (Mishra et al. 2022, "Object-aware
    Cropping for Self-Supervised Learning"): the crop's size is drawn as usual, then its position so that
    it contains the box (or, when smaller than the box, lies inside it) instead of anywhere."""
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (tries,), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_ratio, (tries,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    w, h = jnp.sqrt(area * jnp.exp(log_r)), jnp.sqrt(area / jnp.exp(log_r))
    fits = (w <= 1.0) & (h <= 1.0)
    first = jnp.argmax(fits)
    ok = fits[first]
    h, w = jnp.where(ok, h[first], 1.0), jnp.where(ok, w[first], 1.0)
    u_y, u_x = jax.random.uniform(k_y), jax.random.uniform(k_x)
    if box is None:
        return u_y * (1.0 - h), u_x * (1.0 - w), h, w
    box = jnp.asarray(box, jnp.float32)
    return _covering_offset(u_y, h, box[1], box[3]), _covering_offset(u_x, w, box[0], box[2]), h, w


def _covering_offset(u, size, start, end):
    """An offset in [0, 1 - size] for a crop of `size` that covers [start, end] (if size >= end - start) or
    lies within it (otherwise), at fraction u of the allowed range."""
    a = jnp.clip(end - size, 0.0, 1.0 - size)
    b = jnp.clip(start, 0.0, 1.0 - size)
    lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
    return lo + u * (hi - lo)


def crop_and_resize(image, top, left, height, width):
    """The box (fractions of the side) resized bicubically to the image's own size."""
    size_h, size_w = image.shape[0], image.shape[1]
    scale = jnp.array([1.0 / height, 1.0 / width])
    translation = -jnp.array([top * size_h, left * size_w]) * scale
    out = jax.image.scale_and_translate(image, image.shape, (0, 1), scale, translation, method="cubic",
                                        antialias=False)
    return jnp.clip(out, 0.0, 1.0)


def random_resized_crop(image, key, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), box=None):
    return crop_and_resize(image, *crop_box(key, scale, ratio, box=box))


def random_flip(image, key, p: float = 0.5):
    return jnp.where(jax.random.uniform(key) < p, image[:, ::-1], image)


# ----------------------------------------------------------------------------- blur
def blur_kernel_size(side: int) -> int:
    return 2 * (side // 20) + 1


def gaussian_blur(image, sigma, kernel_size: int):
    radius = kernel_size // 2
    x = jnp.arange(-radius, radius + 1, dtype=image.dtype)
    k = jnp.exp(-(x**2) / (2.0 * sigma**2))
    k = k / jnp.sum(k)
    c = image.shape[-1]
    lhs = image.transpose(2, 0, 1)[:, None]  # [C, 1, H, W]: one channel per "batch" row
    out = jax.lax.conv_general_dilated(lhs, k.reshape(1, 1, -1, 1), (1, 1), "SAME")
    out = jax.lax.conv_general_dilated(out, k.reshape(1, 1, 1, -1), (1, 1), "SAME")
    return out[:, 0].transpose(1, 2, 0).reshape(image.shape[0], image.shape[1], c)


def random_blur(image, key, p: float = 0.5, sigma=(0.1, 2.0)):
    k_apply, k_sigma = jax.random.split(key)
    s = jax.random.uniform(k_sigma, minval=sigma[0], maxval=sigma[1])
    blurred = jnp.clip(gaussian_blur(image, s, blur_kernel_size(image.shape[0])), 0.0, 1.0)
    return jnp.where(jax.random.uniform(k_apply) < p, blurred, image)


# ----------------------------------------------------------------------------- backgrounds
def erase(image, mask, radius: int = 4, grow: int = 2):
    """`image` [H, W, C] with the pixels where `mask` [H, W] (in [0, 1]) is set, grown by `grow` pixels (so
    anti-aliased edges go too), filled in from the unmasked pixels around them: a normalised box filter of
    side 2 * radius + 1 (normalised convolution; the unmasked mean where no unmasked pixel is that close)."""
    mask = mask.astype(image.dtype)
    if grow:
        mask = jax.lax.reduce_window(mask, -jnp.inf, jax.lax.max, (2 * grow + 1,) * 2, (1, 1), "SAME")
    keep = 1.0 - mask
    side = 2 * radius + 1
    window = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (side, side, 1), (1, 1, 1), "SAME")  # noqa: E731
    weight = window(keep[..., None])
    total = window(image * keep[..., None])
    fallback = jnp.sum(image * keep[..., None], axis=(0, 1)) / jnp.maximum(jnp.sum(keep), 1.0)
    filled = jnp.where(weight > 0, total / jnp.maximum(weight, 1e-6), fallback)
    return keep[..., None] * image + (1.0 - keep[..., None]) * filled


def background_swap(images, masks, shift, plates=None):
    """Each image's foreground (`masks` [N, H, W] in [0, 1]) composited onto the background of image
    (i + shift) mod N, whose own foreground is erased first (`erase`): background augmentation (Ryali,
    Schwab & Morcos 2021, "Characterizing and Improving the Robustness of Self-Supervised Learning through
    Background Augmentations", BG_Swaps/BG_Random), so two views share the object and not the scene.
    `plates`: the images with their foregrounds erased, when already computed (several swaps of one batch)."""
    m = masks.astype(images.dtype)[..., None]
    plates = jax.vmap(erase)(images, masks) if plates is None else plates
    return m * images + (1.0 - m) * jnp.roll(plates, -shift, axis=0)  # row i: plate (i + shift) mod N


def affine_warp(image, angle, scale, shear, displacement=None):
    """`image` [H, W, C] rotated by `angle` (radians, counter-clockwise as displayed), scaled by `scale` and
    sheared by `shear` (radians, along x) about its centre; bilinear, edge pixels repeated outside.
    `displacement` [2, H, W] (rows, columns; pixels) is added to every output pixel's source position
    (`elastic_displacement`), so an affine and an elastic distortion cost one resampling."""
    h, w = image.shape[:2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    forward = scale * jnp.stack([jnp.stack([cos, -sin]), jnp.stack([sin, cos])]) @ jnp.stack(
        [jnp.stack([jnp.ones_like(shear), jnp.tan(shear)]), jnp.stack([jnp.zeros_like(shear), jnp.ones_like(shear)])])
    inverse = jnp.linalg.inv(forward)  # (x, y) offsets from the centre, y pointing up
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=image.dtype), jnp.arange(w, dtype=image.dtype), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    src = jnp.einsum("ij,jhw->ihw", inverse, jnp.stack([xx - cx, cy - yy]))
    coords = jnp.stack([cy - src[1], src[0] + cx])
    if displacement is not None:
        coords = coords + displacement.astype(coords.dtype)
    return bilinear_sample(image, coords)


def bilinear_sample(image, coords):
    """`image` [H, W, C] read at fractional (row, column) positions `coords` [2, ...]: bilinear, positions
    outside clamped to the edge (`jax.scipy.ndimage.map_coordinates(order=1, mode="nearest")` per
    channel, with the corner indices and weights computed once and every channel gathered together)."""
    h, w = image.shape[:2]
    rows, cols = coords[0], coords[1]
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)

    def at(r, c):
        return image[jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)]

    top = (1 - fc) * at(r0, c0) + fc * at(r0, c0 + 1)
    bottom = (1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)
    return (1 - fr) * top + fr * bottom


def elastic_displacement(key, shape, alpha: float, sigma: float):
    """An elastic distortion's displacement field [2, H, W] for an image of `shape` (H, W): per pixel
    U(-1, 1) noise, smoothed by a Gaussian of `sigma` pixels, scaled to `alpha` pixels at its peak
    (Simard, Steinkraus & Platt 2003, Sec. 2: new handwriting from old; they scale the smoothed
    field by alpha itself, whose size then depends on sigma - normalising the peak keeps `alpha` in
    pixels whatever the smoothing)."""
    h, w = shape
    noise = jax.random.uniform(key, (h, w, 2), minval=-1.0, maxval=1.0)
    field = gaussian_blur(noise, sigma, 2 * int(math.ceil(2 * sigma)) + 1)
    field = field / (jnp.abs(field).max() + 1e-6)
    return alpha * field.transpose(2, 0, 1)


def random_affine(image, key, rotate: float = 10.0, scale=(0.9, 1.1), shear: float = 10.0,
                  elastic_alpha: float = 0.0, elastic_sigma: float = 4.0):
    """`affine_warp` with angle U(-rotate, rotate) degrees, scale U(*scale), shear U(-shear, shear) degrees;
    with `elastic_alpha` > 0 pixels, an elastic distortion too (`elastic_displacement`)."""
    k_angle, k_scale, k_shear = jax.random.split(key, 3)
    angle = jnp.deg2rad(jax.random.uniform(k_angle, (), minval=-rotate, maxval=rotate))
    factor = jax.random.uniform(k_scale, (), minval=scale[0], maxval=scale[1])
    skew = jnp.deg2rad(jax.random.uniform(k_shear, (), minval=-shear, maxval=shear))
    displacement = None
    if elastic_alpha:
        displacement = elastic_displacement(jax.random.fold_in(key, 1), image.shape[:2], elastic_alpha, elastic_sigma)
    return affine_warp(image, angle, factor, skew, displacement)


# ----------------------------------------------------------------------------- the pipeline
def simclr_augment(image, key, *, crop: bool = True, color: bool = True, strength: float = 1.0,
                   blur: bool = True, flip: bool = True, crop_scale=(0.08, 1.0), box=None):
    """One SimCLR view of `image`. The switches reproduce the paper's ablations (crop only, colour only);
    `crop_scale` is the crop's area range (the reference's (0.08, 1)); `box` makes the crop object-aware
    (`crop_box`)."""
    k_crop, k_flip, k_color, k_blur = jax.random.split(key, 4)
    if crop:
        image = random_resized_crop(image, k_crop, scale=tuple(crop_scale), box=box)
    if flip:
        image = random_flip(image, k_flip)
    if color:
        image = random_color_distortion(image, k_color, strength)
    if blur:
        image = random_blur(image, k_blur)
    return image
