"""CLIP's text transformer (Radford et al. 2021, Sec. 2.4; GPT-2 style, Radford et al. 2019).

Token + learned position embeddings, a causal pre-LN transformer stack, `ln_final`, and the feature
at the end-of-text token (the largest id, so `argmax(ids)`) projected bias-free to the joint space.

`cls_token=True` is the unimodal text encoder of CoCa (Yu et al. 2022, Sec. 3.2): a learned CLS
embedding is appended after the tokens (one more position), keys at padding positions are masked, and
the embedding is `ln_final` of the CLS output, projected; "tokens" are then the transformer outputs of
the text positions before any LayerNorm (what the multimodal decoder reads). `legacy_cls_mask` places
the key-padding mask one position late (key 0 always visible, key j visible iff token j-1 is not
padding) — the layout released CoCa weights were trained with.

`decode="prefill" | "step"` runs new tokens against the key/value cache (`nn/attention.py`) at the
positions after those already seen (a `position` counter in the `cache` collection): no CLS, no
padding mask; only "tokens" are returned.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.nn import layers
from colearn_jax.nn.transformer import BlockConfig, TransformerStack


class TextTransformer(nn.Module):
    vocab_size: int
    context_length: int
    width: int
    num_layers: int
    num_heads: int
    mlp_ratio: float = 4.0
    output_dim: int | None = None
    activation: str = "gelu"
    ln_eps: float = 1e-5
    scan: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None
    dropout: float = 0.0  # residual-branch dropout (draws from the "dropout" RNG stream when train=True)
    cls_token: bool = False  # CoCa's appended CLS token (module docstring)
    pad_id: int = 0  # with cls_token: keys holding this id are masked
    legacy_cls_mask: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, train: bool = False, decode: str | None = None) -> dict[str, jax.Array]:
        """ids: int [b, L<=context_length] -> {"embedding": [b, D], "tokens": [b, L, width]}."""
        if ids.ndim != 2 or (decode is None and ids.shape[1] > self.context_length):
            raise ValueError(
                f"TextTransformer expects token ids of shape [batch, <= {self.context_length}]; "
                f"got {ids.shape}."
            )
        length = ids.shape[1]
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            embedding_init=layers.normal(0.02, ("vocab", "embed")),
            name="token_embedding",
        )
        num_pos = self.context_length + int(self.cls_token)
        pos = self.param(
            "positional_embedding", layers.normal(0.01, ("length", "embed")), (num_pos, self.width)
        )
        cfg = BlockConfig.clip_init(
            self.num_heads, self.width, self.num_layers,
            mlp_dim=int(self.width * self.mlp_ratio), activation=self.activation, ln_eps=self.ln_eps,
            causal=True, attention_impl=self.attention_impl, dropout=self.dropout,
        )
        stack = TransformerStack(
            self.num_layers, cfg, scan=self.scan, remat_policy=self.remat_policy,
            deterministic=not train, dtype=self.dtype, name="transformer",
        )
        final_ln = layers.LayerNorm(self.ln_eps, name="ln_final")
        if decode is not None:
            index = self.variable("cache", "position", jnp.zeros, (ids.shape[0],), jnp.int32)
            positions = index.value[:, None] + jnp.arange(length)[None, :]
            index.value = index.value + length
            x = embed(ids) + jnp.take(pos, positions, axis=0).astype(self.dtype)
            x = stack(nn.with_logical_constraint(x, ("batch", "length", "embed")), decode=decode)
            return {"tokens": x if self.cls_token else final_ln(x)}
        x = embed(ids)
        mask = None
        if self.cls_token:
            cls = self.param("cls_embedding", layers.normal(0.01, ("embed",)), (self.width,))
            x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))], axis=1)
            valid = ids != self.pad_id
            always = jnp.ones((ids.shape[0], 1), bool)
            key_valid = jnp.concatenate([always, valid] if self.legacy_cls_mask else [valid, always], axis=1)
            mask = key_valid[:, None, None, :]
        x = x + pos[: x.shape[1]].astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = stack(x, mask) if mask is not None else stack(x)
        if self.cls_token:
            pooled = final_ln(x[:, -1])
            if self.output_dim is not None:
                pooled = pooled @ self._projection().astype(pooled.dtype)
            return {"embedding": pooled, "tokens": x[:, :-1]}
        x = final_ln(x)
        eot = jnp.argmax(ids, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        if self.output_dim is not None:
            pooled = pooled @ self._projection().astype(pooled.dtype)
        return {"embedding": pooled, "tokens": x}

    def _projection(self):
        return self.param("text_projection", layers.normal(self.width**-0.5, ("embed", "proj")),
                          (self.width, self.output_dim))
