"""Attentional pooling: learned queries cross-attend to a sequence of tokens (Lee et al. 2019, "Set
Transformer", Sec. 3.2 PMA; used by CoCa, Yu et al. 2022, Sec. 3.2, to pool image tokens into one
contrastive and N captioning embeddings).

`num_queries` learned queries (LayerNorm'd) attend to the LayerNorm'd input tokens with the shared
`MultiHeadAttention`; the output has `num_queries` tokens of the query width.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.nn import layers
from colearn_jax.nn.attention import MultiHeadAttention


class AttentionalPooler(nn.Module):
    num_queries: int
    num_heads: int
    width: int  # query (and output) width; the input tokens may have another
    ln_eps: float = 1e-5
    query_std: float = 1.0
    attention_impl: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [b, n, d] -> [b, num_queries, width]."""
        if self.width % self.num_heads:
            raise ValueError(f"AttentionalPooler: width {self.width} not divisible by {self.num_heads} heads.")
        query = self.param("query", layers.normal(self.query_std, ("length", "embed")), (self.num_queries, self.width))
        keys = layers.LayerNorm(self.ln_eps, name="ln_k")(tokens.astype(self.dtype))
        query = layers.LayerNorm(self.ln_eps, name="ln_q")(query.astype(self.dtype))
        query = jnp.broadcast_to(query, (tokens.shape[0],) + query.shape)
        std = self.width**-0.5
        return MultiHeadAttention(self.num_heads, qkv_std=std, out_std=std, implementation=self.attention_impl,
                                  dtype=self.dtype, name="attn")(query, keys)
