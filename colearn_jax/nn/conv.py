"""Convolution and BatchNorm helpers shared by the ResNets (CLIP's ModifiedResNet in resnet.py, the
standard ResNet v1.5 in resnet_v1.py).

* Convolutions are bias-free NHWC `nn.Conv`s whose kernels carry the logical axes
  `(None, None, "channels", "embed")` (height, width, input channels, output channels), padded the
  way PyTorch pads them: `k // 2` on every side for odd kernels. flax's "SAME" pads (0, 1) for a
  stride-2 3x3 convolution on an even-sized input, which shifts the sampling grid relative to torch
  (and to TF's `Conv2dFixedPadding`, which pads symmetrically for strided convolutions too).
* Initialisers: `TORCH_CONV_INIT` is PyTorch's default Conv2d init (kaiming_uniform(a=sqrt(5)) =
  U(+-1/sqrt(fan_in))), which CLIP keeps; `HE_NORMAL_FAN_IN` is TF's `VarianceScaling()` default
  (truncated normal, variance 1/fan_in) that google-research/simclr's ResNet uses.
* BatchNorm: momentum 0.9 (torch's 0.1: flax keeps `momentum * old`), eps 1e-5, statistics in the
  `batch_stats` collection; batch statistics when training, running averages otherwise. Inside a
  `jit` over a batch sharded across a mesh the batch reductions run over the *global* batch axis,
  so XLA inserts the cross-device all-reduce itself: synchronised ("global") BatchNorm with no extra
  code. The running variance is updated with the biased batch variance (flax's convention; torch
  uses the unbiased one, n / (n - 1) larger - only training-time statistics differ).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from colearn_jax.nn import layers

TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
HE_NORMAL_FAN_IN = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
CONV_AXES = (None, None, "channels", "embed")
FEATURE_AXES = ("batch", None, None, "embed")
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def torch_padding(kernel: int):
    """Symmetric padding `kernel // 2` (torch's `padding=k//2`); "VALID" for 1x1 kernels."""
    if kernel == 1:
        return "VALID"
    if kernel % 2 == 0:
        raise ValueError(f"only odd kernel sizes are padded symmetrically; got {kernel}.")
    return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


def conv2d(features: int, kernel: int, *, stride: int = 1, dtype: Any, name: str,
           init: Callable = TORCH_CONV_INIT) -> nn.Conv:
    """A bias-free `kernel x kernel` convolution with torch padding and logical axes on its kernel."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=torch_padding(kernel),
        use_bias=False,
        dtype=dtype,
        kernel_init=layers.with_axes(init, CONV_AXES),
        name=name,
    )


def batch_norm(train: bool, dtype: Any, name: str, *, zero_scale: bool = False, use_bias: bool = True,
               axis_name: str = "embed") -> nn.BatchNorm:
    """BatchNorm over every axis but the last. `zero_scale`: gamma starts at 0 (a residual branch that
    starts as the identity); `use_bias=False`: no beta (SimCLR's uncentred last head layer)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        use_bias=use_bias,
        use_fast_variance=False,
        scale_init=layers.zeros((axis_name,)) if zero_scale else layers.ones((axis_name,)),
        bias_init=layers.zeros((axis_name,)),
        name=name,
    )


def avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch.nn.AvgPool2d(size): kernel = stride = size, no padding, floor mode."""
    return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID")


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch.nn.MaxPool2d(3, stride=2, padding=1): padding with -inf, so it never wins."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def constrain_features(x: jax.Array) -> jax.Array:
    """An NHWC feature map: batch over the data axes, channels under the `embed` rule."""
    return nn.with_logical_constraint(x, FEATURE_AXES)
