"""Tests of the digits_captions TFDS builder and the grain train / eval pipelines."""
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from colearn_jax.data import digits, image_ops, pipeline
from colearn_jax.data.tokenizers import ByteTokenizer

NUMERALS = {str(i): i for i in range(10)}


@pytest.fixture(scope="module")
def data_dir():
    return digits.ensure_built()  # $TFDS_DATA_DIR, set by conftest to a repo-local cache


def _cfg(data_dir, **overrides):
    cfg = pipeline.default_data_config()
    cfg.data_dir = data_dir
    cfg.batch_size = 32
    cfg.eval_batch_size = 128
    cfg.update(overrides)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- builder

def test_digits_builder(data_dir):
    assert data_dir == os.path.abspath(os.environ["TFDS_DATA_DIR"])
    assert digits.ensure_built(data_dir) == data_dir  # already built: a quick no-op
    sources = {s: tfds.data_source("digits_captions", split=s, data_dir=data_dir)
               for s in ("train", "test")}
    assert {s: len(src) for s, src in sources.items()} == {"train": 1497, "test": 300}
    ids = {s: {int(ex["id"]) for ex in src} for s, src in sources.items()}
    assert not ids["train"] & ids["test"] and len(ids["train"] | ids["test"]) == 1797
    test_labels = np.array([ex["label"] for ex in sources["test"]])
    assert np.bincount(test_labels, minlength=10).min() >= 29  # stratified: ~30 per class
    for ex in list(sources["test"])[:50]:
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        assert np.array_equal(ex["image"][..., 0], ex["image"][..., 2])  # grey as RGB
        assert ex["image"].max() > 128
        caption = ex["caption"].decode()
        words = set(caption.replace("-", " ").split())
        assert digits.CLASS_NAMES[ex["label"]] in words or str(ex["label"]) in words, caption
    assert len(digits.CAPTION_TEMPLATES) >= 6
    longest = max(len(t.format(word=w, num=i)) for t in digits.CAPTION_TEMPLATES
                  for i, w in enumerate(digits.CLASS_NAMES))
    assert longest <= 30  # fits the byte tokenizer at context length 32
    assert all("{}" in t for t in digits.ZEROSHOT_TEMPLATES) and len(digits.CLASS_NAMES) == 10


def test_digits_builder_is_deterministic(data_dir, tmp_path):
    other = digits.ensure_built(str(tmp_path))
    a = tfds.data_source("digits_captions", split="test", data_dir=data_dir)
    b = tfds.data_source("digits_captions", split="test", data_dir=other)
    for i in (0, 7, 299):
        assert a[i]["id"] == b[i]["id"] and a[i]["caption"] == b[i]["caption"]
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    train, test = digits.split_indices(np.arange(1797) % 10)
    assert len(test) == 300 and len(train) == 1497


# ---------------------------------------------------------------- train pipeline

def test_train_batches_shapes_and_determinism(data_dir):
    tok = ByteTokenizer()
    cfg = _cfg(data_dir, context_length=48)  # room for every caption in bytes
    first = _take(pipeline.make_train_iterator(cfg, tok, seed=0), 2)
    b = first[0]
    assert set(b) == {"image", "text", "label"}
    assert b["image"].shape == (32, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["text"].shape == (32, 48) and b["text"].dtype == np.int32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    assert np.all(b["text"][:, 0] == tok.sot_id) and np.all((b["text"] == tok.eot_id).sum(1) == 1)
    assert -2.0 < b["image"].min() < b["image"].max() < 2.2  # CLIP-normalised
    for text, label in zip(b["text"], b["label"]):
        words = set(tok.decode(text).replace("-", " ").split())
        assert digits.CLASS_NAMES[label] in words or str(label) in words
    again = _take(pipeline.make_train_iterator(cfg, tok, seed=0), 2)
    other = _take(pipeline.make_train_iterator(cfg, tok, seed=1), 2)
    for x, y in zip(first, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_train_image_size_and_augment(data_dir):
    tok = ByteTokenizer()
    plain = next(pipeline.make_train_iterator(_cfg(data_dir, image_size=48), tok, seed=3))
    aug = next(pipeline.make_train_iterator(_cfg(data_dir, image_size=48, augment=True), tok,
                                            seed=3))
    assert plain["image"].shape == aug["image"].shape == (32, 48, 48, 3)
    np.testing.assert_array_equal(plain["label"], aug["label"])
    assert not np.array_equal(plain["image"], aug["image"])


def test_process_slices_concatenate_to_the_one_process_global_batch(data_dir):
    """Process p gets rows [p*b, (p+1)*b) of every global batch: the batch a run sees does not
    depend on how many processes feed it (the multi-host run equals the one-process run)."""
    tok = ByteTokenizer()
    cfg = _cfg(data_dir, label_key="id", batch_size=64)  # "label" carries the example id
    whole = [b["label"] for b in _take(pipeline.make_train_iterator(cfg, tok, seed=5), 11)]
    parts = [[b["label"] for b in _take(pipeline.make_train_iterator(
        cfg, tok, seed=5, process_index=p, process_count=2), 11)] for p in range(2)]
    assert parts[0][0].shape == (32,)
    assert not set(np.concatenate(parts[0])) & set(np.concatenate(parts[1]))
    for k in range(11):
        np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])


def test_iterator_state_resumes_exactly(data_dir):
    tok = ByteTokenizer()
    cfg = _cfg(data_dir, augment=True)
    it = pipeline.make_train_iterator(cfg, tok, seed=7)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = pipeline.make_train_iterator(cfg, tok, seed=7)
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 3)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_iterator_orbax_checkpoint(data_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    tok = ByteTokenizer()
    cfg = _cfg(data_dir)
    it = pipeline.make_train_iterator(cfg, tok, seed=2)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = next(it)
        fresh = pipeline.make_train_iterator(cfg, tok, seed=2)
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(next(fresh)["image"], expected["image"])


# ---------------------------------------------------------------- the cheap path equals the plain one

def _reference_transform(cfg, tok, example, rng=None):
    """The straightforward per-example computation: decoded TFDS example -> normalised float image,
    freshly tokenised text (random caption with rng, else the first), label."""
    image = image_ops.resize_short_side_center_crop(example[cfg.image_key], cfg.image_size)
    if cfg.augment and rng is not None:
        image = image_ops.random_translate(image, rng, cfg.max_shift or max(1, cfg.image_size // 16))
    captions = list(np.asarray(example[cfg.text_key], dtype=object).reshape(-1))
    caption = captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]
    return {"image": image_ops._normalize_arithmetic(image),  # noqa: SLF001 - the arithmetic itself
            "text": tok(caption.decode(), cfg.context_length)[0], "label": np.int32(example["label"])}


@pytest.mark.parametrize("augment", [False, True])
def test_train_batches_equal_a_plain_per_example_reference(data_dir, augment):
    tok = ByteTokenizer()
    cfg = _cfg(data_dir, text_key="captions", context_length=32, augment=augment, cache_decoded=True)
    source = tfds.data_source("digits_captions", split="train", data_dir=data_dir)  # decoded per read
    ref = grain.MapDataset.source(source).seed(4).shuffle().repeat()
    ref = ref.random_map(lambda ex, rng: _reference_transform(cfg, tok, ex, rng)).batch(32, drop_remainder=True)
    ref_it = iter(ref.to_iter_dataset())
    it = pipeline.make_train_iterator(cfg, tok, seed=4)
    for _ in range(3):
        got, want = next(it), next(ref_it)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert tok.row_cache_info().hits > 0  # the captions came from the cache


def test_eval_batches_equal_a_plain_reference_with_zero_padding(data_dir):
    tok = ByteTokenizer()
    cfg = _cfg(data_dir, text_key="captions", eval_batch_size=128)
    source = tfds.data_source("digits_captions", split="test", data_dir=data_dir)
    batches = list(pipeline.iterate_eval(cfg, tok))
    image = np.concatenate([b["image"] for b in batches])
    text = np.concatenate([b["text"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 300 and not mask[300:].any()
    for i in (0, 1, 150, 299):
        want = _reference_transform(cfg, tok, source[i])
        np.testing.assert_array_equal(image[i], want["image"])
        np.testing.assert_array_equal(text[i], want["text"])
    assert np.all(image[300:] == 0)  # padding rows: zeros, as before normalisation moved to the batch


def test_normalize_on_device_ships_uint8_that_device_normalize_turns_into_the_host_batch(data_dir):
    import jax

    tok = ByteTokenizer()
    host = next(pipeline.make_train_iterator(_cfg(data_dir, augment=True), tok, seed=6))
    raw = next(pipeline.make_train_iterator(_cfg(data_dir, augment=True, normalize_on_device=True), tok, seed=6))
    assert raw["image"].dtype == np.uint8 and host["image"].dtype == np.float32
    np.testing.assert_array_equal(raw["text"], host["text"])
    on_device = np.asarray(jax.jit(image_ops.device_normalize)(raw["image"]))
    np.testing.assert_array_equal(on_device.view(np.uint32), host["image"].view(np.uint32))


def test_eval_batches_are_normalised_on_host_even_with_normalize_on_device(data_dir):
    """Evaluators feed eval batches to the model directly (no train-step transform): with
    `normalize_on_device` the *training* batches stay uint8, the eval batches must not."""
    tok = ByteTokenizer()
    host = next(pipeline.iterate_eval(_cfg(data_dir, eval_batch_size=16), tok))
    flagged = next(pipeline.iterate_eval(_cfg(data_dir, eval_batch_size=16, normalize_on_device=True), tok))
    assert flagged["image"].dtype == np.float32
    np.testing.assert_array_equal(flagged["image"], host["image"])


def test_decoded_source_matches_tfds_and_refuses_large_splits(data_dir):
    source = tfds.data_source("digits_captions", split="test", data_dir=data_dir)
    cached = pipeline.DecodedSource(source)
    assert len(cached) == len(source) == 300
    assert cached.nbytes >= 300 * 32 * 32 * 3
    for i in (0, 299):
        np.testing.assert_array_equal(cached[i]["image"], source[i]["image"])
        assert cached[i]["caption"] == source[i]["caption"].decode()
        assert cached[i]["captions"] == tuple(c.decode() for c in source[i]["captions"])
        assert cached[i]["label"] == source[i]["label"]
    with pytest.raises(ValueError):  # cached arrays are shared between epochs: read-only
        cached[0]["image"][0, 0, 0] = 1
    with pytest.raises(ValueError, match="config.data.cache_decoded=False"):
        pipeline.DecodedSource(source, max_bytes=100 * 32 * 32 * 3)


# ---------------------------------------------------------------- eval and errors

@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_split_once_in_order(data_dir, process_count):
    tok = ByteTokenizer()
    cfg = _cfg(data_dir, label_key="id")
    source = tfds.data_source("digits_captions", split="test", data_dir=data_dir)
    order = [int(ex["id"]) for ex in source]
    per_process = [list(pipeline.iterate_eval(cfg, tok, process_index=p,
                                              process_count=process_count))
                   for p in range(process_count)]
    assert len({len(bs) for bs in per_process}) == 1 and len(per_process[0]) == 3
    seen = []
    for step in range(3):
        batches = [bs[step] for bs in per_process]
        for b in batches:
            assert b["image"].shape == (128 // process_count, 32, 32, 3)
            assert b["mask"].dtype == np.bool_ and b["text"].shape == (128 // process_count, 16)
            assert np.all(b["label"][~b["mask"]] == 0) and np.all(b["text"][~b["mask"]] == 0)
        labels = np.concatenate([b["label"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        seen.extend(labels[mask].tolist())
    assert seen == order
    assert sum(int(bs[-1]["mask"].sum()) for bs in per_process) == 300 - 2 * 128


def test_eval_first_caption_of_a_caption_list():
    transform = pipeline._ExampleTransform(_cfg(None, text_key="captions/text", label_key=None),
                                           ByteTokenizer(), with_label=False)
    example = {"image": np.zeros((40, 60, 3), np.uint8),
               "captions": {"text": np.array([b"first", b"second", b"third"], dtype=object)}}
    out = transform(example)
    assert set(out) == {"image", "text"} and out["image"].shape == (32, 32, 3)
    assert ByteTokenizer().decode(out["text"]) == "first"
    rng = np.random.default_rng(0)
    picks = {ByteTokenizer().decode(transform(example, rng)["text"]) for _ in range(30)}
    assert picks == {"first", "second", "third"}


def test_clear_errors(data_dir, tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="config.data.batch_size"):
        pipeline.make_train_iterator(_cfg(data_dir, batch_size=100), tok, seed=0, process_count=3)
    with pytest.raises(ValueError, match="config.data.eval_batch_size"):
        pipeline.iterate_eval(_cfg(data_dir, eval_batch_size=5), tok, process_count=2)
    with pytest.raises(ValueError, match="no_such_dataset"):
        pipeline.make_source("no_such_dataset", "train", data_dir)
    with pytest.raises(FileNotFoundError, match=r"'mnist'.*not prepared.*tfds build mnist"):
        pipeline.make_source("mnist", "train", str(tmp_path))
    with pytest.raises(ValueError, match="no split 'validation'"):
        pipeline.make_source("digits_captions", "validation", data_dir)


def test_default_context_fits_every_digits_caption_with_clip_bpe():
    from colearn_jax.data.tokenizers import get_tokenizer

    tok = get_tokenizer("clip_bpe")
    context = pipeline.default_data_config().context_length
    captions = [t.format(word=w, num=i) for t in digits.CAPTION_TEMPLATES
                for i, w in enumerate(digits.CLASS_NAMES)]
    captions += [t.format(w) for t in digits.ZEROSHOT_TEMPLATES for w in digits.CLASS_NAMES]
    assert max(len(tok.encode(c)) for c in captions) + 2 <= context
