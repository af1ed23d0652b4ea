"""CLIP's ModifiedResNet image tower (Radford et al. 2021, Sec. 2.4).

A ResNet-D style network (He et al. 2016, "Deep Residual Learning"; He et al. 2019, "Bag of
Tricks") with the three changes CLIP made:

* a stem of three 3x3 convolutions (stride 2, 1, 1; widths w/2, w/2, w) followed by a 2x2 average
  pool instead of one 7x7 convolution and a max pool;
* anti-aliased down-sampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"):
  every strided convolution is replaced by a stride-1 convolution preceded (shortcut) or followed
  (main path, after the 3x3 conv) by an average pool of size = stride;
* the global average pool is replaced by an attention pool: the HxW feature tokens plus their mean
  (prepended) get learned positions, and the mean token is the single query of a multi-head
  attention over all tokens, whose output projection maps to `output_dim`.

Layout follows OpenAI CLIP / open_clip, so their checkpoints convert one-to-one
(`colearn_jax.convert.resnet.modified_resnet_from_torch`). Images are NHWC. Convolutions (torch
padding, torch's default init) and BatchNorm (global over a sharded batch, momentum 0.9, eps 1e-5)
come from `colearn_jax.nn.conv`, shared with the standard ResNet of `resnet_v1.py`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.nn import conv, layers
from colearn_jax.nn.attention import MultiHeadAttention

EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (-> AvgPool(stride)) -> 1x1 (x4) residual block with an anti-aliased shortcut."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_ch = self.planes * EXPANSION
        out = conv.conv2d(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(conv.batch_norm(train, self.dtype, "bn1")(out))
        out = conv.conv2d(self.planes, 3, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(conv.batch_norm(train, self.dtype, "bn2")(out))
        if self.stride > 1:
            out = conv.avg_pool(out, self.stride)
        out = conv.conv2d(out_ch, 1, dtype=self.dtype, name="conv3")(out)
        out = conv.batch_norm(train, self.dtype, "bn3", zero_scale=True)(out)

        identity = x
        if self.stride > 1 or x.shape[-1] != out_ch:
            if self.stride > 1:
                identity = conv.avg_pool(identity, self.stride)
            identity = conv.conv2d(out_ch, 1, dtype=self.dtype, name="downsample_conv")(identity)
            identity = conv.batch_norm(train, self.dtype, "downsample_bn")(identity)
        out = nn.relu(out + identity)
        return nn.with_logical_constraint(out, conv.FEATURE_AXES)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool: the mean token (plus positions) queries all HxW+1 tokens."""

    num_heads: int
    output_dim: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [b, n, d] -> [b, output_dim]."""
        b, n, d = tokens.shape
        std = d**-0.5
        pos = self.param(
            "positional_embedding", layers.normal(std, ("length", "embed")), (n + 1, d)
        )
        mean = jnp.mean(tokens.astype(jnp.float32), axis=1, keepdims=True).astype(tokens.dtype)
        x = jnp.concatenate([mean, tokens], axis=1) + pos.astype(tokens.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        out = MultiHeadAttention(
            num_heads=self.num_heads,
            out_features=self.output_dim,
            qkv_std=std,
            out_std=std,
            use_bias=True,
            implementation=self.attention_impl,
            dtype=self.dtype,
            name="attn",
        )(x[:, :1], x)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    """CLIP ModifiedResNet (RN50: layers=(3, 4, 6, 3), width=64, output_dim=1024, num_heads=32).

    `__call__(images [b, H, W, 3], train=False)` returns
    `{"embedding": [b, output_dim], "tokens": [b, (H/32)^2, width*32]}` where `tokens` is the final
    feature map (before the attention pool, without positions), flattened row-major.
    H and W must give a final grid of `image_size // 32` per side (the positional table's size).
    """

    layers: tuple[int, ...]
    output_dim: int
    num_heads: int
    image_size: int = 224
    width: int = 64
    attention_impl: str | None = None
    dtype: Any = jnp.float32

    @property
    def grid(self) -> int:
        return self.image_size // 32

    @property
    def embed_dim(self) -> int:
        return self.width * 32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if images.ndim != 4:
            raise ValueError(f"ModifiedResNet expects images [batch, H, W, channels]; got {images.shape}.")
        if len(self.layers) != 4:
            raise ValueError(f"ModifiedResNet needs 4 stage depths; got layers={tuple(self.layers)}.")
        if self.width % 2:
            raise ValueError(f"ModifiedResNet width must be even (stem uses width/2); got {self.width}.")
        x = nn.with_logical_constraint(images.astype(self.dtype), ("batch", None, None, None))

        # Stem: three 3x3 convs (the first with stride 2), then AvgPool 2.
        half = self.width // 2
        for i, (features, stride) in enumerate([(half, 2), (half, 1), (self.width, 1)], start=1):
            x = conv.conv2d(features, 3, stride=stride, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(conv.batch_norm(train, self.dtype, f"bn{i}")(x))
            x = nn.with_logical_constraint(x, conv.FEATURE_AXES)
        x = conv.avg_pool(x, 2)

        for stage, (depth, stride) in enumerate(zip(self.layers, (1, 2, 2, 2)), start=1):
            planes = self.width * 2 ** (stage - 1)
            for j in range(depth):
                x = Bottleneck(
                    planes, stride if j == 0 else 1, dtype=self.dtype, name=f"layer{stage}_{j}"
                )(x, train=train)

        b, h, w, c = x.shape
        if (h, w) != (self.grid, self.grid):
            raise ValueError(
                f"ModifiedResNet(image_size={self.image_size}) expects a final {self.grid}x{self.grid} "
                f"feature grid (images of {self.image_size}x{self.image_size}); images "
                f"{images.shape[1]}x{images.shape[2]} give {h}x{w}."
            )
        tokens = nn.with_logical_constraint(x.reshape(b, h * w, c), ("batch", "length", "embed"))
        embedding = AttentionPool2d(
            self.num_heads, self.output_dim, dtype=self.dtype, attention_impl=self.attention_impl,
            name="attnpool",
        )(tokens)
        embedding = nn.with_logical_constraint(embedding, ("batch", "embed"))
        return {"embedding": embedding, "tokens": tokens}
