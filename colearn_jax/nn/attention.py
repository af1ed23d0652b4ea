"""Multi-head attention shared by every model: self, cross and causal, with padding masks.

Vaswani et al. 2017, Sec. 3.2. One implementation serves CLIP's towers, CoCa's decoder
cross-attention, ViLBERT co-attention and mPLUG fusion. The kernel is `jax.nn.dot_product_attention`,
whose `implementation` can be "xla" (any backend) or "cudnn" (fused flash attention on NVIDIA GPUs).

Parameters are laid out per head — q/k/v kernels `[embed, heads, kv]`, output kernel
`[heads, kv, embed]` — so the `tp` preset splits heads over the `model` mesh axis (Megatron style).

Decoding (autoregressive generation, `colearn_jax.decoding`) uses a key/value cache in the flax
`cache` collection, every leaf batch-major (`[batch, ...]`, so beam search can reorder it):
  self-attention   `cached_key` / `cached_value` [b, max_len, heads, kv] and `cache_index` [b] (the
                   next free slot of each row). `decode="prefill"` or `"step"` writes the q new keys
                   at the index and attends causally to everything written so far.
  cross-attention  `cached_key` / `cached_value` [b, memory_len, heads, kv]: the projected memory,
                   computed at `"prefill"` and read back at every `"step"` (the memory passed then is
                   not projected again).
The cache is created, zero, by a first call in decode mode on a full-length dummy input (nothing is
written then); `jax.eval_shape` of that call gives its shapes (see `colearn_jax.decoding`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.nn import layers


def make_attention_mask(query_valid: jax.Array | None, key_valid: jax.Array) -> jax.Array:
    """Boolean mask [batch, 1, q, k] from per-token validity ([batch, q] and [batch, k])."""
    if query_valid is None:
        return key_valid[:, None, None, :]
    return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def padded_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None, causal: bool = False,
    implementation: str | None = "cudnn", multiple: int = 64,
) -> jax.Array:
    """`jax.nn.dot_product_attention` with the sequences padded to a multiple of `multiple`.

    cuDNN's fused attention refuses some lengths in training (odd lengths such as ViT-B/16's 197
    tokens or CLIP's 77-token context: "Unsupported sequence length Q 197, KV 197" on an H200). The
    padded keys are excluded through `key_value_seq_lengths` (cuDNN's padding mask, no bias tensor)
    and, where a boolean `mask` is given, by padding it with False; padded query rows may see every
    real key (so no row is fully masked) and are cut off the output. Same result as the unpadded call.
    """
    t_q, t_k = q.shape[1], k.shape[1]
    pad_q, pad_k = -t_q % multiple, -t_k % multiple
    if pad_q == 0 and pad_k == 0:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)

    def pad(x, n):
        return jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))

    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], t_q, t_k))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad_k)), constant_values=False)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, 0)), constant_values=True)
    b = q.shape[0]
    out = jax.nn.dot_product_attention(
        pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), mask=mask, is_causal=causal,
        query_seq_lengths=jnp.full((b,), t_q, jnp.int32), key_value_seq_lengths=jnp.full((b,), t_k, jnp.int32),
        implementation=implementation,
    )
    return out[:, :t_q]


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention.

    Attributes:
      num_heads: number of heads.
      head_dim: per-head width; defaults to `width // num_heads` of the query input.
      out_features: output width; defaults to the query width.
      qkv_std / out_std: normal init std of the q/k/v and output kernels (None -> width**-0.5).
      use_bias: biases on the q/k/v and output projections (zero-initialised).
      add_bias_kv: learn one extra key/value appended to every sequence (ImageBind's non-image towers).
      implementation: `jax.nn.dot_product_attention` implementation: None/"xla"/"cudnn".
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    qkv_std: float | None = None
    out_std: float | None = None
    use_bias: bool = True
    add_bias_kv: bool = False
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        causal: bool = False,
        decode: str | None = None,
    ) -> jax.Array:
        """Attends `inputs_q` [b, q, d] to `inputs_kv` [b, k, d'] (self-attention when None).

        `mask` is boolean, broadcastable to [b, heads, q, k], True where attention is allowed.
        `causal` adds a lower-triangular mask (query i sees keys <= i).
        `decode`: None (no cache), "prefill" or "step" (see the module docstring).
        """
        if decode not in (None, "prefill", "step"):
            raise ValueError(f"decode={decode!r}; choose None, 'prefill' or 'step'.")
        is_cross = inputs_kv is not None
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        width = inputs_q.shape[-1]
        if width % self.num_heads and self.head_dim is None:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.head_dim or width // self.num_heads
        out_features = self.out_features or width
        qkv_std = self.qkv_std if self.qkv_std is not None else width**-0.5
        out_std = self.out_std if self.out_std is not None else width**-0.5

        def project(name, x):
            return layers.Projection((x.shape[-1], self.num_heads, head_dim), ("embed", "heads", "kv"), qkv_std,
                                     use_bias=self.use_bias, dtype=self.dtype, name=name)(x)

        q = project("query", inputs_q)
        if decode is not None:
            return self._decode(q, inputs_kv, project, is_cross, causal, mask, decode, head_dim, out_features,
                                out_std)
        k = project("key", inputs_kv)
        v = project("value", inputs_kv)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))

        if self.add_bias_kv:
            bias_k = self.param("bias_k", layers.normal(0.02, ("heads", "kv")), (self.num_heads, head_dim))
            bias_v = self.param("bias_v", layers.normal(0.02, ("heads", "kv")), (self.num_heads, head_dim))
            b = k.shape[0]
            k = jnp.concatenate([k, jnp.broadcast_to(bias_k.astype(k.dtype), (b, 1) + bias_k.shape)], 1)
            v = jnp.concatenate([v, jnp.broadcast_to(bias_v.astype(v.dtype), (b, 1) + bias_v.shape)], 1)
            if mask is not None:  # the learned key is always visible
                mask = jnp.broadcast_to(mask, mask.shape[:-1] + (mask.shape[-1],))
                mask = jnp.concatenate([mask, jnp.ones(mask.shape[:-1] + (1,), bool)], -1)

        if causal and self.add_bias_kv:
            q_len, k_len = q.shape[1], k.shape[1] - 1
            tri = jnp.tril(jnp.ones((q_len, k_len), bool))
            tri = jnp.concatenate([tri, jnp.ones((q_len, 1), bool)], -1)[None, None]
            mask = tri if mask is None else mask & tri
            causal = False
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], self.num_heads, q.shape[1], k.shape[1]))

        if self.implementation == "cudnn":
            out = padded_attention(q, k, v, mask=mask, causal=causal, implementation="cudnn")
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=causal, implementation=self.implementation
            )
        return self._output(out, head_dim, out_features, out_std)

    def _output(self, out, head_dim, out_features, out_std):
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        out = layers.Projection((self.num_heads, head_dim, out_features), ("heads", "kv", "embed"), out_std,
                                in_dims=2, use_bias=self.use_bias, dtype=self.dtype, name="out")(out)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _decode(self, q, inputs_kv, project, is_cross, causal, mask, decode, head_dim, out_features, out_std):
        """Attention against the `cache` collection (module docstring)."""
        if self.add_bias_kv:
            raise ValueError("decode mode does not support add_bias_kv.")
        b, q_len = q.shape[:2]
        initialised = self.has_variable("cache", "cached_key")
        if is_cross:
            if decode == "step" and initialised:  # the memory was projected at prefill
                k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
            else:
                k, v = project("key", inputs_kv), project("value", inputs_kv)
                self.put_variable("cache", "cached_key", k)
                self.put_variable("cache", "cached_value", v)
            if mask is not None:
                mask = jnp.broadcast_to(mask, (b, self.num_heads, q_len, k.shape[1]))
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
            return self._output(out, head_dim, out_features, out_std)
        if mask is not None:
            raise ValueError("decode mode for self-attention takes no mask: the cache index defines what is visible.")
        k, v = project("key", inputs_kv), project("value", inputs_kv)
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", jnp.zeros, (b,), jnp.int32)
        if not initialised:  # creating the cache (full-length dummy input): plain attention, nothing written
            out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=self.implementation)
            return self._output(out, head_dim, out_features, out_std)

        def write(cache, new, i):
            return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (i, 0, 0))

        start = index.value
        cached_k.value = jax.vmap(write)(cached_k.value, k, start)
        cached_v.value = jax.vmap(write)(cached_v.value, v, start)
        index.value = start + q_len
        key_pos = jnp.arange(cached_k.value.shape[1])
        query_pos = start[:, None] + jnp.arange(q_len)[None, :]  # [b, q]
        if causal:
            visible = key_pos[None, None, :] <= query_pos[:, :, None]
        else:  # every key written so far, this call's included
            visible = jnp.broadcast_to(key_pos[None, None, :] < (start + q_len)[:, None, None],
                                       (b, q_len, key_pos.shape[0]))
        visible = jnp.broadcast_to(visible[:, None], (b, self.num_heads, q_len, key_pos.shape[0]))
        out = jax.nn.dot_product_attention(q, cached_k.value, cached_v.value, mask=visible,
                                           implementation=self.implementation)
        return self._output(out, head_dim, out_features, out_std)
