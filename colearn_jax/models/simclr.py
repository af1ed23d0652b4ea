"""SimCLR's network (Chen et al. 2020, Sec. 2.1; v2 head: Chen et al. 2020b): encoder f (ResNet v1.5)
-> representation h -> projection head g -> z; optionally a linear classifier for fine-tuning.

`SimCLR.__call__(batch, train)` takes `batch["image"]` ([b, H, W, 3], uint8 or floats in [0, 1];
no mean/std normalisation, as the reference) and returns
  features  h = f(x), the representation linear evaluation and k-NN read (before the head);
  proj      z = g(h), what NT-Xent contrasts;
  ft        the head stage `ft_proj_selector` picks (0 = h, 1 = the first hidden layer, ...);
  logits    the classifier on `ft`, only when `num_classes` is set (fine-tuning).
Pretraining and fine-tuning models share the `encoder` and `head` subtrees, so a pretrained
checkpoint loads into the fine-tuning model with `train.init_from_map="encoder,head"`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.nn import layers


def to_unit_float(images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 [0, 255] -> floats in [0, 1]; floating inputs are taken to be in [0, 1] already."""
    if images.dtype == jnp.uint8:
        return images.astype(dtype) / 255.0
    return images.astype(dtype)


class SimCLR(nn.Module):
    encoder: nn.Module
    head: nn.Module
    ft_proj_selector: int = 0
    num_classes: int | None = None
    dtype: Any = jnp.float32

    def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
        """h: the encoder's pooled representation (float32)."""
        return self.encoder(to_unit_float(images), train=train)["features"]

    @nn.compact
    def __call__(self, batch: dict, train: bool = False) -> dict[str, jax.Array]:
        h = self.encode(batch["image"], train=train)
        stages = self.head(h, train=train)
        if not 0 <= self.ft_proj_selector < len(stages):
            raise ValueError(f"config.model.ft_proj_selector={self.ft_proj_selector} must index the head's "
                             f"{len(stages)} stages (0 = the representation h).")
        out = {"features": h, "proj": stages[-1], "ft": stages[self.ft_proj_selector]}
        if self.num_classes:
            # The reference's supervised head: zero-initialised logits (`zero_init_logits_layer`).
            out["logits"] = nn.Dense(
                self.num_classes, dtype=self.dtype, kernel_init=layers.zeros(("embed", "vocab")),
                bias_init=layers.zeros(("vocab",)), name="classifier",
            )(out["ft"]).astype(jnp.float32)
        return out
