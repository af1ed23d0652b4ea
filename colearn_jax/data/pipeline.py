"""grain input pipelines over TFDS random-access (array_record) data sources.

`make_train_iterator` gives an endless, shuffled, per-process-sharded, checkpointable iterator of
`{"image": f32 [b,S,S,3], "text": i32 [b,L], "label": i32 [b]}` batches (CLIP-preprocessed
images, tokenised captions); `iterate_eval` walks a split once, in order, with a padding `mask`.
With `tokenizer=None` both yield images only (plus labels): uint8 [b,S,S,3] resized and centre-cropped
but not normalised, for systems that augment and normalise on device (SimCLR). `train_fraction` < 1
trains on a fixed random subset of the train split (semi-supervised fine-tuning on 1% / 10% labels).

Host cost (digits demo, 2-core VM; experiments/RESULTS.md "Input pipeline"): per example only the
cheap, irregular work runs — pick a caption, look its ids up in the tokenizer's row cache, take the
uint8 image (resized only when it does not already have the target size). Normalisation runs once
per batch, vectorised (`image_ops.normalize` on the stacked uint8 images, bit-identical to doing it
per example), or on the device with `data.normalize_on_device` (the batch then carries uint8 images
and the system must call `image_ops.device_normalize`). `data.cache_decoded` decodes a small split
once into memory instead of parsing and PNG-decoding every record every epoch.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from colearn_jax.data import digits, image_ops

_DEFAULTS = {
    "data_dir": None, "train_split": "train", "eval_split": "test", "image_key": "image",
    "text_key": "caption", "label_key": "label", "augment": False, "max_shift": 0,
    "num_threads": 4, "prefetch_buffer_size": 64, "num_workers": 0, "cache_decoded": False,
    "normalize_on_device": False, "train_fraction": 1.0, "train_fraction_seed": 0,
}
CACHE_MAX_BYTES = 2 << 30  # data.cache_decoded refuses splits that decode to more than this


def default_data_config() -> ml_collections.ConfigDict:
    """Data settings for the bundled `digits_captions` dataset (override fields for others)."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "digits_captions"
    cfg.data_dir = ml_collections.config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or default.
    cfg.train_split = "train"
    cfg.eval_split = "test"
    cfg.image_key = "image"
    cfg.text_key = "caption"  # "/" for nested keys, e.g. "captions/text" for coco_captions.
    cfg.label_key = "label"  # None when the dataset has no label.
    cfg.image_size = 32
    cfg.context_length = 16
    cfg.batch_size = 128  # Global; split evenly over processes.
    cfg.eval_batch_size = 100  # Global.
    cfg.augment = False  # Random translation by up to `max_shift` pixels (0: image_size // 16).
    cfg.max_shift = 0
    cfg.num_threads = 4  # grain reader threads per process.
    cfg.prefetch_buffer_size = 64
    cfg.num_workers = 0  # >0: grain multiprocessing workers (mp_prefetch) after batching.
    cfg.cache_decoded = True  # Decode the (small) split once into memory.
    cfg.normalize_on_device = False  # True: uint8 images; the system calls image_ops.device_normalize.
    return cfg


def _opt(cfg, key: str) -> Any:
    return getattr(cfg, key, _DEFAULTS.get(key))


def make_source(name: str, split: str, data_dir: str | None = None):
    """Random-access TFDS data source of `name[split]`.

    The local datasets are built on first use: `digits_captions`, `digit_modalities`, and `digit_scenes/<config>`
    for its standard configs (custom ones, `digit_scenes.make_config`, are read once built).
    """
    if name == "digits_captions":
        data_dir = digits.ensure_built(data_dir)
    if name == "digit_modalities":
        from colearn_jax.data import digit_modalities  # pylint: disable=import-outside-toplevel

        data_dir = digit_modalities.ensure_built(data_dir)
    base, _, config = name.partition("/")
    if base == "digit_scenes":
        from colearn_jax.data import digit_scenes  # pylint: disable=import-outside-toplevel

        data_dir = digit_scenes.prepare(data_dir, config or "scenes")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"Unknown TFDS dataset {name!r} (config.data.name).") from None
    where = builder.data_dir
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} (looked in {where}). "
            f"Prepare it as array_record first, e.g. `tfds build {name} --file_format=array_record"
            f"{' --data_dir=' + str(data_dir) if data_dir else ''}` (manual-download datasets also "
            "need --manual_dir), or set config.data.data_dir to where it was prepared.")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"TFDS dataset {name!r} at {where} is stored as {builder.info.file_format.value}; "
            "random access needs array_record: rebuild with "
            f"`tfds build {name} --file_format=array_record`.")
    if split not in builder.info.splits:
        raise ValueError(
            f"Dataset {name!r} has no split {split!r}; it has {list(builder.info.splits)}.")
    return builder.as_data_source(split=split)


def _freeze(value):
    """A decoded TFDS value as cached: text as str (sequences of text as tuples), arrays read-only."""
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return tuple(_freeze(v) for v in value.reshape(-1))
        value = value.copy()
        value.flags.writeable = False
    return value


def _nbytes(value) -> int:
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.nbytes
    return len(value) if isinstance(value, str) else 8


class DecodedSource:
    """A random-access source decoded once into memory (`config.data.cache_decoded`).

    Reading a TFDS array_record example parses a tf.train.Example and decodes its PNG/JPEG every
    time (~160 us for a 32x32 digit, most of the host pipeline's cost); a small split is decoded
    once here instead. Examples are the source's, with text as `str` (a sequence of texts as a
    tuple) and read-only arrays. Refuses splits above `max_bytes` decoded.
    """

    def __init__(self, source, *, max_bytes: int = CACHE_MAX_BYTES, what: str = "split"):
        self._examples, total = [], 0
        for i in range(len(source)):
            example = _freeze(source[i])
            total += _nbytes(example)
            if total > max_bytes:
                raise ValueError(
                    f"config.data.cache_decoded: {what} decodes to more than {max_bytes / 2**30:.1f} GiB "
                    f"(reached after {i + 1} of {len(source)} examples); set config.data.cache_decoded=False.")
            self._examples.append(example)
        self.nbytes = total

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int):
        return self._examples[index]


@functools.lru_cache(maxsize=4)
def _decoded_source(name: str, split: str, data_dir: str | None) -> DecodedSource:
    return DecodedSource(make_source(name, split, data_dir), what=f"{name}[{split}]")


def _source(cfg, split: str):
    """The split's source for the pipelines: decoded once and kept (`cache_decoded`) or read per example."""
    name, data_dir = cfg.name, _opt(cfg, "data_dir")
    if _opt(cfg, "cache_decoded"):
        return _decoded_source(name, split, data_dir)
    return make_source(name, split, data_dir)


def _lookup(example: dict, key: str):
    value = example
    for part in key.split("/"):
        value = value[part]
    return value


def _has(example: dict, key: str | None) -> bool:
    if not key:
        return False
    try:
        _lookup(example, key)
    except (KeyError, TypeError, IndexError):
        return False
    return True


def _pick_text(value, rng: np.random.Generator | None) -> str:
    """A caption from a str/bytes or a sequence of them (random one with rng, else the first)."""
    if not isinstance(value, (str, bytes)):
        seq = value if isinstance(value, tuple) else list(np.asarray(value, dtype=object).reshape(-1))
        if not seq:
            return ""
        value = seq[int(rng.integers(len(seq)))] if rng is not None else seq[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _ExampleTransform:
    """Raw TFDS example -> uint8 image, token ids (+ label); `rng` None means eval (no augmentation,
    first caption). `_BatchFinish` normalises the images of a whole batch afterwards.
    Without a tokenizer: no text (and `_BatchFinish` leaves the images uint8)."""

    def __init__(self, cfg, tokenizer, with_label: bool, extra_keys: tuple = ()):
        self.size = int(cfg.image_size)
        self.extra_keys = tuple(extra_keys)  # copied through as arrays (e.g. boxes, in fractions of the side)
        self.context_length = int(cfg.context_length) if tokenizer is not None else 0
        self.image_key, self.text_key = _opt(cfg, "image_key"), _opt(cfg, "text_key")
        self.label_key = _opt(cfg, "label_key") if with_label else None
        self.augment = bool(_opt(cfg, "augment"))
        self.max_shift = int(_opt(cfg, "max_shift") or max(1, self.size // 16))
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> np.ndarray:
        row = getattr(self.tokenizer, "row", None)  # cached (colearn_jax tokenizers)
        return row(text, self.context_length) if row else self.tokenizer(text, self.context_length)[0]

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        raw = _lookup(example, self.image_key)
        image = image_ops.resize_short_side_center_crop(raw, self.size)
        shifted = self.augment and rng is not None
        if shifted:
            image = image_ops.random_translate(image, rng, self.max_shift)
        out = {"image": image}
        if self.tokenizer is not None:
            out["text"] = self.tokenize(_pick_text(_lookup(example, self.text_key), rng))
        if self.label_key:
            out["label"] = np.int32(_lookup(example, self.label_key))
        for key in self.extra_keys:
            value = np.asarray(_lookup(example, key))
            if value.ndim == 3 and value.shape[:2] == np.shape(raw)[:2]:  # a per-pixel map: follows the image
                if shifted:
                    raise ValueError(f"config.data.augment shifts images on the host, and the per-pixel field "
                                     f"{key!r} would not follow; turn config.data.augment off.")
                value = image_ops.resize_label_map_like_image(value, self.size)
            out[key] = value
        return out


class _BatchFinish:
    """Batch-level step after `.batch`: CLIP-normalise the stacked uint8 images in one vectorised
    pass (skipped with `normalize_on_device` in training batches, and for image-only pipelines, `tokenizer=None`, whose
    systems augment and normalise on device); eval batches get their padding rows zeroed."""

    def __init__(self, cfg, tokenizer=True, evaluation: bool = False):
        # Evaluators feed eval batches straight to the model (no train-step batch transform), so image+text
        # eval batches are always normalised here, whatever `normalize_on_device` says for training.
        on_device_in_training = bool(_opt(cfg, "normalize_on_device")) and not evaluation
        self.on_device = on_device_in_training or tokenizer is None

    def __call__(self, batch: dict) -> dict:
        image = batch["image"]
        if not self.on_device:
            image = image_ops.normalize(image)
        if "mask" in batch:
            image = np.where(batch["mask"].reshape((-1,) + (1,) * (image.ndim - 1)), image, image.dtype.type(0))
        return {**batch, "image": image}


def _per_process(global_batch: int, process_index: int, process_count: int, key: str) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"{key}={global_batch} must be a positive multiple of the process count "
                         f"({process_count}).")
    return global_batch // process_count


def _read_options(cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(_opt(cfg, "num_threads")),
                             prefetch_buffer_size=int(_opt(cfg, "prefetch_buffer_size")))


class _Subset:
    """A random-access view of `source` at `indices`."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


def train_subset(source, fraction: float, seed: int = 0):
    """A fixed random `fraction` of `source` (at least one example), the same for every run seed."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.data.train_fraction={fraction} must be in (0, 1].")
    if fraction == 1.0:
        return source
    n = len(source)
    keep = max(1, int(round(fraction * n)))
    return _Subset(source, np.sort(np.random.default_rng(seed).permutation(n)[:keep]))


def _mixture(data_cfg, tokenizer, seed: int) -> grain.MapDataset:
    """`config.data.mixture`: each entry's fields override `config.data` for one dataset; the transformed
    datasets are interleaved by weight (data/mixture.py). All must yield the same features."""
    from colearn_jax.data import mixture  # noqa: PLC0415

    parts, weights, with_label = [], [], None
    for i, (overrides, weight) in enumerate(mixture.component_configs(data_cfg)):
        cfg = data_cfg.copy_and_resolve_references()
        cfg.unlock()
        cfg.update(overrides)
        cfg.mixture = []
        source = _source(cfg, _opt(cfg, "train_split"))
        labelled = _has(source[0], _opt(cfg, "label_key"))
        if with_label is not None and labelled != with_label:
            raise ValueError(f"config.data.mixture[{i}] ({cfg.name}) {'has' if labelled else 'lacks'} labels "
                             "unlike the datasets before it; set label_key=None to mix them.")
        with_label = labelled
        parts.append(grain.MapDataset.source(source).seed(seed + 1000 * (i + 1)).random_map(
            _ExampleTransform(cfg, tokenizer, labelled)))
        weights.append(weight)
    return mixture.mix(parts, weights, seed=seed)


def make_train_iterator(data_cfg, tokenizer, *, seed: int, process_index: int = 0,
                        process_count: int = 1, with_label: bool | None = None,
                        extra_keys: tuple = ()) -> grain.DatasetIterator:
    """Endless shuffled batches of this process's share of `data_cfg.batch_size`.

    Order: global shuffle (reshuffled each epoch) -> per-example random caption/augmentation
    (seeded by the global position) -> global batch k is examples `k*B .. k*B+B-1` of that stream
    (B = `data_cfg.batch_size`), and this process gets its contiguous rows
    `[process_index*b, (process_index+1)*b)` (b = B // process_count), as in `iterate_eval`.
    Process p's rows land on process p's devices (`jax.make_array_from_process_local_data` with
    the mesh ordered by process), so the global batch, and hence training, is the same whatever
    the number of processes. Deterministic given `seed`; `it.get_state()` / `it.set_state(state)`
    resume exactly (the state is per process: resume with the same process count). Each batch's images
    are normalised once per batch (unless `normalize_on_device`: uint8 go to the device).
    Orbax: save with `grain.checkpoint.CheckpointSave(it)` and restore into a fresh iterator
    with `grain.checkpoint.CheckpointRestore(it)` inside `ocp.args.Composite` (grain 0.2.18).
    `num_workers > 0` adds grain worker processes (same batches, but a different state format).
    `with_label` None: labels when the data has `label_key`. `extra_keys`: example fields copied into the
    batch (a system's own inputs, e.g. SimCLR's object boxes; fixed-shape per example); a per-pixel field
    ([H, W, C] with the image's H, W: a segmentation) is resized and cropped with the image (nearest).
    """
    per = _per_process(int(data_cfg.batch_size), process_index, process_count,
                       "config.data.batch_size")
    if data_cfg.get("mixture"):
        if extra_keys:
            raise ValueError(f"extra_keys {list(extra_keys)} are not supported with config.data.mixture.")
        ds = _mixture(data_cfg, tokenizer, seed)
    else:
        source = train_subset(_source(data_cfg, _opt(data_cfg, "train_split")),
                              float(_opt(data_cfg, "train_fraction")), int(_opt(data_cfg, "train_fraction_seed")))
        if with_label is None:
            with_label = _has(source[0], _opt(data_cfg, "label_key"))
        transform = _ExampleTransform(data_cfg, tokenizer, with_label, extra_keys)
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
        ds = ds.random_map(transform)
    # Batches of b consecutive examples; global batch k is local batches k*P .. k*P+P-1.
    ds = ds.batch(per, drop_remainder=True)[process_index::process_count].map(_BatchFinish(data_cfg, tokenizer))
    ids = ds.to_iter_dataset(_read_options(data_cfg))
    if int(_opt(data_cfg, "num_workers")) > 0:
        from absl import flags  # pylint: disable=import-outside-toplevel

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags.
            flags.FLAGS.mark_as_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers)))
    return iter(ids)


def iterate_eval(data_cfg, tokenizer, *, split: str | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """One ordered pass over a split in batches with a bool `mask` marking real rows.

    Global batch k holds examples `k*B .. k*B+B-1` (B = `data_cfg.eval_batch_size`); this process
    gets rows `[process_index*b, (process_index+1)*b)` of it (b = B // process_count). Every
    process yields the same number of batches; rows past the end are zeros with mask False.
    """
    global_b = int(data_cfg.eval_batch_size)
    per = _per_process(global_b, process_index, process_count, "config.data.eval_batch_size")
    source = _source(data_cfg, split or _opt(data_cfg, "eval_split"))
    n = len(source)
    transform = _ExampleTransform(data_cfg, tokenizer, _has(source[0], _opt(data_cfg, "label_key")))
    blank = {k: np.zeros_like(v) for k, v in transform(source[0]).items()}
    num_batches = math.ceil(n / global_b)
    rows = [k * global_b + process_index * per + j for k in range(num_batches) for j in range(per)]

    def load(i: int) -> dict:
        out = transform(source[i]) if i < n else dict(blank)
        out["mask"] = np.bool_(i < n)
        return out

    ds = grain.MapDataset.source(rows).map(load).batch(per).map(_BatchFinish(data_cfg, tokenizer, evaluation=True))
    return iter(ds.to_iter_dataset(_read_options(data_cfg)))
