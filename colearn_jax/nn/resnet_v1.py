"""The standard ResNet (He et al. 2016, "Deep Residual Learning"), v1.5: SimCLR's encoder (Chen et al.
2020, Sec. 2.1 and App. B.9), with the torchvision layout so torchvision-style checkpoints import.

* Depths 18 / 34 (basic blocks: 3x3 -> 3x3) and 50 / 101 / 152 (bottlenecks: 1x1 -> 3x3 -> 1x1 x4),
  or any `stage_sizes` with a named `block` (the tiny test variants). "v1.5": a bottleneck strides in
  its 3x3 convolution, not its first 1x1 (torchvision, and google-research/simclr's `resnet.py`).
* Width: stage i has `round(64 * width_multiplier) * 2^i` planes (SimCLR's 1x / 2x / 4x; fractions
  give narrow CPU variants).
* Stem: 7x7 stride-2 convolution, BN, ReLU, 3x3 stride-2 max pool (torch padding 1); or the CIFAR
  stem (`cifar_stem=True`, SimCLR App. B.9): one 3x3 stride-1 convolution, BN, ReLU, no pool.
* Projection shortcut (1x1 conv + BN) where the shape changes (stride or width): torchvision's
  rule. (The TF reference gives the first block of *every* stage a projection, also ResNet-18/34's
  first stage where the shape is unchanged; we follow torchvision so its weights map one-to-one.)
* The last BN of each residual branch starts with gamma = 0 (`zero_init_residual`, the reference's
  `init_zero`), convolutions with TF's `VarianceScaling()` (the reference's init).
* Output: the global average pool of the last stage (SimCLR's representation h, 2048-d for
  ResNet-50 1x) as `features`, plus the final feature map.

Convolutions, padding and (global) BatchNorm come from `colearn_jax.nn.conv`, shared with CLIP's
ModifiedResNet. Parameter names follow torchvision with "." -> "_" between a stage and its block
(`layer2_0/conv1`, `layer2_0/downsample_bn`), so `colearn_jax.convert.resnet_v1` is a renaming.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.nn import conv

# depth -> (block, stage sizes)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


class ResidualBlock(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 to 4x planes) residual block."""

    planes: int
    block: str = "bottleneck"
    stride: int = 1
    zero_init_residual: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def cv(features, kernel, stride, name):
            return conv.conv2d(features, kernel, stride=stride, dtype=self.dtype, name=name,
                               init=conv.HE_NORMAL_FAN_IN)

        def bn(name, last=False):
            return conv.batch_norm(train, self.dtype, name, zero_scale=last and self.zero_init_residual)

        out_ch = self.planes * EXPANSION[self.block]
        if self.block == "basic":
            out = nn.relu(bn("bn1")(cv(self.planes, 3, self.stride, "conv1")(x)))
            out = bn("bn2", last=True)(cv(self.planes, 3, 1, "conv2")(out))
        else:
            out = nn.relu(bn("bn1")(cv(self.planes, 1, 1, "conv1")(x)))
            out = nn.relu(bn("bn2")(cv(self.planes, 3, self.stride, "conv2")(out)))
            out = bn("bn3", last=True)(cv(out_ch, 1, 1, "conv3")(out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_ch:
            shortcut = bn("downsample_bn")(cv(out_ch, 1, self.stride, "downsample_conv")(x))
        return conv.constrain_features(nn.relu(out + shortcut))


class ResNetV1(nn.Module):
    """ResNet v1.5. `__call__(images [b, H, W, 3], train=False)` -> `{"features": [b, C],
    "feature_map": [b, h, w, C]}` with C = `num_features`.

    `depth` picks the block and stage sizes from `DEPTHS`; `stage_sizes` + `block` override them.
    """

    depth: int = 50
    width_multiplier: float = 1.0
    cifar_stem: bool = False
    stage_sizes: tuple[int, ...] | None = None
    block: str | None = None
    zero_init_residual: bool = True
    dtype: Any = jnp.float32

    @property
    def architecture(self) -> tuple[str, tuple[int, ...]]:
        if self.stage_sizes is not None:
            block = self.block or "basic"
            if block not in EXPANSION:
                raise ValueError(f"ResNetV1 block={block!r}; choose one of {sorted(EXPANSION)}.")
            if not self.stage_sizes or min(self.stage_sizes) < 1:
                raise ValueError(f"ResNetV1 stage_sizes={self.stage_sizes} must be positive block counts.")
            return block, tuple(self.stage_sizes)
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNetV1 depth={self.depth}; choose one of {sorted(DEPTHS)} or give stage_sizes.")
        return DEPTHS[self.depth]

    @property
    def base_width(self) -> int:
        width = int(round(64 * self.width_multiplier))
        if width < 1:
            raise ValueError(f"ResNetV1 width_multiplier={self.width_multiplier} leaves no channels.")
        return width

    @property
    def num_features(self) -> int:
        block, stages = self.architecture
        return self.base_width * 2 ** (len(stages) - 1) * EXPANSION[block]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if images.ndim != 4:
            raise ValueError(f"ResNetV1 expects images [batch, H, W, channels]; got {images.shape}.")
        block, stages = self.architecture
        width = self.base_width
        x = nn.with_logical_constraint(images.astype(self.dtype), ("batch", None, None, None))
        kernel, stride = (3, 1) if self.cifar_stem else (7, 2)
        x = conv.conv2d(width, kernel, stride=stride, dtype=self.dtype, name="conv1", init=conv.HE_NORMAL_FAN_IN)(x)
        x = conv.constrain_features(nn.relu(conv.batch_norm(train, self.dtype, "bn1")(x)))
        if not self.cifar_stem:
            x = conv.max_pool_3x3_s2(x)
        for i, n_blocks in enumerate(stages):
            for j in range(n_blocks):
                x = ResidualBlock(width * 2**i, block, stride=2 if (i > 0 and j == 0) else 1,
                                  zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                                  name=f"layer{i + 1}_{j}")(x, train=train)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features = nn.with_logical_constraint(features, ("batch", "embed"))
        return {"features": features, "feature_map": x}
