"""CoCa: Contrastive Captioners (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text
Foundation Models", Sec. 3).

An image encoder (ViT, `nn/vit.py`, all tokens), attentional poolers (`nn/pooling.py`, Sec. 3.2), a
unimodal text decoder (causal self-attention with a CLS token appended, `nn/text.py`; its CLS output
is the text embedding) and a multimodal text decoder (per layer: causal self-attention block, then a
cross-attention block to the image tokens, each with its MLP; `ln_final`; a vocabulary head, tied to
the token embedding or not). Objective (Sec. 3.1, Eq. 3): λ_con · contrastive + λ_cap · captioning.

Pooler layouts (`pooler`):
  paper     a 1-query contrastive pooler and an N-query captioning pooler, both reading the
            LayerNorm'd (`ln_post`) ViT tokens; the contrastive query, projected, is the image
            embedding; the N captioning queries are the decoder's memory (Sec. 3.2, "Attentional
            Poolers").
  open_clip one N-query pooler on the raw ViT tokens, then `ln_post`: query 0, projected, is the
            image embedding and queries 1..N-1 are the decoder's memory (the layout of the public
            open_clip CoCa weights; with `legacy_cls_mask` on the text tower their CLS mask too).

Generation: `decode` (prefill the image memory and the prompt, then one token a step with the
key/value cache) plugs into `colearn_jax.decoding.generate`; `caption_prefill_fn` /
`caption_step_fn` / `uncached_caption_fns` give the engine's functions for a model.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax import decoding
from colearn_jax.losses.contrastive import l2_normalize
from colearn_jax.nn import layers
from colearn_jax.nn.pooling import AttentionalPooler
from colearn_jax.nn.transformer import BlockConfig, TransformerStack

POOLERS = ("paper", "open_clip")


class MultimodalDecoder(nn.Module):
    """Causal self-attention + cross-attention (to `memory`) layers, `ln_final`, vocabulary logits."""

    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    ln_eps: float = 1e-5
    scan: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None
    dropout: float = 0.0
    memory_ln: bool = True  # LayerNorm the memory in each cross-attention (open_clip's layout; its weights need it)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, memory, *, train=False, decode=None, embedding=None):
        """tokens [b, L, width], memory [b, M, d] -> logits [b, L, vocab]; `embedding` [vocab, width]
        ties the head to the token embedding."""
        cfg = BlockConfig.clip_init(
            self.num_heads, self.width, self.num_layers, mlp_dim=int(self.width * self.mlp_ratio),
            activation=self.activation, ln_eps=self.ln_eps, causal=True, memory_ln=self.memory_ln,
            attention_impl=self.attention_impl, dropout=self.dropout,
        )
        x = TransformerStack(
            self.num_layers, cfg, block="self_cross", scan=self.scan, remat_policy=self.remat_policy,
            deterministic=not train, dtype=self.dtype, name="transformer",
        )(tokens, None, memory, None, decode=decode)
        x = layers.LayerNorm(self.ln_eps, name="ln_final")(x)
        if embedding is None:
            head = self.param("text_projection", layers.normal(self.width**-0.5, ("embed", "vocab")),
                              (self.width, self.vocab_size))
        else:
            head = embedding.T
        logits = layers.contract(x, head.astype(x.dtype))
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class CoCa(nn.Module):
    """`vision`: a VisionTransformer with pool="none"; `text`: a TextTransformer with cls_token=True
    and output_dim=embed_dim; `decoder`: a MultimodalDecoder of the text tower's width."""

    vision: nn.Module
    text: nn.Module
    decoder: nn.Module
    embed_dim: int
    pooler: str = "open_clip"
    num_queries: int = 256  # captioning queries (paper) / all queries, contrastive one included (open_clip)
    pooler_heads: int = 8
    tie_embeddings: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    num_tags: int = 0  # > 0: an image tagging head on the ViT tokens (see `tag_logits`)
    tag_pool: str = "mean"  # mean: logits of the mean token | max: per-token logits, max over tokens
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    def setup(self):
        if self.pooler not in POOLERS:
            raise ValueError(f"CoCa.pooler={self.pooler!r}; choose one of {POOLERS}.")
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(self.init_logit_scale), ()), ()
        )
        pool = functools.partial(AttentionalPooler, num_heads=self.pooler_heads, width=self.embed_dim,
                                 ln_eps=self.ln_eps, dtype=self.dtype)
        if self.pooler == "open_clip":
            self.attn_pool = pool(self.num_queries)
        else:
            self.contrastive_pool = pool(1)
            self.caption_pool = pool(self.num_queries)
        self.ln_post = layers.LayerNorm(self.ln_eps)
        self.proj = self.param("proj", layers.normal(self.vision.width**-0.5, ("embed", "proj")),
                               (self.embed_dim, self.embed_dim))
        if self.num_tags:
            self.tag_head = layers.Projection((self.vision.width, self.num_tags), ("embed", "vocab"),
                                              self.vision.width**-0.5, dtype=self.dtype)

    # ------------------------------------------------------------------ encoders
    def image_features(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """images [b, H, W, C] -> (image embedding [b, E] before normalisation, memory [b, M, E])."""
        return self._pool(self.vision(images, train=train)["tokens"])

    def _pool(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.pooler == "open_clip":
            pooled = self.ln_post(self.attn_pool(tokens))
            latent, memory = pooled[:, 0], pooled[:, 1:]
        else:
            tokens = self.ln_post(tokens)
            latent, memory = self.contrastive_pool(tokens)[:, 0], self.caption_pool(tokens)
        return latent @ self.proj.astype(latent.dtype), memory

    def tag_logits(self, tokens: jax.Array) -> jax.Array:
        """ViT tokens [b, n, d] -> image tag logits [b, num_tags]: an auxiliary tagging head (Tag2Text, Huang
        et al. 2023, Sec. 3.2: tags parsed from the captions supervise the image encoder), not part of
        CoCa's paper objective, off unless `num_tags` > 0. `tag_pool` "mean" scores the mean token; "max"
        scores every token and keeps each tag's best (multiple-instance pooling: a tag is present where
        one token shows it, so each token learns to name what it shows)."""
        if self.tag_pool == "max":
            return self.tag_head(tokens).max(axis=1)
        if self.tag_pool != "mean":
            raise ValueError(f"CoCa.tag_pool={self.tag_pool!r}; choose 'mean' or 'max'.")
        return self.tag_head(tokens.mean(1))

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """[b, H, W, C] -> L2-normalised [b, E] (float32)."""
        return l2_normalize(self.image_features(images, train)[0])

    def encode_text(self, ids: jax.Array, train: bool = False) -> jax.Array:
        """[b, L] int ids -> L2-normalised [b, E] (float32): the CLS output of the unimodal decoder."""
        return l2_normalize(self.text(ids, train=train)["embedding"])

    def _head(self):
        if not self.tie_embeddings:
            return None
        return nn.unbox(self.text.variables["params"]["token_embedding"]["embedding"])

    def caption_logits(self, memory: jax.Array, ids: jax.Array, train: bool = False) -> jax.Array:
        """Next-token logits [b, L, V] for every position of ids [b, L] given the image memory."""
        tokens = self.text(ids, train=train)["tokens"]
        return self.decoder(tokens, memory, train=train, embedding=self._head())

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, Any]:
        """Teacher forcing: "logits" [b, L-1, V] of text[:, :-1] predict text[:, 1:]
        (+ "tag_logits" [b, num_tags] and "token_tag_logits" [b, patches, num_tags], the same head on each
        patch token, when the tagging head is on; XLA drops whichever the objective does not use)."""
        tokens = self.vision(batch["image"], train=train)["tokens"]
        latent, memory = self._pool(tokens)
        text = self.text(batch["text"], train=train)
        logits = self.decoder(text["tokens"][:, :-1], memory, train=train, embedding=self._head())
        out = {"image_embeds": l2_normalize(latent), "text_embeds": l2_normalize(text["embedding"]),
               "logit_scale": self.logit_scale, "logits": logits}
        if self.num_tags:
            out["tag_logits"] = self.tag_logits(tokens)
            out["token_tag_logits"] = self.tag_head(tokens[:, 1:])  # token 0 is the class token
        return out

    # ------------------------------------------------------------------ generation
    def decode(self, images: jax.Array | None, ids: jax.Array, decode: str) -> jax.Array:
        """Cached decoding: "prefill" encodes `images` (memory kept in the cache) and runs `ids`
        [b, P]; "step" runs ids [b, 1] (images unused). Returns logits [b, q, V]."""
        if decode == "prefill":
            memory = self.image_features(images)[1]
            self.put_variable("cache", "memory", memory)
        else:
            memory = self.get_variable("cache", "memory")
        tokens = self.text(ids, decode=decode)["tokens"]
        return self.decoder(tokens, memory, decode=decode, embedding=self._head())


def caption_prefill_fn(model: CoCa, max_length: int):
    """The engine's `prefill_fn(variables, images, prompt)` for `model`; caches hold `max_length`
    (prompt + new) tokens."""

    def prefill(variables, images, prompt):
        b = prompt.shape[0]
        dummy = jnp.zeros((b, max_length), jnp.int32)
        cache = decoding.zeros_like_shapes(
            lambda: model.apply(variables, images, dummy, "prefill", method=CoCa.decode, mutable=["cache"])[1]["cache"])
        logits, mut = model.apply({**variables, "cache": cache}, images, prompt, "prefill", method=CoCa.decode,
                                  mutable=["cache"])
        return logits[:, -1], mut["cache"]

    return prefill


def caption_step_fn(model: CoCa):
    def step(variables, cache, tokens):
        logits, mut = model.apply({**variables, "cache": cache}, None, tokens[:, None], "step", method=CoCa.decode,
                                  mutable=["cache"])
        return logits[:, -1], mut["cache"]

    return step


def uncached_caption_fns(model: CoCa, max_length: int, pad_id: int = 0):
    """The same decode without a key/value cache: the image is encoded once (prefill), then every step
    re-runs the text tower and the decoder on the padded prefix, as open_clip's CoCa `generate` does
    (the reference the cached decode is tested against)."""

    def encode(variables, images):
        return model.apply(variables, images, method=lambda m, x: m.image_features(x)[1])

    def forward(variables, memory, ids):
        return model.apply(variables, memory, ids, method=CoCa.caption_logits)

    return decoding.uncached_fns(forward, max_length, pad_id, encode_fn=encode)


@functools.lru_cache(maxsize=16)
def decode_fns(model: CoCa, max_length: int, cached: bool = True, pad_id: int = 0):
    """(prefill_fn, step_fn) for `generate`, the same objects for the same arguments (so the compiled
    decode is reused)."""
    if cached:
        return caption_prefill_fn(model, max_length), caption_step_fn(model)
    return uncached_caption_fns(model, max_length, pad_id)


def clamp_logit_scale(params):
    """open_clip's post-step clamp: logit_scale in [0, ln 100]."""
    from colearn_jax.models.clip import clamp_logit_scale as clamp  # noqa: PLC0415

    return clamp(params)
