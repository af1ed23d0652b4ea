"""SimCLR's projection head g(.) (Chen et al. 2020, Sec. 2.1 and 4.2; v2: Chen et al. 2020b, Sec. 2).

As google-research/simclr (tf2 `ProjectionHead`, mode "nonlinear"): `num_layers` linear layers,
each a bias-free Dense followed by BatchNorm;

* hidden layers: Dense(width = its input width) + BN (with beta) + ReLU;
* the last layer: Dense(`out_dim`, 128 by default) + BN *without centering* (no beta), no ReLU.

Dense kernels start N(0, 0.01^2) (the reference's `LinearLayer`). `num_layers=2` is SimCLR v1's
head (one hidden layer), 3 is v2's; 0 means no head (the contrastive loss sees h itself).

`__call__` returns every stage, `[h, g1(h), g2(g1(h)), ..., z]`: index 0 is the representation the
head takes (SimCLR's h, used for linear evaluation), the last is z (the loss's input), and
`ft_proj_selector` of the reference picks the one fine-tuning builds on (v2 fine-tunes from the
first hidden layer, index 1).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.nn import conv, layers

DENSE_STD = 0.01


class ProjectionHead(nn.Module):
    num_layers: int = 3
    out_dim: int = 128
    hidden_dim: int | None = None  # None: the input width (the reference)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> list[jax.Array]:
        if self.num_layers < 0:
            raise ValueError(f"ProjectionHead num_layers={self.num_layers} must be >= 0.")
        stages = [h]
        x = h
        for j in range(self.num_layers):
            last = j == self.num_layers - 1
            width = self.out_dim if last else (self.hidden_dim or x.shape[-1])
            out_axis = "proj" if last else "mlp"
            x = nn.Dense(width, use_bias=False, dtype=self.dtype,
                         kernel_init=layers.normal(DENSE_STD, ("embed", out_axis)), name=f"layer_{j}")(x)
            x = conv.batch_norm(train, self.dtype, f"bn_{j}", use_bias=not last, axis_name=out_axis)(x)
            if not last:
                x = nn.relu(x)
            x = nn.with_logical_constraint(x, ("batch", out_axis))
            stages.append(x)
        return stages
