"""Ring-mode global contrastive losses: blockwise logits, online log-sum-exp, recompute in backward.

The embeddings are global [B, D] arrays sharded along the batch over `batch_axes` (flattened,
row-major, so device r of the n batch devices holds rows r·b … r·b+b−1 with b = B/n; any other mesh
axis, e.g. "model", holds replicas and runs its own identical ring). Inside `jax.shard_map`:

Forward. Every device keeps its local rows. The column blocks (the local embeddings of both
modalities/views) travel around the ring with `lax.ppermute` (device r → r+1; n−1 hops), so at hop k
device r holds the block of device j = (r − k) mod n. Each block is consumed in column chunks of at
most `block_size` columns: the [b, chunk] logits are folded into a running max m, running sum
l = Σ exp(x − m) and a running arg-max (ties resolved towards the smaller global index, exactly like
`jnp.argmax` on the full row) and then dropped. The full [b, B] logit matrix never exists; the
per-device temporaries are O(b·chunk + b·D). The positive logit s·⟨row_i, col_i⟩ needs only local
data. Outputs are the global sums Σ_i (lse_i − pos_i) and the top-1 correct counts (psum'ed).

Backward (`jax.custom_vjp`). The saved residuals are the inputs (local [b, D] rows of each device),
the scale and the final log-sum-exp per row: O(b·D + b) per device. The backward sends the column
blocks around the ring again, together with an accumulator of their gradients; every device
recomputes each chunk's probabilities p = exp(x − lse), adds s·g·p·C to its row gradient and
s·g·pᵀ·R to the travelling column gradient, and g·Σ p·⟨r, c⟩ to the scale gradient. After the n-th
hop each column-gradient accumulator is back on its owner (n ppermutes of it in all). The positive
term −s·⟨r_i, c_i⟩ is differentiated locally. d scale is psum'ed over the batch axes.

SigLIP has no normaliser: the forward sums softplus(−z·(s·x·y + b)) blockwise and the backward
recomputes each chunk's σ(−z·logit) the same way.

Memory model (per device, fp32): auto ≈ a few × b·B (GSPMD shards the [B, B] logits by rows),
all_gather ≈ a few × b·B plus the gathered [B, D] columns, ring ≈ a few × b·min(b, block_size)
plus O(b·D). With the default block size the ring temp grows linearly in the per-device batch.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

# Largest column chunk folded at once (per hop the [b, D] block is consumed in chunks of this size).
DEFAULT_BLOCK_SIZE = 512
# SimCLR's self-similarity mask: logits_aa − LARGE_NUM·I (google-research/simclr, tf2 objective).
LARGE_NUM = 1e9
_HI = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- helpers
def _num_batch_devices(mesh: Mesh, axes: tuple[str, ...]) -> int:
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"batch_axes {axes} name axes {missing} that mesh {dict(mesh.shape)} does not have.")
    return math.prod(mesh.shape[a] for a in axes)


def _chunk_size(b: int, block_size: int) -> int:
    """Largest divisor of the local batch b that is at most block_size."""
    c = max(1, min(b, int(block_size)))
    while b % c:
        c -= 1
    return c


def _check_batch(x: jax.Array, n: int, axes):
    if x.ndim != 2:
        raise ValueError(f"ring losses take [B, D] embeddings; got shape {x.shape}.")
    if x.shape[0] % n:
        raise ValueError(f"global batch {x.shape[0]} is not divisible by the {n} devices along {axes}.")


def _varying(x, axes):
    """Marks a device-invariant value as varying over `axes` (needed for loop carries under check_vma)."""
    mat = getattr(jax.typeof(x), "mat", None)
    vma = mat.varying if mat is not None else frozenset()
    missing = tuple(a for a in axes if a not in vma)
    return lax.pcast(x, missing, to="varying") if missing else x


def _shifter(axes, n):
    """Sends every device's value to the next device along the flattened batch axes."""
    if n == 1:
        return lambda tree: tree
    perm = [(i, (i + 1) % n) for i in range(n)]
    return lambda tree: jax.tree.map(lambda x: lax.ppermute(x, axes, perm), tree)


def _slice(tree, start, size):
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis=0), tree)


def _ring_forward(cols, state, visit, *, axes, n, chunk):
    """Folds every (hop, chunk) of the travelling column blocks into `state`: n−1 ppermutes."""
    b = cols[0].shape[0]
    r = lax.axis_index(axes)
    shift = _shifter(axes, n)

    def hop(k, cols, state):
        j = (r - k) % n

        def chunk_body(ci, state):
            c0 = ci * chunk
            return visit(state, _slice(cols, c0, chunk), j, c0, k)

        return lax.fori_loop(0, b // chunk, chunk_body, state)

    state = hop(0, cols, state)

    def body(k, carry):
        cols, state = carry
        cols = shift(cols)
        return cols, hop(k, cols, state)

    _, state = lax.fori_loop(1, n, body, (cols, state))
    return state


def _ring_backward(cols, state, visit, *, axes, n, chunk):
    """Like `_ring_forward`, plus travelling column-gradient accumulators that end at their owner.

    `visit(state, col_chunks, j, c0, k) -> (state, d_col_chunks)`. Returns (d_cols, state).
    """
    b = cols[0].shape[0]
    r = lax.axis_index(axes)
    shift = _shifter(axes, n)
    dcols = jax.tree.map(lambda c: _varying(jnp.zeros_like(c), axes), cols)

    def hop(k, cols, dcols, state):
        j = (r - k) % n

        def chunk_body(ci, carry):
            dcols, state = carry
            c0 = ci * chunk
            state, dblk = visit(state, _slice(cols, c0, chunk), j, c0, k)
            dcols = jax.tree.map(
                lambda acc, d: lax.dynamic_update_slice_in_dim(
                    acc, lax.dynamic_slice_in_dim(acc, c0, chunk, axis=0) + d, c0, axis=0),
                dcols, dblk)
            return dcols, state

        return lax.fori_loop(0, b // chunk, chunk_body, (dcols, state))

    def body(k, carry):
        cols, dcols, state = carry
        dcols, state = hop(k, cols, dcols, state)
        return shift(cols), shift(dcols), state

    cols, dcols, state = lax.fori_loop(0, n - 1, body, (cols, dcols, state))
    dcols, state = hop(n - 1, cols, dcols, state)
    # The block processed last on device r belongs to device r+1: one more hop takes it home.
    return shift(dcols), state


# ----------------------------------------------------------------------------- softmax CE engine
# A "direction" is (row_index, segments): the rows are embeds[row_index] (local), the logits row is
# the concatenation over segments (col_index, mask_self) of s·rows·embeds[col_index]ᵀ over the
# global batch, with −LARGE_NUM on the row's own column where mask_self. The positive of row i is
# column i of segment 0.
_CLIP_DIRECTIONS = ((0, ((1, False),)), (1, ((0, False),)))          # image→text, text→image
_NTXENT_DIRECTIONS = ((0, ((1, False), (0, True))), (1, ((0, False), (1, True))))  # [ab, aa], [ba, bb]


def _self_mask(b, chunk, c0, k):
    """[b, chunk] float mask of the row's own column; only on hop 0 (the device's own block)."""
    own = jnp.arange(b)[:, None] == (c0 + jnp.arange(chunk))[None, :]
    return (own & (k == 0)).astype(jnp.float32)


def _logits(rows, cols, scale, mask_self, c0, k):
    raw = jnp.einsum("bd,cd->bc", rows, cols, precision=_HI)
    x = scale * raw
    if mask_self:
        x = x - LARGE_NUM * _self_mask(rows.shape[0], cols.shape[0], c0, k)
    return raw, x


def _present(x, w_cols):
    """Absent columns (weight 0) are no negatives: their logits drop to −LARGE_NUM."""
    return jnp.where(w_cols[None, :] > 0, x, -LARGE_NUM)


def _softmax_fwd_local(embeds, w, scale, *, directions, axes, n, chunk):
    """`w`: this device's row weights (1 present, 0 absent); it travels with the column blocks."""
    b = embeds[0].shape[0]
    big_b = n * b
    r = lax.axis_index(axes)
    row_gidx = r * b + jnp.arange(b)

    def init():
        return (
            _varying(jnp.full((b,), -jnp.inf, jnp.float32), axes),   # running max
            _varying(jnp.zeros((b,), jnp.float32), axes),            # running Σ exp(x − m)
            _varying(jnp.full((b,), -jnp.inf, jnp.float32), axes),   # best logit
            _varying(jnp.full((b,), jnp.iinfo(jnp.int32).max, jnp.int32), axes),  # its concat index
        )

    def visit(state, blk, j, c0, k):
        new = []
        for (ri, segments), (m, l, best, bidx) in zip(directions, state):
            for si, (ci, mask_self) in enumerate(segments):
                _, x = _logits(embeds[ri], blk[ci], scale, mask_self, c0, k)
                x = _present(x, blk[-1])
                bm = jnp.max(x, axis=-1)
                bi = si * big_b + j * b + c0 + jnp.argmax(x, axis=-1).astype(jnp.int32)
                m_new = jnp.maximum(m, bm)
                l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=-1)
                m = m_new
                take = (bm > best) | ((bm == best) & (bi < bidx))
                best = jnp.where(take, bm, best)
                bidx = jnp.where(take, bi, bidx)
            new.append((m, l, best, bidx))
        return tuple(new)

    state = _ring_forward((*embeds, w), tuple(init() for _ in directions), visit, axes=axes, n=n, chunk=chunk)
    ces, corrects, lses = [], [], []
    for (ri, segments), (m, l, _, bidx) in zip(directions, state):
        lse = m + jnp.log(l)
        pos = scale * jnp.sum(embeds[ri] * embeds[segments[0][0]], axis=-1)
        ces.append(lax.psum(jnp.sum(w * (lse - pos)), axes))
        corrects.append(lax.psum(jnp.sum((bidx == row_gidx) & (w > 0)), axes))
        lses.append(lse)
    return tuple(ces), tuple(corrects), tuple(lses)


def _softmax_bwd_local(embeds, w, scale, lses, gs, *, directions, axes, n, chunk):
    drows = tuple(_varying(jnp.zeros_like(e), axes) for e in embeds)
    ds = _varying(jnp.zeros((), jnp.float32), axes)

    def visit(state, blk, j, c0, k):
        drows, ds = state
        drows = list(drows)
        dblk = [jnp.zeros_like(c) for c in blk]
        for (ri, segments), lse, g in zip(directions, lses, gs):
            rows = embeds[ri]
            for ci, mask_self in segments:
                raw, x = _logits(rows, blk[ci], scale, mask_self, c0, k)
                x = _present(x, blk[-1])
                gp = (g * w)[:, None] * jnp.exp(x - lse[:, None])  # g·w_row·softmax, [b, chunk]
                drows[ri] = drows[ri] + scale * jnp.einsum("bc,cd->bd", gp, blk[ci], precision=_HI)
                dblk[ci] = dblk[ci] + scale * jnp.einsum("bc,bd->cd", gp, rows, precision=_HI)
                ds = ds + jnp.sum(gp * raw)
        return (tuple(drows), ds), tuple(dblk)

    dcols, (drows, ds) = _ring_backward((*embeds, w), (drows, ds), visit, axes=axes, n=n, chunk=chunk)
    grads = [dr + dc for dr, dc in zip(drows, dcols[: len(embeds)])]  # the weights take no gradient
    # Positive terms −s·w_i·⟨rows_i, cols_i⟩ (local rows of both arrays).
    for (ri, segments), g in zip(directions, gs):
        ci = segments[0][0]
        gw = (g * w)[:, None]
        grads[ri] = grads[ri] - gw * scale * embeds[ci]
        grads[ci] = grads[ci] - gw * scale * embeds[ri]
        ds = ds - g * jnp.sum(w * jnp.sum(embeds[ri] * embeds[ci], axis=-1))
    return tuple(grads), lax.psum(ds, axes)


@functools.lru_cache(maxsize=None)
def _softmax_ring_fn(mesh: Mesh, axes: tuple[str, ...], directions, block_size: int, local_b: int):
    n = _num_batch_devices(mesh, axes)
    chunk = _chunk_size(local_b, block_size)
    nd = len(directions)
    rows, rep = P(axes), P()
    kw = dict(directions=directions, axes=axes, n=n, chunk=chunk)

    fwd_sm = jax.shard_map(
        lambda e0, e1, w, s: _softmax_fwd_local((e0, e1), w, s, **kw),
        mesh=mesh, in_specs=(rows, rows, rows, rep), out_specs=((rep,) * nd, (rep,) * nd, (rows,) * nd))

    def bwd_local(e0, e1, w, s, lses, gs):
        (d0, d1), ds = _softmax_bwd_local((e0, e1), w, s, lses, gs, **kw)
        return d0, d1, ds

    bwd_sm = jax.shard_map(
        bwd_local, mesh=mesh, in_specs=(rows, rows, rows, rep, (rows,) * nd, (rep,) * nd),
        out_specs=(rows, rows, rep))

    @jax.custom_vjp
    def terms(e0, e1, w, scale):
        ces, corrects, _ = fwd_sm(e0, e1, w, scale)
        return ces, corrects

    def terms_fwd(e0, e1, w, scale):
        ces, corrects, lses = fwd_sm(e0, e1, w, scale)
        return (ces, corrects), (e0, e1, w, scale, lses)

    def terms_bwd(res, cts):
        e0, e1, w, scale, lses = res
        g_ces, _ = cts  # the correct counts are integers (float0 cotangents)
        gs = tuple(jnp.asarray(g, jnp.float32) for g in g_ces)
        d0, d1, ds = bwd_sm(e0, e1, w, scale, lses, gs)
        return d0, d1, jnp.zeros_like(w), ds  # row weights are data, not parameters

    terms.defvjp(terms_fwd, terms_bwd)
    return terms


def _softmax_terms(a, b, scale, directions, mesh, batch_axes, block_size, weights=None):
    axes = tuple(batch_axes)
    n = _num_batch_devices(mesh, axes)
    _check_batch(a, n, axes)
    if a.shape != b.shape:
        raise ValueError(f"ring losses need equal embedding shapes; got {a.shape} vs {b.shape}.")
    fn = _softmax_ring_fn(mesh, axes, directions, int(block_size), a.shape[0] // n)
    w = jnp.ones(a.shape[:1], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    ces, corrects = fn(a.astype(jnp.float32), b.astype(jnp.float32), w, jnp.asarray(scale, jnp.float32))
    return (*ces, *corrects)


def clip_terms(
    img: jax.Array,
    txt: jax.Array,
    scale: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    block_size: int = DEFAULT_BLOCK_SIZE,
    weights: jax.Array | None = None,
):
    """CLIP InfoNCE sums over the global batch, ring mode.

    Args:
      img, txt: [B, D] global (L2-normalised) embeddings sharded along the batch over `batch_axes`.
      scale: the logit multiplier s (= exp(logit_scale)), a scalar.
      weights: optional [B] row weights, 1 present / 0 absent: absent rows are no negatives and add
        nothing (they travel the ring with their column block).
    Returns:
      (ce_i_sum, ce_t_sum, correct_i, correct_t): Σ_i CE of image row i against all texts, Σ_i CE of
      text row i against all images, and the in-batch top-1 correct counts; global (psum'ed) values.
    """
    return _softmax_terms(img, txt, scale, _CLIP_DIRECTIONS, mesh, batch_axes, block_size, weights)


def ntxent_terms(
    z1: jax.Array,
    z2: jax.Array,
    scale: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    block_size: int = DEFAULT_BLOCK_SIZE,
):
    """SimCLR NT-Xent sums, ring mode: (Σ CE([ab, aa]), Σ CE([ba, bb]), correct_a, correct_b).

    scale = 1/τ; the self-similarity of aa and bb is masked by −LARGE_NUM (only in the hop-0 block,
    the one holding the device's own rows).
    """
    return _softmax_terms(z1, z2, scale, _NTXENT_DIRECTIONS, mesh, batch_axes, block_size)


# ----------------------------------------------------------------------------- SigLIP
def _siglip_chunk(rows, cols, scale, bias, c0, k):
    raw = jnp.einsum("bd,cd->bc", rows, cols, precision=_HI)
    z = 2.0 * _self_mask(rows.shape[0], cols.shape[0], c0, k) - 1.0
    return raw, z, scale * raw + bias


def _siglip_fwd_local(img, txt, scale, bias, *, axes, n, chunk):
    def visit(total, blk, j, c0, k):
        _, z, logits = _siglip_chunk(img, blk[0], scale, bias, c0, k)
        return total - jnp.sum(jax.nn.log_sigmoid(z * logits))

    total = _ring_forward((txt,), _varying(jnp.zeros((), jnp.float32), axes), visit, axes=axes, n=n, chunk=chunk)
    return lax.psum(total, axes)


def _siglip_bwd_local(img, txt, scale, bias, g, *, axes, n, chunk):
    def visit(state, blk, j, c0, k):
        dimg, ds, db = state
        raw, z, logits = _siglip_chunk(img, blk[0], scale, bias, c0, k)
        gl = -g * z * jax.nn.sigmoid(-z * logits)       # d/dlogit of −log σ(z·logit), times g
        dimg = dimg + scale * jnp.einsum("bc,cd->bd", gl, blk[0], precision=_HI)
        dtxt = scale * jnp.einsum("bc,bd->cd", gl, img, precision=_HI)
        return (dimg, ds + jnp.sum(gl * raw), db + jnp.sum(gl)), (dtxt,)

    zero = _varying(jnp.zeros((), jnp.float32), axes)
    state = (_varying(jnp.zeros_like(img), axes), zero, zero)
    (dtxt,), (dimg, ds, db) = _ring_backward((txt,), state, visit, axes=axes, n=n, chunk=chunk)
    return dimg, dtxt, lax.psum(ds, axes), lax.psum(db, axes)


@functools.lru_cache(maxsize=None)
def _siglip_ring_fn(mesh: Mesh, axes: tuple[str, ...], block_size: int, local_b: int):
    n = _num_batch_devices(mesh, axes)
    kw = dict(axes=axes, n=n, chunk=_chunk_size(local_b, block_size))
    rows, rep = P(axes), P()
    fwd_sm = jax.shard_map(functools.partial(_siglip_fwd_local, **kw), mesh=mesh,
                           in_specs=(rows, rows, rep, rep), out_specs=rep)
    bwd_sm = jax.shard_map(functools.partial(_siglip_bwd_local, **kw), mesh=mesh,
                           in_specs=(rows, rows, rep, rep, rep), out_specs=(rows, rows, rep, rep))

    @jax.custom_vjp
    def total(img, txt, scale, bias):
        return fwd_sm(img, txt, scale, bias)

    def total_fwd(img, txt, scale, bias):
        return fwd_sm(img, txt, scale, bias), (img, txt, scale, bias)

    def total_bwd(res, g):
        return bwd_sm(*res, jnp.asarray(g, jnp.float32))

    total.defvjp(total_fwd, total_bwd)
    return total


def siglip_terms(
    img: jax.Array,
    txt: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """Σ_ij −log σ(z_ij·(s·x_i·y_j + b)) over the global batch (z = 2I − 1), ring mode (psum'ed)."""
    axes = tuple(batch_axes)
    n = _num_batch_devices(mesh, axes)
    _check_batch(img, n, axes)
    if img.shape != txt.shape:
        raise ValueError(f"ring losses need equal embedding shapes; got {img.shape} vs {txt.shape}.")
    fn = _siglip_ring_fn(mesh, axes, int(block_size), img.shape[0] // n)
    return fn(img.astype(jnp.float32), txt.astype(jnp.float32),
              jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
