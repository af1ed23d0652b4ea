"""`digits_captions`: scikit-learn's bundled handwritten digits as a TFDS image-caption dataset.

The 1797 8x8 greyscale digits (values 0..16, shipped inside scikit-learn, so nothing is
downloaded) are upscaled bicubically to 32x32 RGB and paired with a caption chosen
deterministically from several templates ("a handwritten seven", "the number 7", ...).
A fixed stratified split gives 1497 train / 300 test examples. Stored as array_record so that
`tfds.data_source("digits_captions", data_dir=...)` gives random access for grain.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from colearn_jax.data import build_lock

IMAGE_SIZE = 32
NUM_TEST = 300
SPLIT_SEED = 0
CAPTION_SEED = 1234

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Captions: `{word}` is the number word, `{num}` the numeral. All fit in 30 bytes, so the byte
# tokenizer at context length 32 never cuts off the digit.
CAPTION_TEMPLATES = (
    "a photo of the digit {word}",
    "a handwritten {word}",
    "the number {num}",
    "an image of the numeral {word}",
    "a blurry picture of a {num}",
    "a hand-drawn digit {num}",
    "a scan of the number {word}",
    "a grey sketch of a {num}",
)

# Zero-shot prompts; `{}` is filled with a class name from CLASS_NAMES.
ZEROSHOT_TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "an image of the numeral {}",
    "the number {}",
)


# Every image gets every template (in its own deterministic order, the first being `caption`), so a
# caption's wording carries no information about which image it belongs to: training can align only
# the digit, not memorise which phrasing goes with which picture.
CAPTIONS_PER_IMAGE = len(CAPTION_TEMPLATES)


def _caption_choices(n: int) -> np.ndarray:
    """[n, CAPTIONS_PER_IMAGE] template indices per example, a deterministic permutation each."""
    rng = np.random.RandomState(CAPTION_SEED)
    return np.stack([rng.permutation(len(CAPTION_TEMPLATES))[:CAPTIONS_PER_IMAGE] for _ in range(n)])


def upscale(digit_8x8: np.ndarray) -> np.ndarray:
    """8x8 values 0..16 -> uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] (bicubic, grey replicated)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    grey = np.clip(np.round(np.asarray(digit_8x8, np.float64) * (255.0 / 16.0)), 0, 255)
    pil = Image.fromarray(grey.astype(np.uint8))
    big = np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
    return np.repeat(big[..., None], 3, axis=-1)


def split_indices(labels: np.ndarray, num_test: int = NUM_TEST, seed: int = SPLIT_SEED):
    """Fixed stratified split: returns sorted (train_idx, test_idx)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * num_test / len(labels)
    per_class = np.floor(quota).astype(int)
    # Hand out the remaining test slots by largest remainder (ties by class id).
    for c in np.argsort(-(quota - per_class), kind="stable")[: num_test - per_class.sum()]:
        per_class[c] += 1
    rng = np.random.RandomState(seed)
    test = []
    for c, k in zip(classes, per_class):
        members = np.flatnonzero(labels == c)
        test.extend(rng.permutation(members)[:k])
    test = np.sort(np.asarray(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


class DigitsCaptions(tfds.core.GeneratorBasedBuilder):
    """scikit-learn handwritten digits with captions (1497 train / 300 test)."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "`captions`: several captions per image (training samples one per step, as for COCO).",
        "1.2.0": "`captions` holds every template for every image.",
    }

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's default lookup goes through `importlib_resources`, which is not always installed.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                "caption": tfds.features.Text(),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "id": np.int64,
            }),
            supervised_keys=("image", "label"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships with scikit-learn.
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

        digits = load_digits()
        labels = digits.target.astype(int)
        train, test = split_indices(labels)
        return {
            "train": self._generate_examples(digits.images, labels, train),
            "test": self._generate_examples(digits.images, labels, test),
        }

    def _generate_examples(self, images, labels, indices):
        from PIL import Image  # pylint: disable=import-outside-toplevel

        choices = _caption_choices(len(labels))
        for i in indices:
            label = int(labels[i])
            captions = [CAPTION_TEMPLATES[c].format(word=CLASS_NAMES[label], num=label) for c in choices[i]]
            yield int(i), {
                # PIL images are PNG-encoded by PIL; numpy arrays would need TensorFlow.
                "image": Image.fromarray(upscale(images[i])),
                "label": label,
                "caption": captions[0],
                "captions": captions,
                "id": int(i),
            }


def default_data_dir() -> str:
    """TFDS's data dir: $TFDS_DATA_DIR if set, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def ensure_built(data_dir: str | None = None) -> str:
    """Builds `digits_captions` (array_record) under `data_dir` if needed; returns `data_dir`."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    version_dir = os.path.join(data_dir, "digits_captions", str(DigitsCaptions.VERSION))
    with build_lock.exclusive(data_dir, "digits_captions"):
        if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
            builder = DigitsCaptions(data_dir=data_dir, file_format="array_record")
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir
