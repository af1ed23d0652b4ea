"""The shared decoding engine (colearn_jax/decoding.py) and the key/value cache of nn/attention.py.

A toy causal transformer LM built from the shared blocks checks cached == uncached decoding (tokens
and every step's logits), beam 1 == greedy and a sharded decode == one device. Hand-written Markov
"models" (logits from a table indexed by the last token) check the processors and methods exactly.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from colearn_jax import decoding
from colearn_jax.decoding import DecodeConfig, generate
from colearn_jax.nn.transformer import BlockConfig, TransformerStack

VOCAB, WIDTH, PROMPT, NEW = 13, 16, 2, 7
EOS = 12


class ToyLM(nn.Module):
    """Token + position embeddings, causal pre-LN stack, LN, vocabulary head; `decode` for the cache."""

    scan: bool = False

    @nn.compact
    def __call__(self, ids, decode=None):
        b, q = ids.shape
        pos = self.param("pos", nn.initializers.normal(0.5), (PROMPT + NEW, WIDTH))
        if decode is None:
            positions = jnp.broadcast_to(jnp.arange(q), (b, q))
        else:
            index = self.variable("cache", "position", jnp.zeros, (b,), jnp.int32)
            positions = index.value[:, None] + jnp.arange(q)
            index.value = index.value + q
        x = nn.Embed(VOCAB, WIDTH, embedding_init=nn.initializers.normal(1.0))(ids) + pos[positions]
        cfg = BlockConfig(num_heads=2, mlp_dim=32, causal=True)
        x = TransformerStack(2, cfg, scan=self.scan, name="stack")(x, decode=decode)
        return nn.Dense(VOCAB, kernel_init=nn.initializers.normal(1.0))(nn.LayerNorm()(x))


MODELS = {False: ToyLM(scan=False), True: ToyLM(scan=True)}


def _params(scan):
    return MODELS[scan].init(jax.random.PRNGKey(0), jnp.zeros((1, PROMPT + NEW), jnp.int32))["params"]


def _prefill(model, params, inputs, prompt):
    del inputs
    b = prompt.shape[0]
    cache = decoding.zeros_like_shapes(
        lambda: model.apply({"params": params}, jnp.zeros((b, PROMPT + NEW), jnp.int32), decode="prefill",
                            mutable=["cache"])[1]["cache"])
    logits, mut = model.apply({"params": params, "cache": cache}, prompt, decode="prefill", mutable=["cache"])
    return logits[:, -1], mut["cache"]


def _step(model, params, cache, tokens):
    logits, mut = model.apply({"params": params, "cache": cache}, tokens[:, None], decode="step", mutable=["cache"])
    return logits[:, -1], mut["cache"]


def _forward(model, params, inputs, ids):
    del inputs
    return model.apply({"params": params}, ids)


CACHED = {s: (lambda p, i, x, m=MODELS[s]: _prefill(m, p, i, x), lambda p, c, t, m=MODELS[s]: _step(m, p, c, t))
          for s in MODELS}
UNCACHED = {s: decoding.uncached_fns(lambda p, i, ids, m=MODELS[s]: _forward(m, p, i, ids), PROMPT + NEW)
            for s in MODELS}


def _prompt(b=4, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, PROMPT), 0, EOS)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_equals_uncached(scan):
    params, prompt = _params(scan), _prompt()
    cfg = DecodeConfig(max_new_tokens=NEW, eos_id=EOS, return_logits=True)
    cached = generate(*CACHED[scan], params, None, prompt, cfg)
    uncached = generate(*UNCACHED[scan], params, None, prompt, cfg)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_allclose(cached.logits, uncached.logits, atol=1e-5, rtol=0)
    # the logits are those of a full forward over the decoded sequence (teacher forcing)
    seq = jnp.concatenate([prompt, cached.tokens], axis=1)
    full = MODELS[scan].apply({"params": params}, seq)[:, PROMPT - 1:-1]
    live = np.arange(NEW)[None] < np.asarray(cached.lengths)[:, None]
    np.testing.assert_allclose(np.asarray(cached.logits)[live], np.asarray(full)[live], atol=1e-5, rtol=0)
    assert np.ptp(np.asarray(cached.tokens)) > 0  # a non-degenerate decode
    beam = DecodeConfig(max_new_tokens=NEW, eos_id=EOS, method="beam", num_beams=3)
    b_cached = generate(*CACHED[scan], params, None, prompt, beam)
    b_uncached = generate(*UNCACHED[scan], params, None, prompt, beam)
    np.testing.assert_array_equal(b_cached.tokens, b_uncached.tokens)
    np.testing.assert_allclose(b_cached.scores, b_uncached.scores, atol=1e-5)


def test_beam_one_equals_greedy():
    params, prompt = _params(False), _prompt(b=6, seed=3)
    for min_new, rep in ((0, 1.0), (3, 1.5)):
        kw = dict(max_new_tokens=NEW, eos_id=EOS, min_new_tokens=min_new, repetition_penalty=rep)
        greedy = generate(*CACHED[False], params, None, prompt, DecodeConfig(**kw))
        beam = generate(*CACHED[False], params, None, prompt,
                        DecodeConfig(method="beam", num_beams=1, length_penalty=0.0, **kw))
        np.testing.assert_array_equal(beam.tokens, greedy.tokens)
        np.testing.assert_array_equal(beam.lengths, greedy.lengths)
        np.testing.assert_allclose(beam.scores, greedy.scores, atol=1e-5)


def test_sharded_decode_equals_one_device():
    assert jax.device_count() == 8
    params, prompt = _params(True), _prompt(b=8, seed=5)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    for cfg in (DecodeConfig(max_new_tokens=NEW, eos_id=EOS, return_logits=True),
                DecodeConfig(max_new_tokens=NEW, eos_id=EOS, method="beam", num_beams=2)):
        single = jax.device_get(generate(*CACHED[True], params, None, prompt, cfg))
        sharded_prompt = jax.device_put(prompt, NamedSharding(mesh, P("data")))
        out = generate(*CACHED[True], params, None, sharded_prompt, cfg)
        assert len(sharded_prompt.sharding.device_set) == 8
        np.testing.assert_array_equal(jax.device_get(out.tokens), single.tokens)
        np.testing.assert_allclose(jax.device_get(out.scores), single.scores, atol=1e-5)


# ---------------------------------------------------------------------------- hand-written Markov models
def _markov(table):
    """(prefill_fn, step_fn): next-token logits = table[last token]; params = the table."""
    def prefill(params, inputs, prompt):
        return params[prompt[:, -1]], {"last": prompt[:, -1]}

    def step(params, cache, tokens):
        return params[tokens], {"last": tokens}

    return prefill, step


MARKOV = _markov(None)
START, A, B, C, END = 0, 1, 2, 3, 4


def _table(rows):
    t = np.full((5, 5), -50.0, np.float32)
    for src, logits in rows.items():
        t[src] = logits
    return jnp.asarray(t)


def test_min_length_and_max_length():
    table = _table({i: [-9, 1, 0, 0, 5] for i in range(5)})  # the same logits after every token
    prompt = jnp.zeros((2, 1), jnp.int32)
    out = generate(*MARKOV, table, None, prompt, DecodeConfig(max_new_tokens=6, eos_id=END))
    np.testing.assert_array_equal(out.tokens[0], [END, 0, 0, 0, 0, 0])  # EOS at once, then padding
    np.testing.assert_array_equal(out.lengths, [1, 1])
    out = generate(*MARKOV, table, None, prompt, DecodeConfig(max_new_tokens=6, eos_id=END, min_new_tokens=3))
    np.testing.assert_array_equal(out.tokens[0], [A, A, A, END, 0, 0])
    np.testing.assert_array_equal(out.lengths, [4, 4])
    beam = generate(*MARKOV, table, None, prompt,
                    DecodeConfig(max_new_tokens=6, eos_id=END, min_new_tokens=3, method="beam", num_beams=2))
    np.testing.assert_array_equal(beam.tokens[0], [A, A, A, END, 0, 0])
    # a row that never ends: max length, and with eos_at_max_length the last token is EOS
    loop = _table({START: [-9, 5, 0, 0, 1], A: [-9, 5, 0, 0, 1]})
    out = generate(*MARKOV, loop, None, prompt, DecodeConfig(max_new_tokens=4, eos_id=END))
    np.testing.assert_array_equal(out.tokens[0], [A, A, A, A])
    out = generate(*MARKOV, loop, None, prompt, DecodeConfig(max_new_tokens=4, eos_id=END, eos_at_max_length=True))
    np.testing.assert_array_equal(out.tokens[0], [A, A, A, END])


def test_repetition_penalty():
    # the same logits after every token: A 3.0, B 2.0, C 1.0 (END unreachable)
    same = [-9, 3.0, 2.0, 1.0, -20]
    table = _table({START: same, A: same, B: same, C: same})
    prompt = jnp.zeros((1, 1), jnp.int32)
    plain = generate(*MARKOV, table, None, prompt, DecodeConfig(max_new_tokens=4, eos_id=END))
    np.testing.assert_array_equal(plain.tokens[0], [A, A, A, A])
    # penalty 2: seen A -> 1.5 beats C 1.0 but not B 2.0; then B -> 1.0 < A's 1.5
    pen = generate(*MARKOV, table, None, prompt, DecodeConfig(max_new_tokens=4, eos_id=END, repetition_penalty=2.0))
    np.testing.assert_array_equal(pen.tokens[0], [A, B, A, A])
    # penalty 4: A -> 0.75, B -> 0.5, so C (1.0) comes third; negative logits are multiplied (START -9 -> -36)
    pen = generate(*MARKOV, table, None, prompt, DecodeConfig(max_new_tokens=4, eos_id=END, repetition_penalty=4.0))
    np.testing.assert_array_equal(pen.tokens[0], [A, B, C, A])


def test_top_k_top_p_sampling():
    probs = np.array([1e-9, 0.5, 0.3, 0.15, 0.05], np.float32)
    row = np.log(probs)
    table = _table({i: row for i in range(5)})
    prompt = jnp.zeros((512, 1), jnp.int32)
    rng = jax.random.PRNGKey(7)
    base = dict(max_new_tokens=3, eos_id=END, method="sample")
    free = np.asarray(generate(*MARKOV, table, None, prompt, DecodeConfig(**base), rng).tokens[:, 0])
    assert set(np.unique(free)) >= {A, B, C}  # unfiltered sampling reaches the tail
    top2 = np.asarray(generate(*MARKOV, table, None, prompt, DecodeConfig(top_k=2, **base), rng).tokens)
    assert set(np.unique(top2)) == {A, B}
    assert 0.5 < np.mean(top2 == A) < 0.75  # renormalised: 0.5 / 0.8 = 0.625
    # nucleus 0.7: A (0.5) + B (0.3) reach 0.7; C is cut
    nucleus = np.asarray(generate(*MARKOV, table, None, prompt, DecodeConfig(top_p=0.7, **base), rng).tokens)
    assert set(np.unique(nucleus)) == {A, B}
    greedy = generate(*MARKOV, table, None, prompt[:1], DecodeConfig(max_new_tokens=3, eos_id=END))
    for cfg in (DecodeConfig(top_k=1, **base), DecodeConfig(top_p=0.3, **base)):
        np.testing.assert_array_equal(generate(*MARKOV, table, None, prompt[:4], cfg, rng).tokens,
                                      np.repeat(greedy.tokens, 4, axis=0))
    # temperature -> 0 concentrates on the mode
    cold = np.asarray(generate(*MARKOV, table, None, prompt, DecodeConfig(temperature=0.05, **base), rng).tokens)
    assert np.mean(cold == A) > 0.99


def test_beam_search_finds_what_greedy_misses():
    # greedy takes A (0.6) and then A again (0.4): p = 0.24; B (0.4) then END (0.99) is p = 0.396
    logp = lambda *p: np.log(np.array(p, np.float32))  # noqa: E731
    table = _table({START: logp(1e-9, 0.6, 0.4, 1e-9, 1e-9), A: logp(1e-9, 0.4, 0.3, 1e-9, 0.3),
                    B: logp(1e-9, 0.005, 0.005, 1e-9, 0.99)})
    prompt = jnp.zeros((1, 1), jnp.int32)
    greedy = generate(*MARKOV, table, None, prompt, DecodeConfig(max_new_tokens=2, eos_id=END))
    np.testing.assert_array_equal(greedy.tokens[0], [A, A])
    beam = generate(*MARKOV, table, None, prompt,
                    DecodeConfig(max_new_tokens=2, eos_id=END, method="beam", num_beams=2, length_penalty=0.0))
    np.testing.assert_array_equal(beam.tokens[0], [B, END])
    np.testing.assert_array_equal(beam.lengths, [2])
    np.testing.assert_allclose(beam.scores, np.log(0.4 * 0.99), atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        DecodeConfig(max_new_tokens=3, eos_id=1, method="nucleus")
    with pytest.raises(ValueError, match="min_new_tokens"):
        DecodeConfig(max_new_tokens=3, eos_id=1, min_new_tokens=4)
    with pytest.raises(ValueError, match="sample"):
        generate(*MARKOV, _table({}), None, jnp.zeros((1, 1), jnp.int32),
                 DecodeConfig(max_new_tokens=2, eos_id=END, method="sample"))
