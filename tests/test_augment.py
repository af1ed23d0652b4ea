"""SimCLR's on-device augmentations: shapes and ranges, identity at zero strength, determinism under a
key, and each op doing what it says (checked against independent computations)."""
import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colearn_jax.data import augment


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.uniform(0, 1, (20, 20, 3)).astype(np.float32))


def test_hsv_round_trip_matches_colorsys(image):
    hsv = np.asarray(augment.rgb_to_hsv(image))
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in np.asarray(image).reshape(-1, 3)]).reshape(hsv.shape)
    np.testing.assert_allclose(hsv, ref, atol=1e-5)
    np.testing.assert_allclose(augment.hsv_to_rgb(augment.rgb_to_hsv(image)), image, atol=1e-5)


def test_identity_at_zero_strength(image):
    key = jax.random.PRNGKey(1)
    np.testing.assert_allclose(augment.color_jitter(image, key, 0.0), image, atol=1e-5)
    np.testing.assert_allclose(augment.crop_and_resize(image, 0.0, 0.0, 1.0, 1.0), image, atol=1e-5)
    np.testing.assert_allclose(augment.random_resized_crop(image, key, scale=(1.0, 1.0), ratio=(1.0, 1.0)), image,
                               atol=1e-5)
    np.testing.assert_allclose(augment.random_flip(image, key, p=0.0), image)
    np.testing.assert_allclose(augment.random_blur(image, key, p=0.0), image)
    np.testing.assert_allclose(augment.random_color_distortion(image, key, p_jitter=0.0, p_gray=0.0), image)


def test_ops_do_what_they_say(image):
    np.testing.assert_allclose(augment.random_flip(image, jax.random.PRNGKey(0), p=1.0), image[:, ::-1])
    gray = augment.grayscale(image)
    np.testing.assert_allclose(gray[..., 0], np.asarray(image) @ np.array([0.2989, 0.587, 0.114]), atol=1e-6)
    np.testing.assert_allclose(augment.adjust_contrast(image, 0.0), np.broadcast_to(
        np.asarray(image).mean(axis=(0, 1)), image.shape), atol=1e-6)
    hue = augment.adjust_hue(image, 0.25)
    ref = np.array([colorsys.hsv_to_rgb((h + 0.25) % 1, s, v) for h, s, v in
                    (colorsys.rgb_to_hsv(*p) for p in np.asarray(image).reshape(-1, 3))]).reshape(image.shape)
    np.testing.assert_allclose(hue, ref, atol=1e-5)
    # the crop of the middle half of a linear ramp, resized to 20 px, is the ramp over that half
    # (bicubic reproduces linear functions; pixel centres at (i + 0.5))
    coords = (np.arange(20) + 0.5) / 20
    ramp = np.stack([*np.meshgrid(coords, coords, indexing="ij"), np.zeros((20, 20))], -1).astype(np.float32)
    crop = np.asarray(augment.crop_and_resize(jnp.asarray(ramp), 0.25, 0.25, 0.5, 0.5))
    expected = 0.25 + 0.5 * coords
    np.testing.assert_allclose(crop[2:-2, 2:-2, 0], np.broadcast_to(expected[2:-2, None], (16, 16)), atol=1e-5)
    np.testing.assert_allclose(crop[2:-2, 2:-2, 1], np.broadcast_to(expected[None, 2:-2], (16, 16)), atol=1e-5)
    # blur keeps the mean of a constant interior and removes high frequencies
    blurred = augment.gaussian_blur(image, 2.0, augment.blur_kernel_size(64))
    assert np.std(np.asarray(blurred)[4:-4, 4:-4]) < 0.5 * np.std(np.asarray(image))
    assert augment.blur_kernel_size(224) == 23 and augment.blur_kernel_size(32) == 3


def test_crop_boxes_respect_area_and_ratio():
    keys = jax.random.split(jax.random.PRNGKey(3), 512)
    top, left, h, w = jax.vmap(augment.crop_box)(keys)
    area, ratio = np.asarray(h * w), np.asarray(w / h)
    assert np.all((top >= 0) & (left >= 0) & (top + h <= 1 + 1e-6) & (left + w <= 1 + 1e-6))
    full = (np.asarray(h) == 1) & (np.asarray(w) == 1)
    assert full.mean() < 0.05  # the fallback is rare
    assert np.all(area[~full] >= 0.08 - 1e-6) and np.all((ratio[~full] > 0.74) & (ratio[~full] < 1.34))
    assert area[~full].min() < 0.2 and area[~full].max() > 0.8  # the whole range is used


def test_pipeline_shapes_ranges_and_determinism(image):
    keys = jax.random.split(jax.random.PRNGKey(7), 6)
    batch = jnp.stack([image] * 6)
    views = jax.jit(jax.vmap(augment.simclr_augment))(batch, keys)
    assert views.shape == batch.shape and views.dtype == jnp.float32
    assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0
    again = jax.jit(jax.vmap(augment.simclr_augment))(batch, keys)
    np.testing.assert_array_equal(views, again)
    assert not np.allclose(views[0], views[1])  # other keys, other views
    only_crop = jax.vmap(lambda x, k: augment.simclr_augment(x, k, color=False, blur=False, flip=False))(batch, keys)
    assert not np.allclose(only_crop[0], image, atol=1e-3)


def test_object_aware_crops_cover_the_box_or_lie_inside_it():
    """Mishra et al. 2022's object-aware crops: a crop larger than the box contains it, a smaller one lies
    inside it; both stay inside the image, and the crop's size is drawn as without a box."""
    box = jnp.array([0.55, 0.1, 0.8, 0.3])  # x1, y1, x2, y2: near the top, right of centre
    covered = inside = 0
    for i in range(200):
        key = jax.random.PRNGKey(i)
        top, left, h, w = (float(v) for v in augment.crop_box(key, scale=(0.005, 0.2), box=box))
        assert -1e-6 <= top and top + h <= 1 + 1e-6 and -1e-6 <= left and left + w <= 1 + 1e-6
        plain = [float(v) for v in augment.crop_box(key, scale=(0.005, 0.2))]
        np.testing.assert_allclose([h, w], plain[2:], rtol=1e-6)  # same size, other place
        for start, size, lo, hi in ((top, h, 0.1, 0.3), (left, w, 0.55, 0.8)):
            if size >= hi - lo:
                assert start <= lo + 1e-6 and start + size >= hi - 1e-6
                covered += 1
            else:
                assert start >= lo - 1e-6 and start + size <= hi + 1e-6
                inside += 1
    assert covered > 30 and inside > 30  # both cases were exercised


def test_erase_fills_the_mask_from_its_surroundings():
    """Masked pixels take the colours of the unmasked ones around them; the rest is unchanged."""
    ramp = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 32)[None, :, None], (32, 32, 3))
    image = ramp.at[10:16, 12:18].set(jnp.array([1.0, 0.0, 0.0]))  # a red square on a horizontal ramp
    mask = jnp.zeros((32, 32)).at[10:16, 12:18].set(1.0)
    out = augment.erase(image, mask, radius=4, grow=1)
    grown = np.zeros((32, 32), bool)
    grown[9:17, 11:19] = True
    np.testing.assert_allclose(np.asarray(out)[~grown], np.asarray(image)[~grown])
    filled = np.asarray(out)[grown]
    np.testing.assert_allclose(filled[:, 0], filled[:, 1], atol=1e-6)  # no red left: grey like the ramp
    np.testing.assert_allclose(filled, np.asarray(ramp)[grown], atol=0.1)  # about the ramp's values there
    lone = augment.erase(image, jnp.ones((32, 32)).at[0, 0].set(0.0), radius=1, grow=0)
    np.testing.assert_allclose(np.asarray(lone)[20, 20], np.asarray(image)[0, 0])  # nothing near: the kept mean


def test_background_swap_keeps_the_foreground_on_another_images_background():
    """Each image's foreground pixels stay; everywhere else shows image (i + shift) mod N with that image's
    own foreground erased (filled from its background, not left as a ghost)."""
    n, s = 4, 24
    backgrounds = jnp.linspace(0.1, 0.4, n)[:, None, None, None] * jnp.ones((n, s, s, 3))
    masks = jnp.zeros((n, s, s)).at[:, 8:14, 8:14].set(1.0)
    images = jnp.where(masks[..., None] > 0, 0.9, backgrounds)
    out = np.asarray(augment.background_swap(images, masks, 1))
    inside = np.asarray(masks, bool)
    for i in range(n):
        np.testing.assert_allclose(out[i][inside[i]], 0.9)
        np.testing.assert_allclose(out[i][~inside[i]], float(backgrounds[(i + 1) % n, 0, 0, 0]), atol=1e-5)


def test_affine_warp_is_exact_on_the_grid_and_random_affine_is_mild():
    """No warp = the image; a quarter turn = np.rot90 (counter-clockwise as displayed); a shear moves the
    top and bottom rows opposite ways; random_affine's default warps keep a centred blob near the centre."""
    img = jnp.asarray(np.random.default_rng(0).random((9, 9, 3)), jnp.float32)
    np.testing.assert_allclose(augment.affine_warp(img, 0.0, 1.0, 0.0), img, atol=1e-6)
    np.testing.assert_allclose(augment.affine_warp(img, jnp.pi / 2, 1.0, 0.0), np.rot90(img, 1, axes=(0, 1)),
                               atol=1e-5)
    np.testing.assert_allclose(augment.affine_warp(img, 0.0, 2.0, 0.0)[4, 4], img[4, 4], atol=1e-6)  # centre fixed
    line = jnp.zeros((9, 9, 1)).at[:, 4].set(1.0)  # a vertical line through the centre
    sheared = np.asarray(augment.affine_warp(line, 0.0, 1.0, jnp.deg2rad(45.0)))[..., 0]
    top, bottom = sheared[0].argmax(), sheared[-1].argmax()
    assert top != bottom and abs((top - 4) + (bottom - 4)) <= 1  # opposite directions, the centre row fixed

    blob = jnp.zeros((32, 32, 1)).at[12:20, 12:20].set(1.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    warped = np.asarray(jax.vmap(augment.random_affine)(jnp.stack([blob] * 16), keys))[..., 0]
    assert not np.allclose(warped[0], warped[1])  # each key its own warp
    ys, xs = np.mgrid[0:32, 0:32]
    for w in warped:
        cy, cx = (w * ys).sum() / w.sum(), (w * xs).sum() / w.sum()
        assert abs(cy - 15.5) < 0.5 and abs(cx - 15.5) < 0.5 and 0.7 < w.sum() / 64 < 1.3


def test_elastic_distortion_moves_each_pixel_by_its_smooth_displacement():
    """An image whose channels are its own row and column coordinates, warped by a displacement field
    alone, returns coordinates + field (bilinear sampling is exact on linear images): the field is what
    moves the pixels. It peaks at alpha pixels, is smooth (neighbours differ by under alpha / 2; raw noise
    at that peak: up to ~6), and each key draws its own; random_affine with elastic_alpha = 0 is the plain
    affine warp."""
    h = w = 32
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    coords_image = jnp.asarray(np.stack([rows, cols], -1))
    field = np.asarray(augment.elastic_displacement(jax.random.PRNGKey(0), (h, w), alpha=3.0, sigma=3.0))
    assert field.shape == (2, h, w)
    np.testing.assert_allclose(np.abs(field).max(), 3.0, rtol=1e-4)
    assert np.abs(np.diff(field, axis=1)).max() < 1.5 and np.abs(np.diff(field, axis=2)).max() < 1.5  # raw noise: ~6
    other = np.asarray(augment.elastic_displacement(jax.random.PRNGKey(1), (h, w), alpha=3.0, sigma=3.0))
    assert np.abs(field - other).max() > 1.0

    warped = np.asarray(augment.affine_warp(coords_image, 0.0, 1.0, 0.0, displacement=jnp.asarray(field)))
    src = np.stack([rows, cols]) + field
    inside = (src[0] >= 0) & (src[0] <= h - 1) & (src[1] >= 0) & (src[1] <= w - 1)  # not clamped at an edge
    assert inside.mean() > 0.8
    np.testing.assert_allclose(warped[..., 0][inside], src[0][inside], atol=1e-4)
    np.testing.assert_allclose(warped[..., 1][inside], src[1][inside], atol=1e-4)

    img = jnp.asarray(np.random.default_rng(0).random((h, w, 3)), jnp.float32)
    key = jax.random.PRNGKey(3)
    plain = augment.random_affine(img, key)
    np.testing.assert_array_equal(augment.random_affine(img, key, elastic_alpha=0.0), plain)
    assert np.abs(np.asarray(augment.random_affine(img, key, elastic_alpha=3.0)) - np.asarray(plain)).max() > 0.1
