"""Named RNG streams: each step draws one key per stream from (seed, step), so a resumed run draws
exactly the keys an uninterrupted run would, whatever the mesh.

A system lists the streams it uses (`System.rng_streams`: "dropout", "augment", "mask", "noise", ...).
The train step calls `step_keys(state.rng, state.step, streams)`; the model receives them as flax
`rngs`, the on-device batch transform and the objective as a `{stream: key}` dict. Augmentations
that act per example take `per_example_keys(key, batch)`: row i's key depends only on (key, i), so a
sharded batch draws the same numbers as the unsharded one.
"""
from __future__ import annotations

import zlib

import jax


def stream_id(name: str) -> int:
    """A stable 31-bit id per stream name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def step_keys(base_key: jax.Array, step, streams) -> dict[str, jax.Array]:
    """{stream: key} for one step; `base_key` is derived from the run's seed and saved with the state."""
    step_key = jax.random.fold_in(base_key, step)
    return {name: jax.random.fold_in(step_key, stream_id(name)) for name in streams}


def per_example_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """[batch_size] keys, one per global example index (vmap an augmentation over them)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jax.numpy.arange(batch_size))
