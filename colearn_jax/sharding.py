"""Device mesh from config, logical-axis rule presets, and placement of arrays and batches.

Parameters and activations are annotated with *logical* axis names (batch, length, embed, mlp,
heads, kv, vocab, patch, channels, proj, layers). A rule preset maps them onto the mesh axes
(data, fsdp, model), so data parallel, ZeRO-3/FSDP and Megatron tensor parallel are a config change
(Xu et al. 2021, GSPMD; Rajbhandari et al. 2020, ZeRO; Shoeybi et al. 2019, Megatron-LM).

Presets (`config.sharding`):
  dp       params replicated; batch over (data, fsdp).
  fsdp     params and optimizer state sharded over (data, fsdp) along their `embed`/`vocab` dims.
  tp       attention heads, MLP hidden units and the vocabulary split over `model`.
  fsdp_tp  both.
Rules are ordered; flax never reuses a mesh axis within one array, so an activation
[batch, length, embed] keeps batch on (data, fsdp) and leaves `embed` unsharded.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
DATA_AXES = ("data", "fsdp")

_BATCH = [("batch", DATA_AXES)]
_FSDP = [("embed", DATA_AXES), ("vocab", DATA_AXES), ("channels", DATA_AXES)]
_TP = [("heads", "model"), ("mlp", "model"), ("vocab", "model")]

RULE_PRESETS: dict[str, list[tuple[str, Any]]] = {
    "dp": _BATCH,
    "fsdp": _BATCH + _FSDP,
    "tp": _BATCH + _TP,
    "fsdp_tp": _BATCH + _TP + _FSDP,
}


def get_rules(sharding: str | Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Rules from a preset name or an explicit list of (logical, mesh axes) pairs."""
    if isinstance(sharding, str):
        if sharding not in RULE_PRESETS:
            raise ValueError(
                f"config.sharding={sharding!r} is not a preset; choose one of {sorted(RULE_PRESETS)} "
                "or give explicit rules [(logical_name, mesh_axes), ...]."
            )
        return tuple((k, v) for k, v in RULE_PRESETS[sharding])
    rules = tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in sharding)
    for _, mesh_axes in rules:
        for ax in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
            if ax is not None and ax not in MESH_AXES:
                raise ValueError(f"config.sharding rule names mesh axis {ax!r}; mesh axes are {MESH_AXES}.")
    return rules


def batch_axes(rules) -> tuple[str, ...]:
    """Mesh axes the `batch` logical axis maps onto."""
    for name, axes in rules:
        if name == "batch":
            return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    return ()


def mesh_shape(mesh_cfg, num_devices: int, *, name: str = "config.mesh", use_all: bool = True) -> dict[str, int]:
    """Resolves `config.mesh` (-1 fills the rest) against the device count, with clear errors.

    `name` is how errors refer to the mesh (e.g. "sweep.meshes[3]"); `use_all=False` accepts a mesh
    over fewer devices than are present (the caller then passes the first ones to `make_mesh`).
    """
    sizes = {ax: int(mesh_cfg.get(ax, 1)) for ax in MESH_AXES}
    unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"{name} has unknown axes {sorted(unknown)}; mesh axes are {MESH_AXES}.")
    fill = [ax for ax, n in sizes.items() if n == -1]
    if len(fill) > 1:
        raise ValueError(f"{name}: only one axis may be -1; got {fill}.")
    for ax, n in sizes.items():
        if n == 0 or n < -1:
            raise ValueError(f"{name}.{ax}={n} must be a positive size or -1.")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"{name}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices available, so {name}.{fill[0]}=-1 cannot fill the rest."
            )
        sizes[fill[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total > num_devices:
        raise ValueError(f"{name} {sizes} needs {total} devices but only {num_devices} are available.")
    if use_all and total < num_devices:
        raise ValueError(
            f"{name} {sizes} uses {total} of the {num_devices} devices available; set one axis to -1 "
            "to use them all."
        )
    return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) mesh with Auto axis types (GSPMD propagation, pjit semantics)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[ax] for ax in MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh, rules) -> int:
    return math.prod(mesh.shape[ax] for ax in batch_axes(rules))


def check_batch_divisible(batch_size: int, mesh: Mesh, rules, key: str = "config.data.batch_size"):
    n = data_parallel_size(mesh, rules)
    if batch_size % n:
        raise ValueError(
            f"{key}={batch_size} is not divisible by the {n} data-parallel devices "
            f"(mesh axes {batch_axes(rules)} of mesh {dict(mesh.shape)})."
        )


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(rules)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_process_rows(index_map: dict, global_rows: int, process_count: int) -> None:
    """Raises unless process p's devices hold exactly rows [p*b, (p+1)*b) of a global batch.

    `index_map` is `sharding.devices_indices_map((global_rows,))` ({device: (row slice, ...)}). The data
    pipelines give process p that contiguous block of every global batch (b = global_rows // process_count),
    so with this layout the global batch is the one a single process would build, and each process's
    rows are exactly what its devices hold.
    """
    held: dict[int, set] = {}
    for device, index in index_map.items():
        held.setdefault(device.process_index, set()).update(range(global_rows)[index[0]])
    per = global_rows // process_count
    for p in range(process_count):
        rows = held.get(p, set())
        if rows != set(range(p * per, (p + 1) * per)):
            got = f"rows {min(rows)}..{max(rows)} ({len(rows)} of them)" if rows else "no rows"
            raise ValueError(
                f"Process {p}'s devices hold {got} of each global batch of {global_rows}, but process {p} feeds "
                f"rows {p * per}..{(p + 1) * per - 1}. Order the mesh's batch axes by process (jax.devices() "
                "order) and keep mesh axes that are not batch axes (config.mesh.model) within one host.")


_CHECKED_LAYOUTS: set = set()


def shard_batch(batch: dict, mesh: Mesh, rules) -> dict:
    """Places a host batch (this process's rows) as global arrays sharded over the data axes.

    Several processes: each passes its contiguous block of rows (process p: rows [p*b, (p+1)*b) of the
    global batch, see `check_process_rows`), and `jax.make_array_from_process_local_data` assembles
    the global array without moving data between hosts.
    """
    sharding = batch_sharding(mesh, rules)

    def place(x):
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        if (sharding, global_shape[0]) not in _CHECKED_LAYOUTS:
            check_process_rows(sharding.devices_indices_map(global_shape[:1]), global_shape[0], jax.process_count())
            _CHECKED_LAYOUTS.add((sharding, global_shape[0]))
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(place, batch)
