"""CLIP: contrastive language-image pre-training (Radford et al. 2021, Sec. 2.3-2.5).

Two towers (ViT or ModifiedResNet image encoder; causal text transformer), bias-free linear
projections into a joint space, L2-normalised embeddings, and a learnable logit scale initialised
to ln(1/0.07) and kept within [0, ln 100] after every update (as open_clip clamps it). The optional
logit bias turns the same model into SigLIP (Zhai et al. 2023; init scale ln 10, bias -10).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax.losses.contrastive import l2_normalize

MAX_LOGIT_SCALE = math.log(100.0)


class CLIP(nn.Module):
    """`vision` and `text` are unbound tower modules returning {"embedding", "tokens"}."""

    vision: nn.Module
    text: nn.Module
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set (e.g. -10) for SigLIP

    def setup(self):
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(self.init_logit_scale), ()), ()
        )
        if self.init_logit_bias is not None:
            self.logit_bias = self.param(
                "logit_bias", nn.with_logical_partitioning(nn.initializers.constant(self.init_logit_bias), ()), ()
            )

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """[b, H, W, C] -> L2-normalised [b, D] (float32)."""
        return l2_normalize(self.vision(images, train=train)["embedding"])

    def encode_text(self, ids: jax.Array, train: bool = False) -> jax.Array:
        """[b, L] int ids -> L2-normalised [b, D] (float32)."""
        return l2_normalize(self.text(ids, train=train)["embedding"])

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> dict[str, Any]:
        out = {
            "image_embeds": self.encode_image(batch["image"], train),
            "text_embeds": self.encode_text(batch["text"], train),
            "logit_scale": self.logit_scale,
        }
        if self.init_logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def clamp_logit_scale(params):
    """open_clip's post-step clamp: logit_scale in [0, ln 100]."""
    if "logit_scale" not in params:
        return params
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}
