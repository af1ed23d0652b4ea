"""The train state pytree and its sharded creation (parameters are born sharded).

`state_shardings` evaluates the model's initialiser abstractly (`jax.eval_shape`), reads the logical
axis names the modules attached to every parameter, maps them onto the mesh with the rule preset,
and gives every optimizer moment its parameter's sharding (`optax.tree_map_params`, which also
handles parameter groups and frozen parameters that keep no moments). `create_sharded_state` runs
the initialiser under `jax.jit(out_shardings=...)`, so no host or device holds an unsharded copy.
"""
from __future__ import annotations

from typing import Any

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
    rng: jax.Array  # raw uint32 key; the step's stream keys fold in (step, stream)

    def variables(self) -> dict:
        """What inference needs: `{"params": ..., **model_state}`."""
        return {"params": self.params, **self.model_state}

    def progress(self) -> dict:
        """What resuming needs besides the variables: step, optimizer state, RNG."""
        return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}

    @classmethod
    def from_parts(cls, variables: dict, progress: dict) -> "TrainState":
        return cls(
            step=progress["step"], params=variables["params"],
            model_state={k: v for k, v in variables.items() if k != "params"},
            opt_state=progress["opt_state"], rng=progress["rng"],
        )


def _init_variables(model, rng, example_batch):
    return model.init({"params": rng, "dropout": rng}, example_batch, train=False)


def _split_seed(seed_key):
    init_rng, state_rng = jax.random.split(seed_key)
    return init_rng, state_rng


def state_shardings(model, tx, example_batch, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, NamedSharding tree) without allocating anything."""
    example_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example_batch)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda b: _init_variables(model, jax.random.PRNGKey(0), b), example_batch)
    var_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    variables = nn.unbox(boxed)
    params = variables["params"]
    opt_state = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, P())
    # Moments mirror their parameter; parameter groups leave MaskedNode where a group does not apply.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_shardings = optax.tree_map_params(
        tx, lambda p, s: p if masked(p) else s, opt_state, var_shardings["params"],
        transform_non_params=lambda _: replicated, is_leaf=masked,
    )
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
        model_state={k: v for k, v in variables.items() if k != "params"}, opt_state=opt_state, rng=key,
    )
    shardings = TrainState(
        step=replicated, params=var_shardings["params"],
        model_state={k: v for k, v in var_shardings.items() if k != "params"}, opt_state=opt_shardings,
        rng=replicated,
    )
    return abstract, shardings


def create_sharded_state(model, tx, example_batch, mesh: Mesh, rules, seed_key) -> tuple[TrainState, TrainState]:
    """Initialises the train state directly into its sharded layout."""
    _, shardings = state_shardings(model, tx, example_batch, mesh, rules)

    def init(seed_key, example_batch):
        init_rng, state_rng = _split_seed(seed_key)
        with nn.logical_axis_rules(rules):
            variables = nn.unbox(_init_variables(model, init_rng, example_batch))
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params,
            model_state={k: v for k, v in variables.items() if k != "params"},
            opt_state=tx.init(params), rng=state_rng,
        )

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(seed_key, example_batch)
    return state, shardings


def reinit_opt_state(state: TrainState, tx, shardings: TrainState) -> TrainState:
    """A fresh optimizer state for `state.params` (after replacing parameters, e.g. `init_from`)."""
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(state.params)
    return state.replace(opt_state=opt_state)
