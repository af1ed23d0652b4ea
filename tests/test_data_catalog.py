"""A catalog-style dataset, configured like `coco_captions` (variable-size images, a nested list of
captions per image, no labels), goes through the same source + grain pipeline as the digits demo."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from colearn_jax.data import pipeline
from colearn_jax.data.tokenizers import ByteTokenizer

CAPTIONS = ["a red square", "a blue circle", "a green triangle"]


class CocoLikeCaptions(tfds.core.GeneratorBasedBuilder):
    """coco_captions' feature layout: image, image/id, captions {id, text}."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12, 0), "val": self._generate_examples(5, 100)}

    def _generate_examples(self, n, offset):
        rng = np.random.RandomState(offset)
        for i in range(n):
            h, w = rng.randint(20, 60, size=2)
            yield i, {
                "image": rng.randint(0, 255, size=(h, w, 3)).astype(np.uint8),
                "image/id": offset + i,
                "captions": [{"id": 10 * i + j, "text": f"{CAPTIONS[j]} number {offset + i}"} for j in range(3)],
            }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    CocoLikeCaptions(data_dir=path, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return path


def _cfg(data_dir):
    cfg = pipeline.default_data_config()
    cfg.update(name="coco_like_captions", data_dir=data_dir, train_split="train", eval_split="val",
               text_key="captions/text", label_key=None, image_size=24, context_length=40,
               batch_size=4, eval_batch_size=4)
    return cfg


def test_catalog_layout_trains_and_evaluates(data_dir):
    tok = ByteTokenizer()
    batch = next(pipeline.make_train_iterator(_cfg(data_dir), tok, seed=0))
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["text"].shape == (4, 40) and "label" not in batch
    texts = [tok.decode(row) for row in batch["text"]]
    assert all(any(t.startswith(c) for c in CAPTIONS) for t in texts), texts
    batches = list(pipeline.iterate_eval(_cfg(data_dir), tok))
    assert sum(int(b["mask"].sum()) for b in batches) == 5
    first = [tok.decode(row) for b in batches for row, m in zip(b["text"], b["mask"]) if m]
    assert all(t.startswith(CAPTIONS[0]) for t in first), first  # eval takes each image's first caption
