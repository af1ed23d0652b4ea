"""CLIP image preprocessing tests, including parity with open_clip's eval transform."""
import numpy as np
import pytest
from PIL import Image

from colearn_jax.data import image_ops

_SHAPES = [(300, 400, 3), (224, 224, 3), (100, 57, 3), (37, 500), (640, 480, 1), (225, 224, 3),
           (8, 8, 3), (500, 31, 4), (1000, 1000, 3)]


@pytest.fixture(scope="module")
def open_clip_transforms():
    import open_clip  # the [parity] extra is installed for the test suite

    return {s: open_clip.image_transform(s, is_train=False) for s in (224, 32)}


def _pil(image: np.ndarray) -> Image.Image:
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image)


@pytest.mark.parametrize("shape", _SHAPES)
def test_clip_preprocess_matches_open_clip(open_clip_transforms, shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    for size, transform in open_clip_transforms.items():
        ref = transform(_pil(image)).numpy().transpose(1, 2, 0)
        ours = image_ops.clip_preprocess(image, size)
        assert ours.shape == (size, size, 3) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1e-2


def test_resize_crop_and_normalize():
    image = np.zeros((20, 40), np.uint8)
    image[:, 10:30] = 255  # the centre square of a wide image survives the crop
    out = image_ops.resize_short_side_center_crop(image, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8 and out[:, 1:-1].min() == 255
    same = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    np.testing.assert_array_equal(image_ops.resize_short_side_center_crop(same, 4), same)
    x = image_ops.normalize(np.full((2, 2, 3), 255, np.uint8))
    expected = (1 - np.array(image_ops.CLIP_MEAN)) / np.array(image_ops.CLIP_STD)
    np.testing.assert_allclose(x[0, 0], expected, rtol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        image_ops.clip_preprocess(np.zeros((4, 4, 3), np.float32), 4)


def test_random_translate():
    rng = np.random.default_rng(0)
    image = np.zeros((8, 8, 3), np.uint8)
    image[3:5, 3:5] = 200
    shifted = [image_ops.random_translate(image, rng, 2) for _ in range(20)]
    assert all(s.shape == image.shape and s.sum() == image.sum() for s in shifted)
    assert any(not np.array_equal(s, image) for s in shifted)
    np.testing.assert_array_equal(image_ops.random_translate(image, rng, 0), image)


def test_normalize_table_equals_the_arithmetic_for_every_value():
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # every value, every channel
    batch = np.stack([values.reshape(16, 16, 3), values[::-1].reshape(16, 16, 3)])
    expected = (batch.astype(np.float32) / np.float32(255) - np.float32(image_ops.CLIP_MEAN)) / np.float32(
        image_ops.CLIP_STD)
    got = image_ops.normalize(batch)
    assert got.dtype == np.float32 and got.shape == batch.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(image_ops.normalize(batch[0]), got[0])  # one image == its batch row


def test_device_normalize_equals_normalize_and_passes_floats_through():
    import jax
    import jax.numpy as jnp

    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1).reshape(2, 8, 16, 3)
    host = image_ops.normalize(values)
    for fn in (image_ops.device_normalize, jax.jit(image_ops.device_normalize)):
        out = fn(values)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out).view(np.uint32), host.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(image_ops.device_normalize(host)), host)  # already normalised
    with pytest.raises(TypeError, match="uint8"):
        image_ops.device_normalize(values.astype(np.int32))


def test_label_maps_follow_the_images_resize_and_crop_with_nearest_sampling():
    """`resize_label_map_like_image`: the short side to `size`, the centre crop, each output pixel the
    label under its centre; integer labels stay integers (no blending)."""
    labels = np.arange(48 * 64, dtype=np.int32).reshape(48, 64, 1)
    out = image_ops.resize_label_map_like_image(labels, 24)  # 48x64 -> 24x32 -> centre 24x24 (left 4)
    assert out.shape == (24, 24, 1) and out.dtype == np.int32
    rows, cols = 2 * np.arange(24) + 1, 2 * (np.arange(24) + 4) + 1
    np.testing.assert_array_equal(out[..., 0], labels[rows[:, None], cols[None, :], 0])
    square = image_ops.resize_label_map_like_image(labels[:48, :48].astype(np.uint8), 48)
    np.testing.assert_array_equal(square, labels[:48, :48].astype(np.uint8))  # same size: unchanged
