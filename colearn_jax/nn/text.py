"""CLIP's text transformer (Radford et al. 2021, Sec. 2.4; GPT-2 style, Radford et al. 2019).

Token + learned position embeddings, a causal pre-LN transformer stack, `ln_final`, and the feature
at the end-of-text token (the largest id, so `argmax(ids)`) projected bias-free to the joint space.
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
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """ids: int [b, L<=context_length] -> {"embedding": [b, D], "tokens": [b, L, width]}."""
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
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
        pos = self.param(
            "positional_embedding", layers.normal(0.01, ("length", "embed")), (self.context_length, self.width)
        )
        x = embed(ids) + pos[:length].astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        cfg = BlockConfig.clip_init(
            self.num_heads, self.width, self.num_layers,
            mlp_dim=int(self.width * self.mlp_ratio), activation=self.activation, ln_eps=self.ln_eps,
            causal=True, attention_impl=self.attention_impl, dropout=self.dropout,
        )
        x = TransformerStack(
            self.num_layers, cfg, scan=self.scan, remat_policy=self.remat_policy,
            deterministic=not train, dtype=self.dtype, name="transformer",
        )(x)
        x = layers.LayerNorm(self.ln_eps, name="ln_final")(x)
        eot = jnp.argmax(ids, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        if self.output_dim is not None:
            proj = self.param(
                "text_projection", layers.normal(self.width**-0.5, ("embed", "proj")),
                (self.width, self.output_dim),
            )
            pooled = pooled @ proj.astype(pooled.dtype)
        return {"embedding": pooled, "tokens": x}
