"""Language-modelling losses over token sequences.

`caption_loss`: teacher-forced captioning cross-entropy (CoCa, Yu et al. 2022, Sec. 3.1, Eq. 2;
Show-Attend-Tell, Xu et al. 2015, Sec. 4.2): position t's logits predict token t+1, padding is
ignored, the mean runs over every real target token of the (global) batch, optionally with label
smoothing (Szegedy et al. 2016, Sec. 7).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def caption_loss(
    logits: jax.Array, targets: jax.Array, *, pad_id: int = 0, label_smoothing: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """logits [b, L, V] (already aligned: row t predicts targets[:, t]), targets int [b, L].

    Returns (mean cross-entropy over non-padding targets, {"caption_loss", "token_accuracy",
    "caption_tokens"}).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"caption_loss: logits {logits.shape} do not align with targets {targets.shape}.")
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    labels = jax.nn.one_hot(targets, vocab, dtype=jnp.float32)
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    ce = optax.softmax_cross_entropy(logits, labels)
    weight = (targets != pad_id).astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = (ce * weight).sum() / count
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, {"caption_loss": loss, "token_accuracy": (correct * weight).sum() / count,
                  "caption_tokens": weight.sum()}
