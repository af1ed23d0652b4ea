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


@pytest.mark.parametrize("pooler,tie", [("open_clip", False), ("paper", True)])
def test_shapes_axis_names_and_cached_captions(pooler, tie):
    config = _config(pooler=pooler, tie_embeddings=tie, legacy_cls_mask=pooler == "open_clip")
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


def test_presets_validate_and_have_their_command():
    system = get_system("coca")
    for preset in ("tiny", "scenes", "base", "large"):
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
