"""Vision Transformer image tower (Dosovitskiy et al. 2021, Sec. 3.1), in CLIP's layout.

Bias-free patch embedding (or, with `stem="conv"`, the convolutional stem of Xiao et al. 2021,
"Early Convolutions Help Transformers See Better", Sec. 3: stride-2 3x3 convolutions, each followed by
a normalisation and a nonlinearity, then a 1x1 convolution to the width - the same token grid, far
easier to optimise from scratch on small data), class token, learned positions, `ln_pre` (CLIP), a pre-LN transformer
stack, `ln_post` on the pooled token and an optional bias-free projection (Radford et al. 2021,
Sec. 2.4). Returns the pooled (projected) embedding and all tokens (for CoCa / mPLUG fusion);
`pool="none"` returns the tokens only, with no `ln_post` / projection (a model pooling them itself).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.nn import layers
from colearn_jax.nn.transformer import BlockConfig, TransformerStack


class VisionTransformer(nn.Module):
    image_size: int
    patch_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_ratio: float = 4.0
    output_dim: int | None = None  # bias-free projection after ln_post; None = no projection
    activation: str = "gelu"
    pool: str = "cls"  # "cls" (class token), "gap" (mean of patch tokens) or "none" (tokens only)
    ln_pre: bool = True
    stem: str = "patch"  # "patch" (one patch_size x patch_size convolution) or "conv" (Xiao et al. 2021)
    ln_eps: float = 1e-5
    scan: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None
    dropout: float = 0.0  # residual-branch dropout (draws from the "dropout" RNG stream when train=True)
    dtype: Any = jnp.float32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def _stem(self, images: jax.Array) -> jax.Array:
        """[b, H, W, C] -> [b, grid, grid, width]."""
        def conv(features, size, stride, name):
            return nn.Conv(features, (size, size), strides=(stride, stride), padding="VALID" if size == stride else 1,
                           use_bias=False, dtype=self.dtype, name=name,
                           kernel_init=layers.with_axes(nn.initializers.lecun_normal(),
                                                        (None, None, "channels", "embed")))

        if self.stem == "patch":
            return conv(self.width, self.patch_size, self.patch_size, "patch_embed")(images)
        if self.stem != "conv":
            raise ValueError(f"VisionTransformer.stem={self.stem!r}; choose 'patch' or 'conv'.")
        depth = self.patch_size.bit_length() - 1
        if self.patch_size != 1 << depth or depth < 1:
            raise ValueError(f"stem='conv' halves the resolution per layer: patch_size must be a power of two "
                             f">= 2, got {self.patch_size}.")
        x = images
        for i in range(depth):  # channels double up to width / 2 at the last 3x3 layer (Xiao et al. Table 1)
            x = conv(max(self.width >> (depth - i), 8), 3, 2, f"stem_conv{i}")(x)
            x = nn.gelu(layers.LayerNorm(self.ln_eps, name=f"stem_norm{i}")(x))
        return conv(self.width, 1, 1, "stem_proj")(x)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """images: [b, H, W, C] float -> {"embedding": [b, D], "tokens": [b, 1 + grid^2, width]}."""
        if images.ndim != 4 or images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(
                f"VisionTransformer expects images of shape [batch, {self.image_size}, "
                f"{self.image_size}, channels]; got {images.shape}."
            )
        scale = self.width**-0.5
        x = self._stem(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)
        cls = self.param("class_embedding", layers.normal(scale, ("embed",)), (self.width,))
        pos = self.param(
            "positional_embedding", layers.normal(scale, ("length", "embed")), (self.grid**2 + 1, self.width)
        )
        cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if self.ln_pre:
            x = layers.LayerNorm(self.ln_eps, name="ln_pre")(x)
        cfg = BlockConfig.clip_init(
            self.num_heads, self.width, self.num_layers,
            mlp_dim=int(self.width * self.mlp_ratio), activation=self.activation, ln_eps=self.ln_eps,
            attention_impl=self.attention_impl, dropout=self.dropout,
        )
        x = TransformerStack(
            self.num_layers, cfg, scan=self.scan, remat_policy=self.remat_policy,
            deterministic=not train, dtype=self.dtype, name="transformer",
        )(x)
        if self.pool == "none":
            return {"tokens": x}
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"VisionTransformer.pool={self.pool!r}; choose 'cls', 'gap' or 'none'.")
        pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(axis=1)
        pooled = layers.LayerNorm(self.ln_eps, name="ln_post")(pooled)
        if self.output_dim is not None:
            proj = self.param(
                "proj", layers.normal(scale, ("embed", "proj")), (self.width, self.output_dim)
            )
            pooled = pooled @ proj.astype(pooled.dtype)
        return {"embedding": pooled, "tokens": x}
