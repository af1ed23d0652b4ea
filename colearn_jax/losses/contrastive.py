"""Contrastive losses over the *global* batch, with interchangeable gather strategies.

- `clip_loss`: symmetric InfoNCE (Radford et al. 2021, Fig. 3; Oord et al. 2018):
  ½[CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)], s = exp(logit_scale).
- `siglip_loss`: pairwise sigmoid loss (Zhai et al. 2023, Sec. 3):
  −Σ_ij log σ(z_ij (t·x_i·y_j + b)) / B, z = 2·I − 1.
- `ntxent_loss`: SimCLR's NT-Xent (Chen et al. 2020; google-research/simclr tf2 `add_contrastive_loss`):
  mean_i CE([ab, aa]) + mean_i CE([ba, bb]) with the self-similarities of aa, bb masked by −1e9.

Every example's negatives are the whole global batch. The embeddings arrive as global arrays
sharded along the batch over the mesh's data axes; `gather` picks how the [B, B] logits are formed:

- "auto": plain global-array math; XLA/GSPMD inserts the collectives.
- "all_gather": `shard_map` — each device keeps its local rows and all-gathers the columns
  (open_clip's `--local-loss --gather-with-grad`). `lax.all_gather`'s transpose is a
  reduce-scatter, so gradients flow back to the shard that produced each column.
- "ring": `colearn_jax.losses.ring`: columns travel around the ring with `ppermute`, folded in
  chunks into an online log-sum-exp; the backward (`custom_vjp`) recomputes each block, so the
  per-device memory is O(local_batch × chunk + local_batch × D) instead of O(local_batch × B).

All modes give the same value and gradients as the single-device computation (tests/test_losses.py,
tests/test_ring_loss.py).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from colearn_jax.losses import ring

GATHER_MODES = ("auto", "all_gather", "ring")


def _check_mode(gather: str, mesh: Mesh | None):
    if gather not in GATHER_MODES:
        raise ValueError(f"Unknown contrastive gather mode {gather!r}; choose one of {GATHER_MODES}.")
    if gather != "auto" and mesh is None:
        raise ValueError(f"gather={gather!r} needs the device mesh (pass mesh=...).")


# ----------------------------------------------------------------------------- per-block terms
def _clip_block_terms(img_rows, txt_rows, img_cols, txt_cols, scale, offset, row_w=None, col_w=None):
    """Summed CE of local rows against all columns, both directions, plus correct-count. Row / column
    weights are 1 (present) or 0 (absent; default all present): absent columns are no negatives, absent
    rows add nothing."""
    b = img_rows.shape[0]
    row_w = jnp.ones((b,), jnp.float32) if row_w is None else row_w
    col_w = jnp.ones((img_cols.shape[0],), jnp.float32) if col_w is None else col_w
    labels = offset + jnp.arange(b)
    hi = jax.lax.Precision.HIGHEST

    def one_direction(rows, cols):
        logits = scale * jnp.einsum("bd,nd->bn", rows, cols, precision=hi)
        logits = jnp.where(col_w[None, :] > 0, logits, -ring.LARGE_NUM)
        lse = jax.nn.logsumexp(logits, axis=-1)
        pos = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
        hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return jnp.sum(row_w * (lse - pos)), jnp.sum(row_w * hit)

    ce_i, acc_i = one_direction(img_rows, txt_cols)
    ce_t, acc_t = one_direction(txt_rows, img_cols)
    return ce_i, ce_t, acc_i, acc_t


def _ntxent_block_terms(z1_rows, z2_rows, z1_cols, z2_cols, scale, offset):
    """SimCLR NT-Xent sums of local anchors against all columns: (Σ CE_a, Σ CE_b, correct_a, correct_b).

    Row i's logits are [ab | aa] (direction a) and [ba | bb] (direction b) over the global batch;
    its own column of aa / bb (global index offset + i) has −1e9 subtracted, the positive is
    column offset + i of ab / ba.
    """
    b, n = z1_rows.shape[0], z1_cols.shape[0]
    labels = offset + jnp.arange(b)
    self_mask = (labels[:, None] == jnp.arange(n)[None, :]).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST

    def logits(rows, cols):
        return scale * jnp.einsum("bd,nd->bn", rows, cols, precision=hi)

    def one_direction(cross, same):
        full = jnp.concatenate([cross, same - ring.LARGE_NUM * self_mask], axis=-1)
        lse = jax.nn.logsumexp(full, axis=-1)
        pos = jnp.take_along_axis(cross, labels[:, None], axis=-1)[:, 0]
        correct = jnp.sum(jnp.argmax(full, axis=-1) == labels)
        return jnp.sum(lse - pos), correct

    ce_a, acc_a = one_direction(logits(z1_rows, z2_cols), logits(z1_rows, z1_cols))
    ce_b, acc_b = one_direction(logits(z2_rows, z1_cols), logits(z2_rows, z2_cols))
    return ce_a, ce_b, acc_a, acc_b


def _siglip_block_terms(img_rows, txt_cols, scale, bias, offset):
    """Σ −log σ(z·(s·x·y + b)) over local rows × all columns."""
    b = img_rows.shape[0]
    logits = scale * jnp.einsum("bd,nd->bn", img_rows, txt_cols, precision=jax.lax.Precision.HIGHEST) + bias
    is_pos = (offset + jnp.arange(b))[:, None] == jnp.arange(txt_cols.shape[0])[None, :]
    z = jnp.where(is_pos, 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))


# ----------------------------------------------------------------------------- shard_map plumbing
def _shard_mapped(fn: Callable, mesh: Mesh, batch_axes: Sequence[str], n_batched: int, n_scalar: int):
    """Runs `fn(*local_batched, *scalars, offset)` per device; returns psum over the batch axes."""
    axes = tuple(batch_axes)

    def per_device(*args):
        local = args[:n_batched]
        offset = jax.lax.axis_index(axes) * local[0].shape[0]
        outs = fn(*args, offset)
        return jax.tree.map(lambda x: jax.lax.psum(x, axes), outs)

    in_specs = (P(axes),) * n_batched + (P(),) * n_scalar
    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P())


def clip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array,
    *,
    gather: str = "auto",
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP's symmetric InfoNCE over the global batch. Embeddings must be L2-normalised.

    Args:
      image_embeds, text_embeds: [B, D] global arrays (row i of each is a positive pair).
      logit_scale: scalar log-temperature; logits are exp(logit_scale)·cosine.
      gather: "auto" | "all_gather" | "ring".
      mesh, batch_axes: the device mesh and its axes the batch is sharded over.
      mask: optional [B] bool, False for rows whose pair is absent (ImageBind batches mixing datasets
        that lack a modality): they are neither anchors nor negatives, and the loss and accuracies
        are means over the present rows — the loss of the present rows alone (every gather mode).
    Returns:
      (loss, metrics) with metrics `i2t_acc`, `t2i_acc` (in-batch top-1) and `logit_scale` (= s).
    """
    _check_mode(gather, mesh)
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image/text embeddings differ in shape: {image_embeds.shape} vs {text_embeds.shape}")
    n = image_embeds.shape[0]
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    img = image_embeds.astype(jnp.float32)
    txt = text_embeds.astype(jnp.float32)
    w = jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask).astype(jnp.float32)
    if gather == "ring":
        ce_i, ce_t, acc_i, acc_t = ring.clip_terms(img, txt, scale, mesh=mesh, batch_axes=batch_axes, weights=w)
    elif gather == "auto":
        ce_i, ce_t, acc_i, acc_t = _clip_block_terms(img, txt, img, txt, scale, 0, w, w)
    else:
        axes = tuple(batch_axes)

        def local(img_l, txt_l, w_l, scale, offset):
            img_all, txt_all, w_all = (jax.lax.all_gather(x, axes, tiled=True) for x in (img_l, txt_l, w_l))
            return _clip_block_terms(img_l, txt_l, img_all, txt_all, scale, offset, w_l, w_all)

        ce_i, ce_t, acc_i, acc_t = _shard_mapped(local, mesh, batch_axes, 3, 1)(img, txt, w, scale)
    n = jnp.maximum(jnp.sum(w), 1.0)  # present rows (all B without a mask)
    loss = 0.5 * (ce_i + ce_t) / n
    metrics = {"i2t_acc": acc_i / n, "t2i_acc": acc_t / n, "logit_scale": scale}
    return loss, metrics


def siglip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    gather: str = "auto",
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP's pairwise sigmoid loss over the global batch (normalised by the batch size B)."""
    _check_mode(gather, mesh)
    n = image_embeds.shape[0]
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    bias = logit_bias.astype(jnp.float32)
    img = image_embeds.astype(jnp.float32)
    txt = text_embeds.astype(jnp.float32)
    if gather == "ring":
        total = ring.siglip_terms(img, txt, scale, bias, mesh=mesh, batch_axes=batch_axes)
    elif gather == "auto":
        total = _siglip_block_terms(img, txt, scale, bias, 0)
    else:
        axes = tuple(batch_axes)

        def local(img_l, txt_l, scale, bias, offset):
            return _siglip_block_terms(img_l, jax.lax.all_gather(txt_l, axes, tiled=True), scale, bias, offset)

        total = _shard_mapped(local, mesh, batch_axes, 2, 2)(img, txt, scale, bias)
    loss = total / n
    return loss, {"logit_scale": scale, "logit_bias": bias}


def ntxent_loss(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float | jax.Array,
    *,
    gather: str = "auto",
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimCLR's NT-Xent over the global batch (Chen et al. 2020), as google-research/simclr (tf2).

    z1, z2 are L2-normalised here. With s = 1/τ and N the global batch:
      ab = s·z1·z2ᵀ, aa = s·z1·z1ᵀ − 1e9·I, ba = s·z2·z1ᵀ, bb = s·z2·z2ᵀ − 1e9·I,
      loss = mean_i CE([ab, aa]_i, i) + mean_i CE([ba, bb]_i, i).
    Both directions are *summed* (the reference's `reduce_mean(loss_a + loss_b)`), which is twice
    the "mean over the 2N anchors" form used by most other ports.

    Args:
      z1, z2: [B, D] global arrays, the two augmented views (row i of each is a positive pair).
      temperature: τ (a Python float or a traced scalar; gradients flow into it).
      gather, mesh, batch_axes: as for `clip_loss`.
    Returns:
      (loss, metrics) with `contrast_acc` (top-1 of [ab, aa] at the positive, the reference's
      metric), `contrast_acc_ba` (the same for [ba, bb]) and `temperature`.
    """
    _check_mode(gather, mesh)
    if z1.shape != z2.shape:
        raise ValueError(f"the two views differ in shape: {z1.shape} vs {z2.shape}")
    n = z1.shape[0]
    tau = jnp.asarray(temperature, jnp.float32)
    scale = 1.0 / tau
    z1, z2 = l2_normalize(z1), l2_normalize(z2)
    if gather == "ring":
        ce_a, ce_b, acc_a, acc_b = ring.ntxent_terms(z1, z2, scale, mesh=mesh, batch_axes=batch_axes)
    elif gather == "auto":
        ce_a, ce_b, acc_a, acc_b = _ntxent_block_terms(z1, z2, z1, z2, scale, 0)
    else:
        axes = tuple(batch_axes)

        def local(z1_l, z2_l, scale, offset):
            z1_all = jax.lax.all_gather(z1_l, axes, tiled=True)
            z2_all = jax.lax.all_gather(z2_l, axes, tiled=True)
            return _ntxent_block_terms(z1_l, z2_l, z1_all, z2_all, scale, offset)

        ce_a, ce_b, acc_a, acc_b = _shard_mapped(local, mesh, batch_axes, 2, 1)(z1, z2, scale)
    loss = (ce_a + ce_b) / n
    metrics = {"contrast_acc": acc_a / n, "contrast_acc_ba": acc_b / n, "temperature": tau}
    return loss, metrics


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| computed in float32 (returns float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))
