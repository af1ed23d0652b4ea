"""The train state pytree and its sharded creation (parameters are born sharded).

`create_sharded_state` evaluates the initialiser abstractly (`jax.eval_shape`), reads the logical
axis names the modules attached to every parameter (and, through optax's tree-mirroring state, to
every optimizer moment), maps them onto the mesh with the rule preset, and runs the initialiser
under `jax.jit(out_shardings=...)` so no host or device ever holds an unsharded copy.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # non-parameter collections, e.g. {"batch_stats": ...}
    opt_state: Any
    rng: jax.Array  # raw uint32 key

    def variables(self) -> dict:
        return {"params": self.params, **self.model_state}


def _init_fn(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
    def init(rng, example_batch):
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init({"params": init_rng, "dropout": init_rng}, example_batch, train=False)
        params = variables["params"]
        model_state = {k: v for k, v in variables.items() if k != "params"}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            rng=state_rng,
        )

    return init


def state_shardings(model, tx, example_batch, mesh: Mesh, rules) -> tuple[Any, Any]:
    """(abstract unboxed state, NamedSharding tree) without allocating anything."""
    init = _init_fn(model, tx)
    example_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example_batch)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0), example_batch)
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    abstract = nn.unbox(boxed)
    return abstract, shardings


def create_sharded_state(model, tx, example_batch, mesh: Mesh, rules, rng) -> tuple[TrainState, Any]:
    """Initialises the train state directly into its sharded layout."""
    init = _init_fn(model, tx)
    _, shardings = state_shardings(model, tx, example_batch, mesh, rules)

    def unboxed_init(rng, example_batch):
        with nn.logical_axis_rules(rules):
            return nn.unbox(init(rng, example_batch))

    with jax.set_mesh(mesh):
        state = jax.jit(unboxed_init, out_shardings=shardings)(rng, example_batch)
    return state, shardings


def replicated_like(tree, mesh: Mesh):
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
