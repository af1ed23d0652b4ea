"""Transformer blocks and stacks shared by all models (Vaswani et al. 2017, Sec. 3.1).

`EncoderBlock` is a pre-LN (or post-LN, BERT style) self-attention block; `DecoderBlock` adds
cross-attention to a memory between self-attention and the MLP (Vaswani et al. 2017, Sec. 3.1);
`CrossAttentionBlock` is cross-attention + MLP alone, and `SelfCrossBlock` an `EncoderBlock`
followed by a `CrossAttentionBlock` (two MLPs per layer: the decoder layout of Yu et al. 2022,
Sec. 3.2, as its public implementations build it). `TransformerStack` stacks identical blocks,
optionally with `nn.scan` (one compiled layer body: compile time no longer grows with depth) and
`nn.remat` with a named checkpoint policy.

Every block takes `decode=None | "prefill" | "step"` for autoregressive generation with a key/value
cache (`colearn_jax.nn.attention`); in a scanned stack the cache's layer axis is axis 1, so every
cache leaf stays batch-major.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from colearn_jax.nn import layers
from colearn_jax.nn.attention import MultiHeadAttention

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


class MlpBlock(nn.Module):
    """Position-wise feed-forward: Projection(mlp_dim) -> activation -> Projection(width)."""

    mlp_dim: int
    activation: str = "gelu"
    fc_std: float | None = None
    proj_std: float | None = None
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = layers.Projection((width, self.mlp_dim), ("embed", "mlp"), self.fc_std or (2 * width) ** -0.5,
                              dtype=self.dtype, name="fc")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = layers.get_activation(self.activation)(h)
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        out = layers.Projection((self.mlp_dim, width), ("mlp", "embed"), self.proj_std or width**-0.5,
                                dtype=self.dtype, name="proj")(h)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Hyper-parameters of one transformer block (hashable, so modules can hold it)."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-5
    norm_first: bool = True  # pre-LN (CLIP, ViT) or post-LN (BERT)
    causal: bool = False
    attn_qkv_std: float | None = None
    attn_out_std: float | None = None
    mlp_fc_std: float | None = None
    mlp_proj_std: float | None = None
    add_bias_kv: bool = False
    memory_ln: bool = False  # cross-attention: LayerNorm on the memory (keys / values) too
    dropout: float = 0.0
    drop_path: float = 0.0
    attention_impl: str | None = None

    @staticmethod
    def clip_init(num_heads: int, width: int, num_layers: int, **kw) -> "BlockConfig":
        """CLIP's initialisation: attn std w^-0.5, residual projections w^-0.5 (2L)^-0.5, fc (2w)^-0.5."""
        proj_std = width**-0.5 * (2 * num_layers) ** -0.5
        return BlockConfig(
            num_heads=num_heads,
            mlp_dim=kw.pop("mlp_dim", 4 * width),
            attn_qkv_std=width**-0.5,
            attn_out_std=proj_std,
            mlp_fc_std=(2 * width) ** -0.5,
            mlp_proj_std=proj_std,
            **kw,
        )


class EncoderBlock(nn.Module):
    """Self-attention + MLP with residuals; pre-LN by default."""

    cfg: BlockConfig
    deterministic: bool = True
    dtype: Any = jnp.float32

    def _residual(self, x, branch, name, drop_path_rate=None):
        branch = nn.Dropout(self.cfg.dropout)(branch, deterministic=self.deterministic)
        branch = layers.DropPath(self.cfg.drop_path, name=f"drop_path_{name}")(
            branch, deterministic=self.deterministic, rate=drop_path_rate
        )
        return x + branch

    def _attention(self, name):
        c = self.cfg
        return MultiHeadAttention(
            num_heads=c.num_heads,
            qkv_std=c.attn_qkv_std,
            out_std=c.attn_out_std,
            add_bias_kv=c.add_bias_kv,
            implementation=c.attention_impl,
            dtype=self.dtype,
            name=name,
        )

    def _mlp(self):
        c = self.cfg
        return MlpBlock(
            c.mlp_dim, c.activation, c.mlp_fc_std, c.mlp_proj_std, c.dropout, self.deterministic,
            self.dtype, name="mlp",
        )

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, decode: str | None = None,
                 drop_path_rate=None) -> jax.Array:
        """`drop_path_rate` (optional, may be traced) overrides cfg.drop_path: per-layer stochastic depth."""
        c = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        ln1 = layers.LayerNorm(c.ln_eps, name="ln_1")
        ln2 = layers.LayerNorm(c.ln_eps, name="ln_2")
        attn = self._attention("attn")
        if c.norm_first:
            x = self._residual(x, attn(ln1(x), mask=mask, causal=c.causal, decode=decode), "attn", drop_path_rate)
            x = self._residual(x, self._mlp()(ln2(x)), "mlp", drop_path_rate)
        else:
            x = ln1(self._residual(x, attn(x, mask=mask, causal=c.causal, decode=decode), "attn", drop_path_rate))
            x = ln2(self._residual(x, self._mlp()(x), "mlp", drop_path_rate))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderBlock(EncoderBlock):
    """Self-attention (causal per cfg), cross-attention to `memory`, MLP; pre-LN by default."""

    @nn.compact
    def __call__(self, x, mask=None, memory=None, memory_mask=None, decode=None):
        c = self.cfg
        ln = [layers.LayerNorm(c.ln_eps, name=f"ln_{i}") for i in (1, 2, 3)]
        self_attn, cross_attn = self._attention("attn"), self._attention("cross_attn")
        if c.memory_ln:
            memory = layers.LayerNorm(c.ln_eps, name="ln_memory")(memory)
        if c.norm_first:
            x = self._residual(x, self_attn(ln[0](x), mask=mask, causal=c.causal, decode=decode), "attn")
            x = self._residual(x, cross_attn(ln[1](x), memory, mask=memory_mask, decode=decode), "cross")
            x = self._residual(x, self._mlp()(ln[2](x)), "mlp")
        else:
            x = ln[0](self._residual(x, self_attn(x, mask=mask, causal=c.causal, decode=decode), "attn"))
            x = ln[1](self._residual(x, cross_attn(x, memory, mask=memory_mask, decode=decode), "cross"))
            x = ln[2](self._residual(x, self._mlp()(x), "mlp"))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CrossAttentionBlock(EncoderBlock):
    """Cross-attention to `memory` (LayerNorm'd too when `cfg.memory_ln`) + MLP, with residuals."""

    @nn.compact
    def __call__(self, x, memory, memory_mask=None, decode=None):
        c = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        ln1, ln2 = layers.LayerNorm(c.ln_eps, name="ln_1"), layers.LayerNorm(c.ln_eps, name="ln_2")
        if c.memory_ln:
            memory = layers.LayerNorm(c.ln_eps, name="ln_memory")(memory)
        attn = self._attention("cross_attn")
        if c.norm_first:
            x = self._residual(x, attn(ln1(x), memory, mask=memory_mask, decode=decode), "cross")
            x = self._residual(x, self._mlp()(ln2(x)), "mlp")
        else:
            x = ln1(self._residual(x, attn(x, memory, mask=memory_mask, decode=decode), "cross"))
            x = ln2(self._residual(x, self._mlp()(x), "mlp"))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SelfCrossBlock(nn.Module):
    """`EncoderBlock` (self-attention + MLP, causal per cfg), then `CrossAttentionBlock` (+ its own MLP)."""

    cfg: BlockConfig
    deterministic: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, memory=None, memory_mask=None, decode=None):
        x = EncoderBlock(self.cfg, self.deterministic, self.dtype, name="self")(x, mask, decode=decode)
        return CrossAttentionBlock(self.cfg, self.deterministic, self.dtype, name="cross")(
            x, memory, memory_mask, decode=decode)


class _ScanBody(nn.Module):
    """Adapts a block to `nn.scan`'s (carry, broadcast...) -> (carry, out) convention."""

    block_cls: Any
    cfg: BlockConfig
    deterministic: bool
    dtype: Any
    decode: str | None = None

    @nn.compact
    def __call__(self, x, *args):
        x = self.block_cls(self.cfg, self.deterministic, self.dtype, name="block")(x, *args, decode=self.decode)
        return x, None


class _ScanBodyDropPath(_ScanBody):
    """`_ScanBody` whose second input is the layer's drop-path rate (scanned over layers)."""

    @nn.compact
    def __call__(self, x, rate, *args):
        x = self.block_cls(self.cfg, self.deterministic, self.dtype, name="block")(x, *args, drop_path_rate=rate)
        return x, None


class TransformerStack(nn.Module):
    """`num_layers` identical blocks, optionally scanned and/or rematerialised.

    With `scan=True` the parameters of all layers are stacked along a leading `layers` axis
    (a logical axis name the sharding rules leave unsharded).
    """

    num_layers: int
    cfg: BlockConfig
    block: str = "encoder"  # or "decoder", "self_cross" (blocks after x: (mask, memory, memory_mask))
    scan: bool = False
    remat_policy: str = "none"
    deterministic: bool = True
    dtype: Any = jnp.float32
    # Stochastic depth rising linearly from 0 at the first layer to cfg.drop_path at the last (timm /
    # ImageBind's "progressive"); False: cfg.drop_path in every layer. Encoder blocks only.
    drop_path_progressive: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *args, decode: str | None = None) -> jax.Array:
        blocks = {"encoder": EncoderBlock, "decoder": DecoderBlock, "self_cross": SelfCrossBlock}
        if self.block not in blocks:
            raise ValueError(f"Unknown block {self.block!r}; choose one of {sorted(blocks)}.")
        block_cls = blocks[self.block]
        if self.drop_path_progressive and self.cfg.drop_path > 0:
            if decode is not None:
                raise ValueError("drop_path_progressive stacks (training-time encoders) have no decode mode.")
            return self._progressive(block_cls, x, *args)
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"Unknown remat_policy {self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}."
            )
        body = _ScanBody
        if self.remat_policy != "none":
            body = nn.remat(_ScanBody, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
        if self.scan:
            scanned = nn.scan(
                body,
                variable_axes={"params": 0, "cache": 1},  # cache leaves stay batch-major
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * len(args),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(block_cls, self.cfg, self.deterministic, self.dtype, decode, name="layers")(x, *args)
            return x
        for i in range(self.num_layers):
            x, _ = body(block_cls, self.cfg, self.deterministic, self.dtype, decode, name=f"layer_{i}")(x, *args)
        return x

    def _progressive(self, block_cls, x, *args):
        if self.block != "encoder":
            raise ValueError("drop_path_progressive supports encoder stacks only.")
        rates = np.linspace(0.0, self.cfg.drop_path, self.num_layers)
        if not self.scan:
            for i in range(self.num_layers):
                cfg = dataclasses.replace(self.cfg, drop_path=float(rates[i]))
                x, _ = self._body(_ScanBody)(block_cls, cfg, self.deterministic, self.dtype, name=f"layer_{i}")(x, *args)
            return x
        scanned = nn.scan(
            self._body(_ScanBodyDropPath),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0,) + (nn.broadcast,) * len(args),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(block_cls, self.cfg, self.deterministic, self.dtype, name="layers")(
            x, jnp.asarray(rates, jnp.float32), *args)
        return x

    def _body(self, body):
        if self.remat_policy == "none":
            return body
        return nn.remat(body, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
