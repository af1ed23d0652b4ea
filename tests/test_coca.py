"""CoCa (colearn_jax/models/coca.py, coca_system.py, configs/coca.py): shapes and logical axis names,
both pooler layouts, cached == uncached captions, the objective's parts, the config presets and a
tiny training run through the generic loop with the zero-shot + caption evaluator."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colearn_jax import decoding
from colearn_jax.losses import lm
from colearn_jax.models import get_system
from colearn_jax.models.coca import decode_fns
from tests.helpers import load_config, synthetic_clip_batch


def _config(**model):
    c = load_config("coca.py:tiny")
    c.unlock()
    c.model.update(model)
    return c


@pytest.mark.parametrize("pooler,tie,memory_ln", [("open_clip", False, True), ("paper", True, False)])
def test_shapes_axis_names_and_cached_captions(pooler, tie, memory_ln):
    config = _config(pooler=pooler, tie_embeddings=tie, legacy_cls_mask=pooler == "open_clip")
    config.model.decoder.memory_ln = memory_ln
    system = get_system("coca")
    system.validate_config(config)
    model = system.build_model(config)
    batch = synthetic_clip_batch(config, batch_size=4)
    boxed = model.init(jax.random.PRNGKey(0), batch)
    # every parameter carries logical axis names, one per dimension
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
    variables = nn.unbox(boxed)
    params = variables["params"]
    assert ("text_projection" in params["decoder"]) != tie
    assert ("attn_pool" in params) == (pooler == "open_clip")
    assert ("contrastive_pool" in params and "caption_pool" in params) == (pooler == "paper")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params["decoder"])[0]]
    assert any("ln_memory" in p for p in paths) == memory_ln
    out = model.apply(variables, batch)
    b, length, vocab = 4, config.data.context_length, config.model.text.vocab_size
    assert out["logits"].shape == (b, length - 1, vocab)
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, atol=1e-5)
    # the decoder is causal: changing the last token changes no earlier logit
    changed = dict(batch, text=batch["text"].copy())
    changed["text"][:, -2] = 7
    out2 = model.apply(variables, changed)
    np.testing.assert_allclose(out2["logits"][:, :-2], out["logits"][:, :-2], atol=1e-5)
    assert not np.allclose(out2["logits"][:, -1], out["logits"][:, -1], atol=1e-5)

    new = 10
    cfg = decoding.DecodeConfig(max_new_tokens=new, eos_id=258, return_logits=True)
    prompt = jnp.full((4, 1), 257, jnp.int32)
    cached = decoding.generate(*decode_fns(model, 1 + new), variables, batch["image"], prompt, cfg)
    uncached = decoding.generate(*decode_fns(model, 1 + new, False), variables, batch["image"], prompt, cfg)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_allclose(cached.logits, uncached.logits, atol=1e-5, rtol=0)
    beam = decoding.DecodeConfig(max_new_tokens=new, eos_id=258, method="beam", num_beams=2)
    np.testing.assert_array_equal(
        decoding.generate(*decode_fns(model, 1 + new), variables, batch["image"], prompt, beam).tokens,
        decoding.generate(*decode_fns(model, 1 + new, False), variables, batch["image"], prompt, beam).tokens)


def test_objective_is_weighted_sum_and_ignores_padding():
    config = _config()
    system = get_system("coca")
    model = system.build_model(config)
    batch = synthetic_clip_batch(config, batch_size=8, seed=3)
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), batch))
    out = model.apply(variables, batch)
    loss, metrics = system.make_objective(config)(out, batch, {}, 0)
    assert np.isclose(float(loss), float(metrics["contrastive_loss"]) + 2.0 * float(metrics["caption_loss"]), rtol=1e-6)
    # the caption loss by hand: mean CE over non-padding targets
    logp = jax.nn.log_softmax(out["logits"])
    targets = batch["text"][:, 1:]
    nll = -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]
    real = targets != 0
    np.testing.assert_allclose(float(metrics["caption_loss"]), nll[real].mean(), rtol=1e-5)
    # padding targets change nothing; label smoothing does
    logits = out["logits"].at[:, :, 5].add(jnp.where(jnp.asarray(real)[..., None], 0.0, 100.0)[..., 0])
    assert np.isclose(float(lm.caption_loss(logits, targets)[0]), float(metrics["caption_loss"]), rtol=1e-6)
    smooth = float(lm.caption_loss(out["logits"], targets, label_smoothing=0.1)[0])
    assert abs(smooth - float(metrics["caption_loss"])) > 1e-4
    config.loss.update(lambda_con=0.5, lambda_cap=0.0)
    loss, metrics = system.make_objective(config)(out, batch, {}, 0)
    assert np.isclose(float(loss), 0.5 * float(metrics["contrastive_loss"]), rtol=1e-6)


@pytest.mark.parametrize("tag_loss", ["softmax", "sigmoid"])
def test_tagging_head_and_loss(tag_loss):
    """The optional tagging loss (loss.lambda_tag): multi-hot targets from -1-padded ids (a repeated tag
    counts once), the weighted sum by hand for both forms, and "max" pooling scores each tag by its best
    token (never below the mean token's score: max of affine maps >= affine map of the mean)."""
    from colearn_jax.models.coca_system import tag_targets  # noqa: PLC0415

    config = _config(num_tags=10)
    config.loss.update(lambda_tag=1.5, tag_loss=tag_loss)
    config.data.update(tag_key="tags", tag_slots=3)
    system = get_system("coca")
    system.validate_config(config)
    assert system.example_batch(config, 4)["tags"].shape == (4, 3)
    model = system.build_model(config)
    batch = synthetic_clip_batch(config, batch_size=4, seed=1)
    batch["tags"] = np.array([[3, -1, -1], [0, 9, 9], [1, 2, 4], [-1, -1, -1]], np.int32)
    targets = np.asarray(tag_targets(jnp.asarray(batch["tags"]), 10))
    expected = np.zeros((4, 10), np.float32)
    expected[0, 3] = expected[1, [0, 9]] = expected[2, [1, 2, 4]] = 1
    np.testing.assert_array_equal(targets, expected)

    variables = nn.unbox(model.init(jax.random.PRNGKey(0), batch))
    out = model.apply(variables, batch)
    assert out["tag_logits"].shape == (4, 10)
    loss, metrics = system.make_objective(config)(out, batch, {}, 0)
    z = np.asarray(out["tag_logits"], np.float64)[:3]  # the last row has no tags
    t = expected[:3]
    if tag_loss == "softmax":
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        tag_rows = -(t / t.sum(-1, keepdims=True) * logp).sum(-1)
        np.testing.assert_allclose(float(metrics["tag_loss"]), tag_rows.sum() / 4, rtol=1e-5)  # untagged row: 0
    else:
        z4 = np.asarray(out["tag_logits"], np.float64)
        bce = np.maximum(z4, 0) - z4 * expected + np.log1p(np.exp(-np.abs(z4)))
        np.testing.assert_allclose(float(metrics["tag_loss"]), bce.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(metrics["contrastive_loss"]) + 2.0 * float(metrics["caption_loss"])
                               + 1.5 * float(metrics["tag_loss"]), rtol=1e-6)
    best = np.asarray(out["tag_logits"]).argmax(-1)
    np.testing.assert_allclose(float(metrics["tag_top1"]), expected[np.arange(4), best].mean())

    config.model.tag_pool = "max"
    maxed = system.build_model(config).apply(variables, batch)["tag_logits"]
    assert (np.asarray(maxed) >= np.asarray(out["tag_logits"]) - 1e-5).all()
    assert not np.allclose(maxed, out["tag_logits"], atol=1e-3)

    for key, value, match in (("data.tag_key", None, "config.data.tag_key"), ("model.num_tags", 0, "model.num_tags"),
                              ("loss.tag_loss", "focal", "config.loss.tag_loss"),
                              ("model.tag_pool", "attention", "config.model.tag_pool")):
        bad = _config(num_tags=10)
        bad.loss.update(lambda_tag=1.0)
        bad.data.update(tag_key="tags")
        section, field = key.split(".")
        bad[section][field] = value
        with pytest.raises(ValueError, match=match):
            system.validate_config(bad)


def test_affine_augmentation_is_an_on_device_batch_transform():
    """augment.affine: training images are warped on device with the step's augment key (rows differ, the
    same key gives the same batch; augment.elastic_alpha adds an elastic distortion); off (the default),
    CoCa needs no batch transform."""
    from colearn_jax.models.coca_system import make_batch_transform  # noqa: PLC0415
    from colearn_jax.train.rng import step_keys  # noqa: PLC0415

    assert make_batch_transform(_config()) is None
    config = _config()
    config.augment.affine = True
    transform = make_batch_transform(config)
    batch = synthetic_clip_batch(config, batch_size=4, seed=2)
    keys = step_keys(jax.random.PRNGKey(0), 3, ("dropout", "augment"))
    out = transform(batch, keys, 3)
    assert out["image"].shape == batch["image"].shape and out["image"].dtype == batch["image"].dtype
    np.testing.assert_array_equal(out["text"], batch["text"])
    assert not np.allclose(out["image"], batch["image"], atol=1e-3)
    np.testing.assert_array_equal(transform(batch, keys, 3)["image"], out["image"])
    other = transform(batch, step_keys(jax.random.PRNGKey(0), 4, ("dropout", "augment")), 4)["image"]
    assert not np.allclose(other, out["image"], atol=1e-3)
    config.augment.elastic_alpha = 3.0  # + an elastic distortion, in the same resampling
    elastic = make_batch_transform(config)(batch, keys, 3)["image"]
    assert elastic.shape == out["image"].shape and not np.allclose(elastic, out["image"], atol=1e-3)


def test_token_tags_are_each_patch_ink_shares_and_warp_with_the_image():
    """loss.lambda_token_tag (token labelling): "token_tags" hold each patch's share of each instance class's
    ink (by hand on a 16 px, 2x2-patch map); an identity warp leaves them as they are and a real one moves
    them with the image; the loss averages softmax cross-entropy over inked tokens only, and a config
    without the instance map or its classes is refused by name."""
    from colearn_jax.models.coca_system import make_batch_transform, token_tag_loss  # noqa: PLC0415
    from colearn_jax.train.rng import step_keys  # noqa: PLC0415

    config = _config(num_tags=10)  # 16 px, patch 8: tokens = the four 8x8 quadrants
    config.loss.update(lambda_token_tag=1.0)
    config.data.update(tag_key="tags", tag_slots=3, segmentation_key="seg")
    system = get_system("coca")
    system.validate_config(config)
    assert system.example_batch(config, 2)["seg"].shape == (2, 16, 16, 1)
    seg = np.zeros((2, 16, 16, 1), np.uint8)
    seg[0, :8, :8] = 1           # instance 0 (class 7) fills the top-left patch
    seg[0, 8:, 8:12] = 2         # instance 1 (class 3) covers half the bottom-right patch ...
    seg[0, 8:10, 12:] = 1        # ... and instance 0 an eighth of it
    seg[1, 8:9, :4] = 1          # example 1: 4 pixels of class 5 in the bottom-left patch (1/16 < 0.1)
    batch = synthetic_clip_batch(config, batch_size=2, seed=1)
    batch.update(seg=seg, tags=np.array([[7, 3, -1], [5, -1, -1]], np.int32))
    keys = step_keys(jax.random.PRNGKey(0), 3, ("dropout", "augment"))
    shares = np.asarray(make_batch_transform(config)(batch, keys, 3)["token_tags"])
    expected = np.zeros((2, 4, 10))
    expected[0, 0, 7] = 1.0
    expected[0, 3, 3], expected[0, 3, 7] = 0.5, 0.125
    expected[1, 2, 5] = 4 / 64
    np.testing.assert_allclose(shares, expected, atol=1e-6)

    config.augment.update(affine=True, rotate=0.0, scale=(1.0, 1.0), shear=0.0)  # identity warp
    out = make_batch_transform(config)(batch, keys, 3)
    np.testing.assert_allclose(out["token_tags"], expected, atol=1e-5)
    np.testing.assert_allclose(out["image"], batch["image"], atol=1e-5)
    config.augment.update(rotate=30.0)
    moved = np.asarray(make_batch_transform(config)(batch, keys, 3)["token_tags"])
    assert not np.allclose(moved, expected, atol=1e-2) and np.isclose(moved[0].sum(), expected[0].sum(), rtol=0.3)

    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 10))
    loss, metrics = token_tag_loss(logits, jnp.asarray(expected))
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    by_hand = (-logp[0, 0, 7] - (0.5 * logp[0, 3, 3] + 0.125 * logp[0, 3, 7]) / 0.625) / 2  # two inked tokens
    np.testing.assert_allclose(float(loss), by_hand, rtol=1e-5)
    assert 0.0 <= float(metrics["token_tag_top1"]) <= 1.0

    variables = system.build_model(config).init(jax.random.PRNGKey(0), {k: batch[k] for k in ("image", "text")})
    out = system.build_model(config).apply(variables, {k: batch[k] for k in ("image", "text")})
    assert out["token_tag_logits"].shape == (2, 4, 10)
    for key in ("data.segmentation_key", "data.tag_key"):
        bad = config.copy_and_resolve_references()
        bad.unlock()
        section, name = key.split(".")
        bad[section][name] = None
        with pytest.raises(ValueError, match=key):
            system.validate_config(bad)


def test_scenes_tagged_pipeline_carries_the_digits_its_captions_name():
    """`scenes_tagged`: the train pipeline carries each scene's `box_digits`, and they are the digits the
    caption names (the caption lists every digit; "one/two/three digits:" opens it)."""
    from colearn_jax.models import DataContext, clip_system  # noqa: PLC0415

    config = load_config("coca.py:scenes_tagged")
    config.unlock()
    config.data.batch_size = 16
    system = get_system("coca")
    system.validate_config(config)
    batch = next(iter(system.make_train_data(config, DataContext(seed=0))))
    tags = np.asarray(batch["box_digits"])
    assert tags.shape == (16, 3) and tags.min() >= -1 and tags.max() <= 9
    names = list(config.eval.class_names)
    tok = clip_system.tokenizer(config)
    from colearn_jax.evals import captioning  # noqa: PLC0415

    for ids, row in zip(np.asarray(batch["text"]), tags):
        words = captioning.decode_generated(ids[None], tok)[0].replace(",", " ").split()
        named = sorted(names.index(w) for w in words[2:] if w in names)  # words[:2]: "two digits:"
        assert named == sorted(int(d) for d in row if d >= 0), (words, row)


def test_lever_study_reads_digits_under_teacher_forcing():
    """experiments/coca_digit_levers.py: only digit words after the first word count (not the count word),
    per digit and per caption."""
    from tests.helpers import load_experiment  # noqa: PLC0415

    levers = load_experiment("coca_digit_levers")
    start, digits = 9, np.arange(20, 30)  # digit word d has id 20 + d
    text = np.array([[9, 21, 5, 6, 23, 7, 0],     # "one digit: ... three": count word 1, digit 3
                     [9, 22, 5, 24, 6, 27, 8]])   # "two digits: ... four ... seven"
    logits = np.zeros((2, 6, 40))
    logits[0, 3, 23] = logits[1, 2, 24] = logits[1, 4, 20] = 1.0  # right 3, right 4, wrong 7 (says 0)
    per_digit, every = levers.digit_reading(logits, text, digits, start)
    assert np.isclose(per_digit, 2 / 3) and np.isclose(every, 0.5)


def test_presets_validate_and_have_their_command():
    system = get_system("coca")
    for preset in ("tiny", "scenes", "scenes_tagged", "base", "large"):
        config = load_config(f"coca.py:{preset}")
        system.validate_config(config)
    import colearn_jax.configs.coca as cfgmod
    for fn in cfgmod.PRESETS.values():
        assert fn.__doc__.strip().startswith("python experiments/train.py --config=configs/coca.py:")
    base = load_config("coca.py:base")
    assert (base.model.vision.width, base.model.text.width, base.model.embed_dim, base.model.num_queries) == (
        768, 512, 512, 256)
    bad = load_config("coca.py:tiny")
    bad.unlock()
    bad.model.pooler = "cascade"
    with pytest.raises(ValueError, match="config.model.pooler"):
        system.validate_config(bad)
    bad = load_config("coca.py:tiny")
    bad.unlock()
    bad.eval.caption_max_new_tokens = 99
    with pytest.raises(ValueError, match="caption_max_new_tokens"):
        system.validate_config(bad)


def test_tiny_training_run_with_evaluator(tmp_path):
    from colearn_jax.train import loop

    config = load_config("coca.py:tiny")
    config.unlock()
    config.train.update(num_steps=4, eval_every=4, checkpoint_every=4, log_every=2)
    config.mesh.update(data=2)
    state = loop.train(config, str(tmp_path), devices=jax.devices()[:2])
    assert int(state.step) == 4
    import json
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    evals = [x for x in lines if "eval/caption_exact" in x]
    names = ("eval/zeroshot_top1", "eval/caption_digits_correct", "eval/caption_exact")
    assert evals and set(names) <= set(evals[-1]), lines
    assert all(0.0 <= evals[-1][k] <= 1.0 for k in names)
    train = [x for x in lines if "train/caption_loss" in x]
    assert train and np.isfinite(train[-1]["train/caption_loss"]) and np.isfinite(train[-1]["train/loss"]), train


def _scripted_decode_fns(model, max_length):
    """Engine functions that emit the ids held in `inputs` [B, T] (a stand-in model: the evaluator's
    metrics on known captions)."""
    vocab = 259

    def prefill(variables, ids, prompt):
        ids = ids.astype(jnp.int32)
        return 10.0 * jax.nn.one_hot(ids[:, 0], vocab), {"ids": ids, "t": jnp.zeros((), jnp.int32)}

    def step(variables, cache, tokens):
        t = cache["t"] + 1
        logits = 10.0 * jax.nn.one_hot(jnp.take(cache["ids"], t, axis=1, mode="clip"), vocab)
        return logits, {"ids": cache["ids"], "t": t}

    return prefill, step


def test_caption_evaluator_digits_correct_is_order_free_multiset():
    """`caption_digits_correct` is `captioning.classes_named_correctly` against the reference: order
    swapped counts, a wrong, missing or extra digit does not, and the "two digits:" prefix is no digit."""
    from colearn_jax import sharding
    from colearn_jax.data import ByteTokenizer
    from colearn_jax.evals import caption_eval, captioning

    config = load_config("coca.py:tiny")
    config.unlock()
    config.eval.update(caption_max_new_tokens=23, caption_max_batches=0)
    pairs = [  # (reference, generated, names the digits correctly)
        ("two digits: seven two", "two digits: two seven", True),  # order swapped
        ("one digit: a four", "one digit: a four", True),
        ("two digits: one nine", "two digits: one one", False),  # a wrong digit
        ("two digits: six six", "one digit: a six", False),  # a missing one
        ("one digit: a three", "two digits: three", True),  # the count prefix is not a "two"
        ("one digit: an eight", "one digit: eight zero", False),  # an extra one
    ]
    tok = ByteTokenizer()
    rows = 8  # two padding rows
    gen = np.full((rows, 24), tok.eot_id, np.float32)
    for i, (_, g, _) in enumerate(pairs):
        gen[i, :len(g)] = tok.encode(g)
    refs = [r for r, _, _ in pairs] + ["", ""]
    batch = {"image": gen, "text": tok(refs, 24), "mask": np.arange(rows) < len(pairs)}
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "model": 1}, jax.devices()[:2])
    evaluate = caption_eval.make_caption_evaluator(config, mesh, sharding.get_rules("dp"), lambda: iter([batch]),
                                                   _scripted_decode_fns, tok)
    metrics = evaluate(None, {})
    assert set(metrics) == set(caption_eval.metric_specs(config))
    assert metrics["caption_exact"] == pytest.approx(1 / 6)
    expected = np.mean([ok for _, _, ok in pairs])
    assert metrics["caption_digits_correct"] == pytest.approx(expected) == pytest.approx(0.5)
    assert captioning.classes_named_correctly([g for _, g, _ in pairs], [r for r, _, _ in pairs],
                                              config.eval.class_names).tolist() == [ok for _, _, ok in pairs]
    assert "multiset" in caption_eval.metric_specs(config)["caption_digits_correct"].description
    config.eval.class_names = []
    assert "caption_digits_correct" not in caption_eval.metric_specs(config)
