"""Tests of the `digit_scenes` TFDS builder: schema, determinism, boxes against the rendered digits,
held-out combinations, the grain -> sharded-batch path, and argument errors. Small custom configs
are built once per module in a temporary data_dir (the default sizes are not built here)."""
import glob
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from colearn_jax import sharding
from colearn_jax.data import digit_scenes as D
from colearn_jax.data import pipeline
from colearn_jax.data import scene_render as R
from colearn_jax.data.tokenizers import ByteTokenizer

SMALL = dict(num_train=48, num_validation=16, num_test=24, num_test_heldout=24)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("scenes"))
    configs = {base: D.make_config(base, **SMALL) for base in ("scenes", "single")}
    for cfg in configs.values():
        D.ensure_built(data_dir, cfg)
    sources = {(base, split): D.data_source(split, data_dir, cfg)
               for base, cfg in configs.items() for split in D.SPLITS}
    return data_dir, configs, sources


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def _all(source):
    return [source[i] for i in range(len(source))]


def test_schema(built):
    _, configs, sources = built
    for base, cfg in configs.items():
        m, p, q, c = cfg.max_digits, cfg.num_proposals, cfg.num_questions, cfg.num_captions
        shapes = {
            "image": ((64, 64, 3), np.uint8), "segmentation": ((64, 64, 1), np.uint8),
            "boxes": ((m, 4), np.float32),
            "box_mask": ((m,), np.bool_), "box_digits": ((m,), np.int32),
            "box_colours": ((m,), np.int32), "box_sizes": ((m,), np.int32),
            "box_sources": ((m,), np.int32), "box_occlusion": ((m,), np.float32),
            "box_soft_labels": ((m, 11), np.float32), "proposal_boxes": ((p, 4), np.float32),
            "proposal_soft_labels": ((p, 11), np.float32), "proposal_mask": ((p,), np.bool_),
            "proposal_iou": ((p,), np.float32), "proposal_match": ((p,), np.int32),
            "answer_ids": ((q,), np.int32), "question_types": ((q,), np.int32),
            "question_mask": ((q,), np.bool_), "captions": ((c,), None),
            "questions": ((q,), None), "answers": ((q,), None),
        }
        scalars = {"id", "num_digits", "has_heldout_pair", "caption"}
        scalars |= {"label"} if m == 1 else set()
        assert (base, m) in {("single", 1), ("scenes", 3)}
        for split in D.SPLITS:
            examples = _all(sources[base, split])
            assert len(examples) == SMALL[f"num_{split}"]
            assert sorted(int(ex["id"]) for ex in examples) == list(range(len(examples)))
            for ex in examples:
                assert set(ex) == set(shapes) | scalars
                for key, (shape, dtype) in shapes.items():
                    assert ex[key].shape == shape, key
                    assert dtype is None or ex[key].dtype == dtype, key
                n = int(ex["num_digits"])
                assert cfg.min_digits <= n <= m
                assert ex["box_mask"].tolist() == [True] * n + [False] * (m - n)
                assert np.all(ex["box_digits"][n:] == -1) and np.all(ex["box_digits"][:n] >= 0)
                assert np.all((ex["boxes"] >= 0) & (ex["boxes"] <= 1))
                np.testing.assert_allclose(ex["box_soft_labels"][:n].sum(-1), 1, atol=1e-5)
                assert np.all(ex["box_soft_labels"][:n].argmax(-1) == ex["box_digits"][:n])
                k = int(ex["proposal_mask"].sum())
                assert 2 * n + 1 <= k <= p and ex["proposal_mask"][:k].all()
                np.testing.assert_allclose(ex["proposal_soft_labels"][:k].sum(-1), 1, atol=1e-5)
                assert set(ex["proposal_match"].tolist()) <= set(range(-1, n))
                centres = (ex["boxes"][:n, 0] + ex["boxes"][:n, 2]) / 2
                assert np.all(np.diff(centres) >= 0)  # stored left to right
                captions = [s.decode() for s in ex["captions"]]
                assert ex["caption"].decode() == captions[0] and all(captions)
                assert max(map(len, captions)) <= 127  # the data card's bound
                qm = ex["question_mask"]
                assert qm.sum() >= 4 and qm.tolist() == sorted(qm.tolist(), reverse=True)
                answers = [a.decode() for a, ok in zip(ex["answers"], qm) if ok]
                assert answers == [D.ANSWER_VOCAB[i] for i in ex["answer_ids"][qm]]
                assert np.all(ex["answer_ids"][~qm] == -1)
                assert np.all(ex["question_types"][~qm] == -1)
                for question, answer in zip(ex["questions"][qm], answers):
                    if question == b"how many digits are there?":
                        assert answer == D.CLASS_NAMES[n]
                if m == 1:
                    assert ex["label"] == ex["box_digits"][0]
    info = tfds.builder(f"digit_scenes/{configs['single'].name}", data_dir=built[0]).info
    assert info.supervised_keys == ("image", "label")
    assert len(D.ANSWER_VOCAB) == len(set(D.ANSWER_VOCAB)) and len(D.REGION_CLASSES) == 11


def test_captions_and_questions_cover_every_type(built):
    _, _, sources = built
    examples = _all(sources["scenes", "train"])
    types = {int(t) for ex in examples for t in ex["question_types"] if t >= 0}
    assert types == set(range(len(D.QUESTION_TYPES)))
    first = examples[0]
    caption = first["caption"].decode()
    for i in range(int(first["num_digits"])):
        words = (D.SIZE_NAMES[first["box_sizes"][i]], D.COLOUR_NAMES[first["box_colours"][i]],
                 D.CLASS_NAMES[first["box_digits"][i]])
        assert " ".join(words) in caption
    relations = [c for ex in examples for c in ex["captions"] if b" to the left of " in c]
    assert relations


def test_word_vocabulary_covers_every_caption_question_and_answer(built):
    """The built-in "digit_scenes" word list (`tokenizer="words"`) has every word the generator
    writes: no <unk> over all splits of both configs, and captions round-trip exactly."""
    from colearn_jax.data.tokenizers import get_tokenizer

    _, _, sources = built
    tok = get_tokenizer("words", "digit_scenes")
    texts = [t.decode() for src in sources.values() for ex in _all(src)
             for t in [*ex["captions"], *ex["questions"], *ex["answers"]] if t]
    assert len(texts) > 1000
    unknown = [t for t in texts if tok.unk_id in tok.encode(t)]
    assert not unknown, unknown[:3]
    assert all(tok.decode(tok.encode(t)) == t for t in texts)


def test_seed_determinism(tmp_path, built, sklearn_digits):
    tiny = dict(num_train=6, num_validation=3, num_test=3, num_test_heldout=3)
    a, b, c = (str(tmp_path / k) for k in "abc")
    D.ensure_built(a, D.make_config("scenes", **tiny))
    D.ensure_built(b, D.make_config("scenes", **tiny))
    other = D.make_config("scenes", seed=1, **tiny)
    D.ensure_built(c, other)
    records = lambda d: sorted(  # noqa: E731
        glob.glob(os.path.join(d, "digit_scenes", "*", "*", "*.array_record*")))
    assert len(records(a)) == len(D.SPLITS)
    for fa, fb in zip(records(a), records(b)):
        with open(fa, "rb") as x, open(fb, "rb") as y:
            assert x.read() == y.read(), fa  # same seed: identical bytes
    same = D.data_source("train", a, D.make_config("scenes", **tiny))
    diff = D.data_source("train", c, other)
    assert not any(np.array_equal(same[i]["image"], diff[i]["image"]) for i in range(len(same)))
    # The generator alone, too: a pure function of (config, split, index).
    pools = D.source_pools(sklearn_digits.target)
    glyphs = R.GlyphBank(sklearn_digits.images)
    cfg = built[1]["scenes"]
    e1, e2 = (D.generate_example(cfg, "test", 5, pools, glyphs) for _ in range(2))
    for key in e1:
        np.testing.assert_array_equal(np.asarray(e1[key]), np.asarray(e2[key]))


def _ink_8x8(image, box, colour) -> np.ndarray:
    """The crop under `box` as an 8x8 ink map (0..16): each pixel's projection from the crop's
    border (background) colour onto the digit's named colour."""
    s = image.shape[0]
    x1, y1, x2, y2 = np.round(np.asarray(box) * s).astype(int)
    crop = image[y1:y2, x1:x2].astype(np.float64)
    ink = np.asarray(R.COLOURS[D.COLOUR_NAMES[colour]], np.float64)
    bg = np.median(np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]]), 0)
    alpha = np.clip((crop - bg) @ (ink - bg) / max(((ink - bg) ** 2).sum(), 1.0), 0, 1)
    small = Image.fromarray(alpha.astype(np.float32), mode="F").resize((8, 8), Image.Resampling.BOX)
    return np.asarray(small).ravel() * 16


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn: constant pixels, 1797 "classes"
def test_boxes_match_rendered_digits(built, sklearn_digits):
    """Each box's crop, read back as an 8x8 ink map, is classified as its digit by a
    nearest-centroid classifier fitted on the source digits, and its nearest source image is its
    `box_sources`; boxes moved sideways by half a digit fail both."""
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

    source = sklearn_digits.images.reshape(len(sklearn_digits.images), -1)
    centroid = NearestCentroid().fit(source, sklearn_digits.target)
    nearest = KNeighborsClassifier(1).fit(source, np.arange(len(source)))
    _, _, sources = built
    feats, shifted, labels, ids = [], [], [], []
    for split in ("train", "test"):
        for ex in _all(sources["scenes", split]):
            for i in range(int(ex["num_digits"])):
                box = ex["boxes"][i]
                feats.append(_ink_8x8(ex["image"], box, ex["box_colours"][i]))
                w = box[2] - box[0]
                off = box + np.array([1, 0, 1, 0]) * (w / 2 if box[0] < 0.5 else -w / 2)
                shifted.append(_ink_8x8(ex["image"], np.clip(off, 0, 1), ex["box_colours"][i]))
                labels.append(ex["box_digits"][i])
                ids.append(ex["box_sources"][i])
    labels, ids, feats, shifted = map(np.asarray, (labels, ids, feats, shifted))
    assert len(labels) >= 100
    accuracy = (centroid.predict(feats) == labels).mean()
    same_source = (nearest.predict(feats) == ids).mean()
    assert accuracy >= 0.85 and same_source >= 0.85, (accuracy, same_source)  # ~0.90, ~0.94
    assert (centroid.predict(shifted) == labels).mean() < 0.35
    assert (nearest.predict(shifted) == ids).mean() < 0.1


def test_segmentation_marks_each_digits_ink(built):
    """Digit i's segment (value i + 1) lies inside its box, is non-empty unless painted over, and its
    pixels have the digit's named colour (nearest of the eight); nothing is marked outside the boxes."""
    _, _, sources = built
    checked = 0
    for base in ("single", "scenes"):
        for ex in _all(sources[base, "train"])[:24]:
            seg, image, n = ex["segmentation"][..., 0], ex["image"].astype(np.float64), int(ex["num_digits"])
            assert set(np.unique(seg).tolist()) <= set(range(n + 1))
            inside = np.zeros(seg.shape, bool)
            for i in range(n):
                x1, y1, x2, y2 = np.round(ex["boxes"][i] * 64).astype(int)
                inside[y1:y2, x1:x2] = True
                ys, xs = np.nonzero(seg == i + 1)
                if ex["box_occlusion"][i] < 0.5:
                    assert len(ys) >= 10, (base, ex["id"], i)
                if len(ys) == 0:
                    continue
                assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2
                colours = np.asarray([R.COLOURS[c] for c in D.COLOUR_NAMES], np.float64)
                mean = image[seg == i + 1].mean(0)
                assert np.argmin(((colours - mean) ** 2).sum(-1)) == ex["box_colours"][i], (base, ex["id"], i)
                checked += 1
            assert not np.any(seg[~inside])
    assert checked >= 30


def test_heldout_combinations(built, sklearn_digits):
    _, _, sources = built
    pairs = lambda ex: {(int(d), int(c)) for d, c, ok in  # noqa: E731
                        zip(ex["box_digits"], ex["box_colours"], ex["box_mask"]) if ok}
    assert len(D.HELDOUT_PAIRS) == 10 and {d for d, _ in D.HELDOUT_PAIRS} == set(range(10))
    for base in ("scenes", "single"):
        for split in ("train", "validation", "test"):
            for ex in _all(sources[base, split]):
                assert not pairs(ex) & D.HELDOUT_PAIRS and not ex["has_heldout_pair"]
        for ex in _all(sources[base, "test_heldout"]):
            assert pairs(ex) & D.HELDOUT_PAIRS and ex["has_heldout_pair"]
    # Many more layouts than the small build holds: no held-out pair outside test_heldout.
    pools = D.source_pools(sklearn_digits.target)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(1500):
        layout = R.sample_layout(rng, pool=pools["train"], num_digits=3, image_size=64,
                                 digit_sides=(16, 28), max_overlap=0.15, heldout=D.HELDOUT_PAIRS,
                                 want_heldout=False)
        seen |= {(int(d), int(c)) for d, c in zip(layout.digits, layout.colours)}
    assert not seen & D.HELDOUT_PAIRS and len(seen) == 80 - 10
    # Handwriting: train / validation / test scenes draw on disjoint source images.
    src = {s: set(np.concatenate(list(pools[s].values())).tolist()) for s in D.SPLITS}
    assert not src["train"] & src["validation"] and not src["train"] & src["test"]
    assert not src["validation"] & src["test"] and src["test"] == src["test_heldout"]
    used = {int(s) for ex in _all(sources["scenes", "test"]) for s in ex["box_sources"] if s >= 0}
    assert used <= src["test"]


def test_grain_sharded_batches(built):
    import grain

    assert jax.device_count() == 8
    _, _, sources = built
    mesh = sharding.make_mesh({"data": -1})
    rules = sharding.get_rules("dp")
    ds = grain.MapDataset.source(sources["scenes", "train"]).seed(0).shuffle()
    ds = ds.map(D.arrays_only).batch(16, drop_remainder=True)
    batch = sharding.shard_batch(next(iter(ds)), mesh, rules)
    assert batch["image"].shape == (16, 64, 64, 3) and batch["proposal_boxes"].shape == (16, 10, 4)
    assert batch["box_soft_labels"].shape == (16, 3, 11) and batch["answer_ids"].shape == (16, 8)
    assert "captions" not in batch and "questions" not in batch
    for x in jax.tree.leaves(batch):
        assert isinstance(x.sharding, NamedSharding) and x.sharding.spec == P(("data", "fsdp"))
        assert [s.data.shape[0] for s in x.addressable_shards] == [2] * 8


def test_clip_pipeline_reads_single(built):
    data_dir, configs, _ = built
    cfg = pipeline.default_data_config()
    cfg.update(name=f"digit_scenes/{configs['single'].name}", data_dir=data_dir, image_size=64,
               context_length=48, batch_size=8, eval_batch_size=8)
    b = next(pipeline.make_train_iterator(cfg, ByteTokenizer(), seed=0))
    assert b["image"].shape == (8, 64, 64, 3) and b["text"].shape == (8, 48)
    assert b["label"].shape == (8,) and b["label"].max() <= 9


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_digits=0 must be in \\[1, 9\\]"):
        D.make_config("scenes", max_digits=0)
    with pytest.raises(ValueError, match="image_size=40 is too small .* needs >= 2 x 28 = 56"):
        D.make_config("scenes", image_size=40)
    with pytest.raises(ValueError, match="small_size=4 must be >= 8"):
        D.make_config("single", small_size=4)
    with pytest.raises(ValueError, match="large_size=16 must exceed small_size=16"):
        D.make_config("single", large_size=16)
    with pytest.raises(ValueError, match="min_digits=3 must be in"):
        D.make_config("scenes", min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="num_proposals=6 must be >= 2 \\* max_digits \\+ 1 = 7"):
        D.make_config("scenes", num_proposals=6)
    with pytest.raises(ValueError, match="num_train=0 must be >= 1"):
        D.make_config("scenes", num_train=0)
    with pytest.raises(ValueError, match="Unknown digit_scenes config 'pairs'.*'scenes', 'single'"):
        D.ensure_built(str(tmp_path), "pairs")
    with pytest.raises(ValueError, match="Unknown digit_scenes config 'pairs'"):
        D.make_config("pairs")
    with pytest.raises(ValueError, match="Unknown digit_scenes config fields \\['num_digits'\\]"):
        D.make_config("scenes", num_digits=2)
    with pytest.raises(ValueError, match="may not reuse the name 'scenes'"):
        D.ensure_built(str(tmp_path), D.DigitScenesConfig(name="scenes", num_train=5))
    with pytest.raises(ValueError, match="Unknown digit_scenes config 'scenes_big' .not standard"):
        pipeline.make_source("digit_scenes/scenes_big", "train", str(tmp_path))
    with pytest.raises(ValueError, match="no split 'val'"):
        D.data_source("val", str(tmp_path), "scenes")
    assert not os.listdir(tmp_path)  # nothing was built


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_baselines_script_on_small_data(built, tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "digit_scenes_baselines.py")
    spec = importlib.util.spec_from_file_location("digit_scenes_baselines", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, _, sources = built
    data = {base: {s: _all(sources[base, s]) for s in D.SPLITS} for base in ("single", "scenes")}
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # BLAS threads only spin on a tiny problem
        probe = script.linear_probe(data["single"], cs=(1.0,), max_iter=20)
    assert set(probe) >= {"train_top1", "validation_top1", "test_top1", "test_heldout_top1"}
    qa = script.qa_majority(data["scenes"])
    assert qa["majority_answer"] in D.ANSWER_VOCAB
    assert 0 < qa["test"]["global_majority"] < 1 and 0 < qa["test"]["per_type_majority"] < 1
    assert sum(r["count"] for r in qa["test"]["per_type"].values()) == qa["test"]["questions"]
    script.write_grid(data["scenes"]["test"][:4], str(tmp_path / "grid.png"), rows=1)
    assert Image.open(tmp_path / "grid.png").size[0] > 400
