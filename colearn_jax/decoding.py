"""Autoregressive decoding for every generator: greedy, beam search, top-k / nucleus sampling.

One jitted, static-shape, batched `generate()` (DESIGN.md "Decoding"). A model plugs in with two
functions, so captioners of any architecture share it:

    prefill_fn(params, inputs, prompt) -> (logits [B, V], cache)
        runs the prompt [B, P] (e.g. the start token) with the conditioning `inputs` (e.g. images,
        every leaf batch-major) and returns the next-token logits and a cache;
    step_fn(params, cache, tokens) -> (logits [N, V], cache)
        feeds one token per row (tokens [N], N = B, or B * num_beams in beam search).

Every cache leaf must be batch-major (`[rows, ...]`): beam search repeats rows for the beams and
reorders them as beams are chosen. `nn/attention.py`'s key/value cache follows that convention;
`uncached_fns` wraps a plain full-sequence forward into the same two functions (every step re-runs
the whole prefix: the reference the cached path is tested against; an optional `encode_fn` runs the
conditioning encoder once, in prefill).

Methods (`DecodeConfig.method`):
  greedy  argmax each step.
  sample  temperature, then top-k and/or nucleus (top-p, Holtzman et al. 2020, Sec. 3.1) filtering,
          then a categorical draw (`rng` required).
  beam    beam search (Graves 2012; the hypothesis book-keeping of Hugging Face's `BeamSearchScorer`):
          each row keeps `num_beams` live beams and the `num_beams` best finished hypotheses; a
          hypothesis ended by EOS scores sum / length**length_penalty (length counts the prompt and
          the EOS). A row stops when it has num_beams finished hypotheses and — unless
          `early_stopping` — no live beam can still beat the worst of them. Beam scores sum
          log-softmax values, or raw logits with `beam_scores="logits"` (what some public captioners
          do; needed to reproduce their beams).
Processing, in order, of each step's logits: EOS is banned until `min_new_tokens` tokens were
generated; repetition penalty (Keskar et al. 2019, Sec. 4.1: a seen token's logit is divided by the
penalty when positive, multiplied when negative; the prompt counts as seen); then the method.

Output `DecodeOutput`: `tokens` [B, max_new_tokens] (the generated tokens, EOS included, then
`pad_id`), `lengths` [B] (tokens generated, EOS included), `scores` [B] (sum of the chosen tokens'
log-probabilities under the processed distribution; beam search: the best hypothesis' normalised
score) and, with `return_logits`, `logits` [B, max_new_tokens, V] (each step's raw logits; greedy and
sample only).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

METHODS = ("greedy", "sample", "beam")
NEG_INF = -1e30  # finite: sums and divisions of masked scores stay ordered and NaN-free
# The score a beam starts from unless it is the first of its row (all beams begin identical).
DUPLICATE_BEAM_SCORE = -1e9


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static settings of `generate` (hashable: a new value compiles a new program)."""

    max_new_tokens: int
    eos_id: int
    pad_id: int = 0
    method: str = "greedy"  # greedy | sample | beam
    min_new_tokens: int = 0  # EOS is banned while fewer tokens than this were generated
    repetition_penalty: float = 1.0  # 1.0: off
    temperature: float = 1.0  # sample
    top_k: int = 0  # sample; 0: off
    top_p: float = 1.0  # sample; 1.0: off
    num_beams: int = 4  # beam
    length_penalty: float = 1.0  # beam: hypothesis score = sum / length ** length_penalty
    early_stopping: bool = False  # beam: stop a row once it has num_beams finished hypotheses
    beam_scores: str = "log_softmax"  # beam: sum "log_softmax" values or raw "logits"
    eos_at_max_length: bool = False  # greedy / sample: a row still open at the last step ends with EOS
    return_logits: bool = False  # greedy / sample: keep each step's raw logits

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"DecodeConfig.method={self.method!r}; choose one of {METHODS}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"DecodeConfig.max_new_tokens={self.max_new_tokens} must be >= 1.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"DecodeConfig.min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens].")
        if self.repetition_penalty <= 0 or self.temperature <= 0:
            raise ValueError("DecodeConfig.repetition_penalty and temperature must be > 0.")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"DecodeConfig.top_k={self.top_k} must be >= 0 and top_p={self.top_p} in (0, 1].")
        if self.method == "beam":
            if self.num_beams < 1:
                raise ValueError(f"DecodeConfig.num_beams={self.num_beams} must be >= 1.")
            if self.beam_scores not in ("log_softmax", "logits"):
                raise ValueError(f"DecodeConfig.beam_scores={self.beam_scores!r}; choose 'log_softmax' or 'logits'.")
            if self.return_logits:
                raise ValueError("DecodeConfig.return_logits is for greedy / sample decoding.")


class DecodeOutput(NamedTuple):
    tokens: jax.Array  # int32 [B, max_new_tokens]
    lengths: jax.Array  # int32 [B]
    scores: jax.Array  # float32 [B]
    logits: jax.Array | None = None  # float32 [B, max_new_tokens, V]


# ----------------------------------------------------------------------------------------- processing
def _seen_from(tokens: jax.Array, vocab: int) -> jax.Array:
    """bool [N, V]: which ids occur in tokens [N, L]."""
    return jnp.zeros((tokens.shape[0], vocab), bool).at[jnp.arange(tokens.shape[0])[:, None], tokens].set(True)


def process_logits(logits: jax.Array, seen: jax.Array, num_generated: jax.Array, cfg: DecodeConfig) -> jax.Array:
    """Min-length EOS ban and repetition penalty on raw logits [N, V] (float32)."""
    logits = logits.astype(jnp.float32)
    if cfg.min_new_tokens > 0:
        ban = num_generated < cfg.min_new_tokens
        logits = logits.at[:, cfg.eos_id].set(jnp.where(ban, NEG_INF, logits[:, cfg.eos_id]))
    if cfg.repetition_penalty != 1.0:
        p = cfg.repetition_penalty
        logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
    return logits


def filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row (ties at the k-th value kept), the rest NEG_INF."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def filter_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus: keeps the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p  # the most likely token always (mass_before = 0)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG_INF, logits)


# ----------------------------------------------------------------------------------------- greedy / sample
def _generate_one_per_row(prefill_fn, step_fn, params, inputs, prompt, cfg: DecodeConfig, rng):
    b, prompt_len = prompt.shape
    logits, cache = prefill_fn(params, inputs, prompt)
    vocab = logits.shape[-1]
    n = cfg.max_new_tokens
    state = dict(
        t=jnp.zeros((), jnp.int32), logits=logits.astype(jnp.float32), cache=cache,
        tokens=jnp.full((b, n), cfg.pad_id, jnp.int32), done=jnp.zeros((b,), bool),
        lengths=jnp.zeros((b,), jnp.int32), scores=jnp.zeros((b,), jnp.float32),
        seen=_seen_from(prompt, vocab),
        rng=rng if rng is not None else jax.random.PRNGKey(0),
    )
    if cfg.return_logits:
        state["all_logits"] = jnp.zeros((b, n, vocab), jnp.float32)

    def choose(s):  # the token at position t from the logits in hand (no model call)
        t = s["t"]
        raw = s["logits"]
        logits = process_logits(raw, s["seen"], t, cfg)
        if cfg.method == "greedy":
            log_probs = jax.nn.log_softmax(logits)
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            rng = s["rng"]
        else:
            logits = filter_top_p(filter_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
            log_probs = jax.nn.log_softmax(logits)
            rng, draw = jax.random.split(s["rng"])
            tok = jax.random.categorical(draw, logits).astype(jnp.int32)
        if cfg.eos_at_max_length:
            tok = jnp.where(t == n - 1, cfg.eos_id, tok)
        live = ~s["done"]
        tok = jnp.where(live, tok, cfg.pad_id)
        out = dict(s)
        out["tokens"] = s["tokens"].at[:, t].set(tok)
        out["scores"] = s["scores"] + jnp.where(live, jnp.take_along_axis(log_probs, tok[:, None], 1)[:, 0], 0.0)
        out["lengths"] = s["lengths"] + live.astype(jnp.int32)
        out["done"] = s["done"] | (tok == cfg.eos_id)
        out["seen"] = s["seen"].at[jnp.arange(b), tok].set(s["seen"][jnp.arange(b), tok] | live)
        if cfg.return_logits:
            out["all_logits"] = s["all_logits"].at[:, t].set(raw)
        out["rng"], out["t"] = rng, t + 1
        return out, tok

    def body(s):  # choose token t, then run the model on it for the logits of token t + 1
        out, tok = choose(s)
        out["logits"], out["cache"] = _as_f32(step_fn(params, s["cache"], tok))
        return out

    # The last token needs no model call (its logits would be read by nobody and overflow the cache), so
    # the loop stops one short and the last choice runs outside it: no branch on the cache in the loop.
    s = jax.lax.while_loop(lambda s: (s["t"] < n - 1) & ~jnp.all(s["done"]), body, state)
    s.pop("cache")
    s = jax.lax.cond((s["t"] < n) & ~jnp.all(s["done"]), lambda s: choose(s)[0], lambda s: dict(s), s)
    return DecodeOutput(s["tokens"], s["lengths"], s["scores"], s.get("all_logits"))


def _next(step_fn, params, cache, tok, t, n, logits):
    """step_fn for every step but the last (whose logits nobody reads: the cache would overflow)."""
    return jax.lax.cond(
        t < n - 1,
        lambda: tuple(_as_f32(step_fn(params, cache, tok))),
        lambda: (logits.astype(jnp.float32), cache),
    )


def _as_f32(out):
    logits, cache = out
    return logits.astype(jnp.float32), cache


# ----------------------------------------------------------------------------------------- beam search
def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, K, ...], index [B, K'] into axis 1 -> [B, K', ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _reorder_cache(cache, index: jax.Array, b: int, k: int):
    """Rows of the [B*K, ...] cache leaves picked by beam `index` [B, K]."""
    flat = (jnp.arange(b)[:, None] * k + index).reshape(-1)
    return jax.tree.map(lambda x: jnp.take(x, flat, axis=0), cache)


def _generate_beam(prefill_fn, step_fn, params, inputs, prompt, cfg: DecodeConfig):
    b, prompt_len = prompt.shape
    k, n = cfg.num_beams, cfg.max_new_tokens
    logits, cache = prefill_fn(params, inputs, prompt)
    vocab = logits.shape[-1]
    if 2 * k > k * vocab:
        raise ValueError(f"num_beams={k} needs a vocabulary of at least 2 tokens; got {vocab}.")
    repeat = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  (row r -> rows r*K .. r*K+K-1)
    cache = jax.tree.map(repeat, cache)
    lp = cfg.length_penalty
    state = dict(
        t=jnp.zeros((), jnp.int32), logits=repeat(logits.astype(jnp.float32)), cache=cache,
        alive_tokens=jnp.full((b, k, n), cfg.pad_id, jnp.int32),
        alive_scores=jnp.tile(jnp.array([0.0] + [DUPLICATE_BEAM_SCORE] * (k - 1), jnp.float32), (b, 1)),
        seen=jnp.repeat(_seen_from(prompt, vocab)[:, None], k, axis=1),
        fin_tokens=jnp.full((b, k, n), cfg.pad_id, jnp.int32),
        fin_scores=jnp.full((b, k), NEG_INF, jnp.float32),
        fin_lengths=jnp.zeros((b, k), jnp.int32),
        fin_count=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
    )

    def body(s):
        t = s["t"]
        length = (prompt_len + t + 1).astype(jnp.float32)  # with the token chosen now
        logits = process_logits(s["logits"], s["seen"].reshape(b * k, vocab), t, cfg)
        step_scores = jax.nn.log_softmax(logits) if cfg.beam_scores == "log_softmax" else logits
        cand = (step_scores.reshape(b, k, vocab) + s["alive_scores"][..., None]).reshape(b, k * vocab)
        top_scores, top_index = jax.lax.top_k(cand, 2 * k)  # sorted, best first
        top_beam, top_tok = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        is_eos = top_tok == cfg.eos_id
        live_row = ~s["done"]

        # Finished: EOS candidates among the best k, merged with the kept hypotheses (best k stay).
        new_fin = is_eos & (jnp.arange(2 * k) < k)[None] & live_row[:, None]
        new_fin_scores = jnp.where(new_fin, top_scores / length**lp, NEG_INF)
        new_fin_tokens = _gather_beams(s["alive_tokens"], top_beam).at[:, :, t].set(top_tok)
        all_scores = jnp.concatenate([s["fin_scores"], new_fin_scores], axis=1)
        fin_scores, keep = jax.lax.top_k(all_scores, k)
        fin_tokens = _gather_beams(jnp.concatenate([s["fin_tokens"], new_fin_tokens], 1), keep)
        fin_lengths = _gather_beams(
            jnp.concatenate([s["fin_lengths"], jnp.full((b, 2 * k), t + 1, jnp.int32)], 1), keep)
        fin_count = jnp.minimum(s["fin_count"] + new_fin.sum(axis=1), k)

        # Live: the best k candidates that are not EOS (at most k of the 2k are EOS: one per beam).
        _, pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_scores), k)
        src = jnp.take_along_axis(top_beam, pick, axis=1)
        tok = jnp.take_along_axis(top_tok, pick, axis=1)
        alive_scores = jnp.take_along_axis(top_scores, pick, axis=1)
        alive_tokens = _gather_beams(s["alive_tokens"], src).at[:, :, t].set(tok)
        seen = _gather_beams(s["seen"], src)
        seen = seen.at[jnp.arange(b)[:, None], jnp.arange(k)[None, :], tok].set(True)

        # A row is done once it holds k hypotheses none of its live beams can beat (or at once).
        full = fin_count >= k
        if cfg.early_stopping:
            row_done = full
        else:
            row_done = full & (fin_scores[:, -1] >= top_scores[:, 0] / length**lp)
        keep_old = s["done"]
        out = dict(s)
        out["fin_scores"] = jnp.where(keep_old[:, None], s["fin_scores"], fin_scores)
        out["fin_tokens"] = jnp.where(keep_old[:, None, None], s["fin_tokens"], fin_tokens)
        out["fin_lengths"] = jnp.where(keep_old[:, None], s["fin_lengths"], fin_lengths)
        out["fin_count"] = jnp.where(keep_old, s["fin_count"], fin_count)
        out["done"] = keep_old | row_done
        out["alive_scores"], out["alive_tokens"], out["seen"] = alive_scores, alive_tokens, seen
        cache = _reorder_cache(s["cache"], src, b, k)
        out["logits"], out["cache"] = _next(step_fn, params, cache, tok.reshape(-1), t, n, s["logits"])
        out["t"] = t + 1
        return out

    def cond(s):
        return (s["t"] < n) & ~jnp.all(s["done"])

    s = jax.lax.while_loop(cond, body, state)
    # Rows still open: their live beams (which ran to the last step, no EOS) join the hypotheses.
    t_end = s["t"]
    open_row = ~s["done"]
    alive_final = jnp.where(open_row[:, None], s["alive_scores"] / (prompt_len + t_end).astype(jnp.float32) ** lp,
                            NEG_INF)
    all_scores = jnp.concatenate([s["fin_scores"], alive_final], axis=1)
    all_tokens = jnp.concatenate([s["fin_tokens"], s["alive_tokens"]], axis=1)
    all_lengths = jnp.concatenate([s["fin_lengths"], jnp.full((b, k), t_end, jnp.int32)], axis=1)
    best = jnp.argmax(all_scores, axis=1)[:, None]
    tokens = _gather_beams(all_tokens, best)[:, 0]
    lengths = _gather_beams(all_lengths, best)[:, 0]
    tokens = jnp.where(jnp.arange(n)[None] < lengths[:, None], tokens, cfg.pad_id)
    return DecodeOutput(tokens, lengths, _gather_beams(all_scores, best)[:, 0])


# ----------------------------------------------------------------------------------------- entry point
@functools.partial(jax.jit, static_argnames=("prefill_fn", "step_fn", "config"))
def generate(
    prefill_fn: Callable,
    step_fn: Callable,
    params: Any,
    inputs: Any,
    prompt: jax.Array,
    config: DecodeConfig,
    rng: jax.Array | None = None,
) -> DecodeOutput:
    """Decodes `config.max_new_tokens` tokens after `prompt` [B, P] for each row of `inputs`.

    `prefill_fn` / `step_fn` (module docstring) are static: pass the same function objects again to
    reuse the compiled program. `params` and `inputs` are any pytrees (batch-major `inputs`); under a
    mesh, shard `inputs` and `prompt` along the batch and the decode runs data-parallel. `rng` is
    needed by `method="sample"` only.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int [batch, >= 1]; got shape {prompt.shape}.")
    if config.method == "sample" and rng is None:
        raise ValueError("method='sample' needs an rng.")
    if config.method == "beam":
        return _generate_beam(prefill_fn, step_fn, params, inputs, prompt, config)
    return _generate_one_per_row(prefill_fn, step_fn, params, inputs, prompt, config, rng)


# ----------------------------------------------------------------------------------------- no cache
def uncached_fns(forward_fn: Callable, total_length: int, pad_id: int = 0,
                 encode_fn: Callable | None = None) -> tuple[Callable, Callable]:
    """(prefill_fn, step_fn) from `forward_fn(params, memory, ids [N, total_length]) -> logits [N, L, V]`,
    a causal full-sequence forward: each step re-runs it on the prefix padded to `total_length`
    (= prompt length + max_new_tokens). `memory` is `encode_fn(params, inputs)`, computed once in
    prefill (e.g. a captioner's image encoder: every step then re-runs only the text side, as
    open_clip's CoCa `generate` does), or `inputs` itself without `encode_fn`. The "cache" holds the
    ids so far and `memory` (batch-major, as every cache leaf)."""

    def prefill_fn(params, inputs, prompt):
        b, p = prompt.shape
        memory = inputs if encode_fn is None else encode_fn(params, inputs)
        ids = jnp.full((b, total_length), pad_id, jnp.int32).at[:, :p].set(prompt)
        logits = forward_fn(params, memory, ids)[:, p - 1]
        return logits, {"ids": ids, "length": jnp.full((b,), p, jnp.int32), "memory": memory}

    def step_fn(params, cache, tokens):
        rows = jnp.arange(tokens.shape[0])
        pos = cache["length"]
        ids = cache["ids"].at[rows, pos].set(tokens)
        logits = forward_fn(params, cache["memory"], ids)[rows, pos]
        return logits, {"ids": ids, "length": pos + 1, "memory": cache["memory"]}

    return prefill_fn, step_fn


def zeros_like_shapes(fn: Callable, *args) -> Any:
    """Zeros shaped like `fn(*args)`'s output, computed by `jax.eval_shape` (nothing runs): how a model
    makes an empty cache from a decode-mode call on a full-length dummy input."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))
