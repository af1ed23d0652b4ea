"""`digit_scenes`: cluttered scenes of 1-3 coloured handwritten digits with captions, boxes, soft
region labels, region proposals and question-answer pairs. Local, generated from a seed.

Data card
---------
Generation. Each example is a pure function of (seed, split, index). A canvas (default 64x64 RGB)
gets a two-colour gradient with low-frequency blotches, 2-5 thin semi-transparent distractor strokes
(arcs and zigzags, not digits) and Gaussian pixel noise. On it go 1-3 handwritten digits from
scikit-learn's bundled 8x8 digits (1797 images, upscaled bicubically and used as an alpha mask),
each with a colour (red green blue yellow purple orange cyan white, jittered +-15 per channel), a
size (small 16 px / large 28 px squares by default) and a position; any two digit squares overlap
by at most `max_overlap` (default 0.15) of the smaller square, so every digit stays legible.
Handwriting is split by image: train scenes use 1197 source digits, validation 300 others, test and
test_heldout the 300 of `digits_captions`' test split, so test handwriting is unseen.
Compositional hold-out: the 10 colour-digit pairs in `HELDOUT_PAIRS` (one per digit: white zero,
purple one, cyan two, green three, orange four, white five, blue six, yellow seven, red eight,
purple nine) never appear in train, validation or test; every test_heldout scene has at least one.

Configs. `single`: exactly one digit, plus `label` (the digit; `supervised_keys` = image, label) -
for self-supervised pre-training and linear probes; a linear classifier on raw pixels is weak
there (experiments/digit_scenes_baselines.py measures it). `scenes`: 1-3 digits, full annotations.
Both have the same features (padded to the config's `max_digits`: 1 for single, 3 for scenes).
Custom sizes: `make_config("scenes", num_train=500, image_size=96, ...)` (see `DigitScenesConfig`).

Splits (default sizes, both configs): train 5000, validation 1000, test 1000 (in-distribution,
unseen handwriting), test_heldout 1000 (held-out colour-digit pairs: compositional generalisation).

Features (M = max_digits, P = num_proposals = 10, Q = num_questions = 8, C = num_captions = 5;
padding: ids -1, floats 0, strings "", masks False; boxes are (x1, y1, x2, y2) in [0, 1] of the
digit's square; every array is static-shaped so grain batches examples directly; string arrays
decode as object arrays of bytes - `arrays_only` drops them before device placement):
  image uint8 [S,S,3]; segmentation uint8 [S,S,1] (instance map: i + 1 where digit i's ink, alpha >=
      0.5, is on top; 0 background: foreground masks for background augmentation, or segmentation);
      id int64; num_digits int64; has_heldout_pair bool
  caption str (= captions[0], every digit left to right: "two digits: a small red seven and a
      large blue two"); captions str [C] (relations "... to the left of ...", positions, numerals
      "a red 7", bindings "the seven is red", colour counts "one red digit and two blue digits";
      at most 127 characters)
  boxes f32 [M,4]; box_mask bool [M]; box_digits, box_colours (into COLOUR_NAMES), box_sizes
      (into SIZE_NAMES), box_sources (sklearn image index) int32 [M]; box_occlusion f32 [M]
      (fraction of the digit's ink painted over); box_soft_labels f32 [M,11] over REGION_CLASSES
      (10 digits + background): a detector-like distribution, mostly the digit, the rest mostly
      on look-alikes (LOOKALIKES: 3/5/8, 1/7, 4/9, 6/0, ...) - the masked-region-modelling target
  proposal_boxes f32 [P,4], proposal_soft_labels f32 [P,11], proposal_mask bool [P],
      proposal_iou f32 [P] (IoU with the best true box), proposal_match int32 [P] (that box's
      index when IoU >= 0.5, else -1): two jittered copies of each true box plus 1..P-2n random
      boxes, most object-like first; soft labels blend the matched box's with background by IoU
  questions str [Q], answers str [Q], answer_ids int32 [Q] (into ANSWER_VOCAB, 26 answers),
      question_types int32 [Q] (into QUESTION_TYPES: colour count size position relation
      digit), question_mask bool [Q]
  label (single only) ClassLabel over CLASS_NAMES

Uses. SimCLR: `single` train (+ linear probe on `label`). CLIP: captions, zero-shot over
CLASS_NAMES with ZEROSHOT_TEMPLATES on `single`. CoCa, Show-Attend-Tell: captions. ViLBERT,
VL-BERT: proposals (+ soft labels for masked region modelling, boxes for location features)
with captions, and the QA pairs as VQA. mPLUG: captions + QA. Every system: test_heldout for
compositional generalisation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from colearn_jax.data import build_lock
from colearn_jax.data import digits as _digits
from colearn_jax.data import scene_annotate as A
from colearn_jax.data import scene_render as R
from colearn_jax.data.scene_annotate import (  # noqa: F401  (re-exported vocabularies)
    ANSWER_IDS, ANSWER_VOCAB, CLASS_NAMES, LOOKALIKES, QUESTION_TYPES, REGION_CLASSES)
from colearn_jax.data.scene_render import COLOUR_NAMES, SIZE_NAMES  # noqa: F401

NAME = "digit_scenes"
SPLITS = ("train", "validation", "test", "test_heldout")
# Colour-digit pairs (digit, colour index) held out of train / validation / test.
HELDOUT_PAIRS = frozenset((d, (3 * d) % len(COLOUR_NAMES)) for d in range(10))
default_data_dir = _digits.default_data_dir
ZEROSHOT_TEMPLATES = ("the digit {}", "one digit: a {}", "a small {}", "a large {}")
NUM_VALIDATION_SOURCES = 300  # Source handwriting images reserved for validation scenes.


@dataclasses.dataclass(eq=False)
class DigitScenesConfig(tfds.core.BuilderConfig):
    """Sizes and generation settings; invalid combinations raise ValueError on construction."""

    image_size: int = 64
    min_digits: int = 1
    max_digits: int = 3
    small_size: int = 16
    large_size: int = 28
    max_overlap: float = 0.15
    num_captions: int = 5
    num_questions: int = 8
    num_proposals: int = 10
    num_train: int = 5000
    num_validation: int = 1000
    num_test: int = 1000
    num_test_heldout: int = 1000
    seed: int = 0

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"digit_scenes config {self.name!r}: {msg}")

        need(1 <= self.max_digits <= 9, f"max_digits={self.max_digits} must be in [1, 9] (counts "
             "are answered with the number words up to nine).")
        need(1 <= self.min_digits <= self.max_digits,
             f"min_digits={self.min_digits} must be in [1, max_digits={self.max_digits}].")
        need(self.small_size >= 8, f"small_size={self.small_size} must be >= 8 px (the source "
             "handwriting is 8x8).")
        need(self.large_size > self.small_size,
             f"large_size={self.large_size} must exceed small_size={self.small_size}.")
        cells = math.ceil(math.sqrt(self.max_digits))
        need(self.image_size >= cells * self.large_size,
             f"image_size={self.image_size} is too small for max_digits={self.max_digits} "
             f"digits of large_size={self.large_size} px: needs >= {cells} x {self.large_size} = "
             f"{cells * self.large_size}. Raise image_size or lower large_size / max_digits.")
        need(0.0 <= self.max_overlap < 1.0, f"max_overlap={self.max_overlap} must be in [0, 1).")
        need(self.num_proposals >= 2 * self.max_digits + 1,
             f"num_proposals={self.num_proposals} must be >= 2 * max_digits + 1 = "
             f"{2 * self.max_digits + 1} (two jittered copies per digit plus a random box).")
        for key in ("num_captions", "num_questions", "num_train", "num_validation", "num_test",
                    "num_test_heldout"):
            need(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1.")
        need(self.seed >= 0, f"seed={self.seed} must be >= 0.")

    def params(self) -> dict:
        """The generation settings (every field but TFDS's own)."""
        base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in base}


CONFIGS = {
    "single": DigitScenesConfig(name="single", min_digits=1, max_digits=1,
                                description="One digit per image, with a `label`."),
    "scenes": DigitScenesConfig(name="scenes", description="1-3 digits per image."),
}


def make_config(base: str = "scenes", name: str | None = None, **overrides) -> DigitScenesConfig:
    """A config like `base` with `overrides`; its name defaults to `<base>_<hash of overrides>`."""
    if base not in CONFIGS:
        raise ValueError(f"Unknown {NAME} config {base!r}; choose one of {sorted(CONFIGS)}.")
    params = CONFIGS[base].params()
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"Unknown {NAME} config fields {unknown}; fields are {sorted(params)}.")
    params.update(overrides)
    if name is None:
        if not overrides:
            return CONFIGS[base]
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{base}_{digest}"
    return DigitScenesConfig(name=name, description=f"{base} with {overrides}", **params)


def source_pools(labels: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """Per split, per digit class: the sklearn image indices its scenes draw handwriting from."""
    rest, test = _digits.split_indices(labels)  # test = digits_captions' test images
    fit, val = _digits.split_indices(labels[rest], num_test=NUM_VALIDATION_SOURCES, seed=1)
    by_split = {"train": rest[fit], "validation": rest[val], "test": test, "test_heldout": test}
    return {s: {c: idx[labels[idx] == c] for c in range(10)} for s, idx in by_split.items()}


def generate_example(cfg: DigitScenesConfig, split: str, index: int, pools, glyphs) -> dict:
    """One example (numpy arrays and strings) as stored; a pure function of its arguments."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    n = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
    layout = R.sample_layout(
        rng, pool=pools[split], num_digits=n, image_size=cfg.image_size,
        digit_sides=(cfg.small_size, cfg.large_size), max_overlap=cfg.max_overlap,
        heldout=HELDOUT_PAIRS, want_heldout=split == "test_heldout")
    image, occlusion, segmentation = R.render(rng, layout, glyphs, cfg.image_size)
    captions = A.captions(rng, layout, cfg.image_size, cfg.num_captions)
    qa = A.questions(rng, layout, cfg.image_size, cfg.num_questions)
    soft = A.box_soft_labels(rng, layout, occlusion)
    p_boxes, p_soft, p_mask, p_iou, p_match = A.proposals(rng, layout, soft, cfg.image_size,
                                                          cfg.num_proposals)
    m, q = cfg.max_digits, cfg.num_questions

    def pad(x, dtype, fill=0):
        x = np.asarray(x, dtype)
        out = np.full((m,) + x.shape[1:], fill, dtype)
        out[:n] = x
        return out

    pad_q = lambda xs, fill: list(xs) + [fill] * (q - len(xs))  # noqa: E731
    example = {
        "image": image,
        "segmentation": segmentation[..., None],
        "id": index,
        "num_digits": n,
        "has_heldout_pair": any((int(d), int(c)) in HELDOUT_PAIRS
                                for d, c in zip(layout.digits, layout.colours)),
        "caption": captions[0],
        "captions": captions,
        "boxes": pad(layout.boxes / cfg.image_size, np.float32),
        "box_mask": pad(np.ones(n), np.bool_),
        "box_digits": pad(layout.digits, np.int32, -1),
        "box_colours": pad(layout.colours, np.int32, -1),
        "box_sizes": pad(layout.sizes, np.int32, -1),
        "box_sources": pad(layout.sources, np.int32, -1),
        "box_occlusion": pad(occlusion, np.float32),
        "box_soft_labels": pad(soft, np.float32),
        "proposal_boxes": p_boxes,
        "proposal_soft_labels": p_soft,
        "proposal_mask": p_mask,
        "proposal_iou": p_iou,
        "proposal_match": p_match,
        "questions": pad_q([x[0] for x in qa], ""),
        "answers": pad_q([x[1] for x in qa], ""),
        "answer_ids": np.asarray(pad_q([ANSWER_IDS[x[1]] for x in qa], -1), np.int32),
        "question_types": np.asarray(pad_q([x[2] for x in qa], -1), np.int32),
        "question_mask": np.arange(q) < len(qa),
    }
    if cfg.max_digits == 1:
        example["label"] = int(layout.digits[0])
    return example


class DigitScenes(tfds.core.GeneratorBasedBuilder):
    """Cluttered multi-digit scenes with captions, boxes, soft labels, proposals and QA."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Adds `segmentation` (per-pixel digit index); images and annotations unchanged."}
    BUILDER_CONFIGS = list(CONFIGS.values())
    DEFAULT_BUILDER_CONFIG_NAME = "scenes"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)  # TFDS's default lookup needs importlib_resources.

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        s, m, p, q = cfg.image_size, cfg.max_digits, cfg.num_proposals, cfg.num_questions
        t = lambda shape, dtype: tfds.features.Tensor(shape=shape, dtype=dtype)  # noqa: E731
        text = lambda k: t((k,), np.object_)  # noqa: E731  (decodes to an object array of bytes)
        k = len(REGION_CLASSES)
        features = {
            "image": tfds.features.Image(shape=(s, s, 3), dtype=np.uint8),
            "segmentation": tfds.features.Image(shape=(s, s, 1), dtype=np.uint8),
            "id": np.int64, "num_digits": np.int64, "has_heldout_pair": np.bool_,
            "caption": tfds.features.Text(), "captions": text(cfg.num_captions),
            "boxes": t((m, 4), np.float32), "box_mask": t((m,), np.bool_),
            "box_digits": t((m,), np.int32), "box_colours": t((m,), np.int32),
            "box_sizes": t((m,), np.int32), "box_sources": t((m,), np.int32),
            "box_occlusion": t((m,), np.float32), "box_soft_labels": t((m, k), np.float32),
            "proposal_boxes": t((p, 4), np.float32), "proposal_soft_labels": t((p, k), np.float32),
            "proposal_mask": t((p,), np.bool_), "proposal_iou": t((p,), np.float32),
            "proposal_match": t((p,), np.int32),
            "questions": text(q), "answers": text(q), "answer_ids": t((q,), np.int32),
            "question_types": t((q,), np.int32), "question_mask": t((q,), np.bool_),
        }
        if cfg.max_digits == 1:
            features["label"] = tfds.features.ClassLabel(names=list(CLASS_NAMES))
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label") if cfg.max_digits == 1 else None,
            description=__doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is generated; the handwriting ships with scikit-learn.
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

        source = load_digits()
        pools = source_pools(source.target.astype(int))
        glyphs = R.GlyphBank(source.images)
        cfg = self.builder_config
        return {split: self._generate_examples(split, getattr(cfg, f"num_{split}"), pools, glyphs)
                for split in SPLITS}

    def _generate_examples(self, split, count, pools, glyphs):
        from PIL import Image  # pylint: disable=import-outside-toplevel

        for i in range(count):
            example = generate_example(self.builder_config, split, i, pools, glyphs)
            png = io.BytesIO()  # PIL's PNG encoder: lossless, and faster than TFDS's TF graph.
            Image.fromarray(example["image"]).save(png, format="PNG", compress_level=1)
            example["image"] = png.getvalue()
            png = io.BytesIO()
            Image.fromarray(example["segmentation"][..., 0], mode="L").save(png, format="PNG", compress_level=1)
            example["segmentation"] = png.getvalue()
            yield i, example


def _resolve(config) -> DigitScenesConfig:
    if isinstance(config, DigitScenesConfig):
        if config.name in CONFIGS and config.params() != CONFIGS[config.name].params():
            raise ValueError(f"A custom {NAME} config may not reuse the name {config.name!r} of a "
                             "standard one; use make_config(base, **overrides).")
        return config
    if config not in CONFIGS:
        raise ValueError(f"Unknown {NAME} config {config!r}; choose one of {sorted(CONFIGS)} or "
                         f"pass make_config(base, **overrides).")
    return CONFIGS[config]


def ensure_built(data_dir: str | None = None, config="scenes") -> str:
    """Builds `digit_scenes/<config>` (array_record) under `data_dir` if needed; returns data_dir.

    `config` is a standard config name ("single", "scenes") or a `DigitScenesConfig`.
    """
    cfg = _resolve(config)
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    version_dir = os.path.join(data_dir, NAME, cfg.name, str(DigitScenes.VERSION))
    params_file = os.path.join(version_dir, "digit_scenes_config.json")
    with build_lock.exclusive(data_dir, f"{NAME}.{cfg.name}"):
        if os.path.exists(os.path.join(version_dir, "dataset_info.json")):
            if os.path.exists(params_file):
                with open(params_file) as f:
                    built = json.load(f)
                if built != cfg.params():
                    raise ValueError(f"{version_dir} was built with {built}, not {cfg.params()}; "
                                     "give the config another name or another data_dir.")
            return data_dir
        builder = DigitScenes(config=cfg, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        with open(params_file, "w") as f:
            json.dump(cfg.params(), f, indent=1, sort_keys=True)
    return data_dir


def prepare(data_dir: str | None, config: str) -> str:
    """For readers that name the config (`digit_scenes/<config>`): builds a standard config if
    needed; a custom one must already be built. Returns data_dir."""
    if config in CONFIGS:
        return ensure_built(data_dir, config)
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    if not os.path.isdir(os.path.join(data_dir, NAME, config)):
        raise ValueError(f"Unknown {NAME} config {config!r} (not standard, not built in "
                         f"{data_dir}); choose one of {sorted(CONFIGS)} or build a custom one first with "
                         "ensure_built(data_dir, make_config(base, **overrides)).")
    return data_dir


def data_source(split: str, data_dir: str | None = None, config="scenes"):
    """Random-access source of one split (built first if needed) for grain `MapDataset.source`."""
    cfg = _resolve(config)
    if split not in SPLITS:
        raise ValueError(f"{NAME} has no split {split!r}; it has {list(SPLITS)}.")
    data_dir = ensure_built(data_dir, cfg)
    return DigitScenes(config=cfg, data_dir=data_dir).as_data_source(split=split)


def arrays_only(example: dict) -> dict:
    """The example without its text features (strings cannot go onto devices; tokenise them)."""
    return {k: v for k, v in example.items() if np.asarray(v).dtype.kind not in "OSU"}
