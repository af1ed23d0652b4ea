"""grain input pipelines over TFDS random-access (array_record) data sources.

`make_train_iterator` gives an endless, shuffled, per-process-sharded, checkpointable iterator of
`{"image": f32 [b,S,S,3], "text": i32 [b,L], "label": i32 [b]}` batches (CLIP-preprocessed
images, tokenised captions); `iterate_eval` walks a split once, in order, with a padding `mask`.
"""
from __future__ import annotations

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
    "num_threads": 4, "prefetch_buffer_size": 64, "num_workers": 0,
}


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
    return cfg


def _opt(cfg, key: str) -> Any:
    return getattr(cfg, key, _DEFAULTS.get(key))


def make_source(name: str, split: str, data_dir: str | None = None):
    """Random-access TFDS data source of `name[split]`.

    The local datasets are built on first use: `digits_captions`, and `digit_scenes/<config>`
    for its standard configs (custom ones, `digit_scenes.make_config`, are read once built).
    """
    if name == "digits_captions":
        data_dir = digits.ensure_built(data_dir)
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
        seq = list(np.asarray(value, dtype=object).reshape(-1))
        if not seq:
            return ""
        value = seq[int(rng.integers(len(seq)))] if rng is not None else seq[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _ExampleTransform:
    """Raw TFDS example -> model inputs; `rng` None means eval (no augmentation, first caption)."""

    def __init__(self, cfg, tokenizer, with_label: bool):
        self.size = int(cfg.image_size)
        self.context_length = int(cfg.context_length)
        self.image_key, self.text_key = _opt(cfg, "image_key"), _opt(cfg, "text_key")
        self.label_key = _opt(cfg, "label_key") if with_label else None
        self.augment = bool(_opt(cfg, "augment"))
        self.max_shift = int(_opt(cfg, "max_shift") or max(1, self.size // 16))
        self.tokenizer = tokenizer

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        image = image_ops.resize_short_side_center_crop(_lookup(example, self.image_key), self.size)
        if self.augment and rng is not None:
            image = image_ops.random_translate(image, rng, self.max_shift)
        text = _pick_text(_lookup(example, self.text_key), rng)
        out = {"image": image_ops.normalize(image),
               "text": self.tokenizer(text, self.context_length)[0]}
        if self.label_key:
            out["label"] = np.int32(_lookup(example, self.label_key))
        return out


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


def make_train_iterator(data_cfg, tokenizer, *, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """Endless shuffled batches of this process's share of `data_cfg.batch_size`.

    Order: global shuffle (reshuffled each epoch) -> per-example random caption/augmentation
    (seeded by the global position) -> global batch k is examples `k*B .. k*B+B-1` of that stream
    (B = `data_cfg.batch_size`), and this process gets its contiguous rows
    `[process_index*b, (process_index+1)*b)` (b = B // process_count), as in `iterate_eval`.
    Process p's rows land on process p's devices (`jax.make_array_from_process_local_data` with
    the mesh ordered by process), so the global batch, and hence training, is the same whatever
    the number of processes. Deterministic given `seed`; `it.get_state()` / `it.set_state(state)`
    resume exactly (the state is per process: resume with the same process count).
    Orbax: save with `grain.checkpoint.CheckpointSave(it)` and restore into a fresh iterator
    with `grain.checkpoint.CheckpointRestore(it)` inside `ocp.args.Composite` (grain 0.2.18).
    `num_workers > 0` adds grain worker processes (same batches, but a different state format).
    """
    per = _per_process(int(data_cfg.batch_size), process_index, process_count,
                       "config.data.batch_size")
    source = make_source(data_cfg.name, _opt(data_cfg, "train_split"), _opt(data_cfg, "data_dir"))
    transform = _ExampleTransform(data_cfg, tokenizer, _has(source[0], _opt(data_cfg, "label_key")))
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    ds = ds.random_map(transform)
    # Batches of b consecutive examples; global batch k is local batches k*P .. k*P+P-1.
    ds = ds.batch(per, drop_remainder=True)[process_index::process_count]
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
    source = make_source(data_cfg.name, split or _opt(data_cfg, "eval_split"),
                         _opt(data_cfg, "data_dir"))
    n = len(source)
    transform = _ExampleTransform(data_cfg, tokenizer, _has(source[0], _opt(data_cfg, "label_key")))
    blank = {k: np.zeros_like(v) for k, v in transform(source[0]).items()}
    num_batches = math.ceil(n / global_b)
    rows = [k * global_b + process_index * per + j for k in range(num_batches) for j in range(per)]

    def load(i: int) -> dict:
        out = transform(source[i]) if i < n else dict(blank)
        out["mask"] = np.bool_(i < n)
        return out

    ds = grain.MapDataset.source(rows).map(load).batch(per)
    return iter(ds.to_iter_dataset(_read_options(data_cfg)))
