"""`TrainProgram`: everything a run builds from its config except data — the one place where the train
step is jitted with its shardings.

    program = TrainProgram.build(config)          # validates the config first
    state = program.init_state()                  # born sharded
    state, metrics = program.step(state, program.place_batch(host_batch))
    compiled = program.lower().compile()          # abstract shapes only (--compile_only, benchmarks)

The trainer loop, `experiments/benchmark.py`, the compile-only path and the tests all go through it,
so a change to how the step is compiled happens once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from colearn_jax import config_checks, sharding
from colearn_jax.models import System, get_system
from colearn_jax.train import rng as rng_lib
from colearn_jax.train.optimizer import make_optimizer, trainable_mask
from colearn_jax.train.state import TrainState, create_sharded_state, state_shardings
from colearn_jax.train.step import make_loss_fn, make_train_step


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (what jit lowers and Orbax restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


@dataclasses.dataclass(frozen=True)
class MeshJit:
    """A jitted function whose calls and lowerings run under `mesh` (logical constraints resolve there)."""

    jitted: Any
    mesh: jax.sharding.Mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def model_example_batch(system: System, config, batch_size: int) -> dict:
    """Zeros shaped like what the model sees (the example batch after the system's batch transform)."""
    spec = system.example_batch(config, batch_size)
    transform = system.make_batch_transform(config) if system.make_batch_transform is not None else None
    if transform is not None:  # a system may need no transform under some configs
        keys = rng_lib.step_keys(jax.random.PRNGKey(0), 0, system.rng_streams)
        spec = jax.eval_shape(lambda b: transform(b, keys, 0), spec)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), spec)


@dataclasses.dataclass
class TrainProgram:
    config: Any
    system: System
    model: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    tx: Any
    schedule: Any

    @classmethod
    def build(cls, config, *, devices=None, validate: bool = True) -> "TrainProgram":
        mesh = sharding.make_mesh(config.mesh, devices)
        rules = sharding.get_rules(config.sharding)
        system = get_system(config.model.name)
        if validate:
            config_checks.validate(config, system, mesh, rules)
        model = system.build_model(config)
        tx, schedule = make_optimizer(config.optim, config.train.num_steps, system.weight_decay_mask)
        return cls(config, system, model, mesh, rules, tx, schedule)

    # ------------------------------------------------------------------ shapes and shardings
    @property
    def dp(self) -> int:
        return sharding.data_parallel_size(self.mesh, self.rules)

    @functools.cached_property
    def batch_sharding(self):
        return sharding.batch_sharding(self.mesh, self.rules)

    @functools.cached_property
    def batch_transform(self):
        make = self.system.make_batch_transform
        return make(self.config) if make is not None else None

    def example_batch(self, batch_size: int | None = None) -> dict:
        """The train iterator's feature spec for a global batch, as sharded ShapeDtypeStructs."""
        spec = self.system.example_batch(self.config, batch_size or self.config.data.batch_size)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.batch_sharding), spec)

    def _model_example(self, batch_size: int) -> dict:
        return model_example_batch(self.system, self.config, batch_size)

    @functools.cached_property
    def _abstract_and_shardings(self) -> tuple[TrainState, TrainState]:
        return state_shardings(self.model, self.tx, self._model_example(self.dp), self.mesh, self.rules)

    @property
    def abstract_state(self) -> TrainState:
        """Abstract state whose leaves carry their target shardings."""
        abstract, shardings = self._abstract_and_shardings
        return with_shardings(abstract, shardings)

    @property
    def state_shardings(self) -> TrainState:
        return self._abstract_and_shardings[1]

    # ------------------------------------------------------------------ state and step
    def init_state(self, seed: int | None = None) -> TrainState:
        seed = self.config.seed if seed is None else seed
        state, _ = create_sharded_state(self.model, self.tx, self._model_example(self.dp), self.mesh, self.rules,
                                        jax.random.PRNGKey(seed))
        return state

    @functools.cached_property
    def loss_fn(self):
        """(params, model_state, batch, rng, step) -> (loss, (metrics, new_model_state)), unjitted."""
        objective = self.system.make_objective(self.config, self.mesh, self.rules)
        return make_loss_fn(self.model, objective, self.system.apply_model, self.batch_transform,
                            self.system.rng_streams, self.rules)

    @functools.cached_property
    def trainable(self):
        """Bool tree over params (False: frozen by config.optim.groups), or None when nothing is frozen."""
        mask = trainable_mask(self._abstract_and_shardings[0].params, self.config.optim)
        return None if all(jax.tree.leaves(mask)) else mask

    @functools.cached_property
    def step(self):
        """The jitted, donated train step: (state, batch) -> (state, metrics)."""
        fn = make_train_step(self.loss_fn, self.tx, self.schedule, self.system.constrain_params, self.trainable,
                             skip_nonfinite=self.config.train.get("nonfinite", "stop") == "skip")
        return self.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=0)

    @functools.cached_property
    def grads(self):
        """Jitted (state, batch) -> (loss, grads) with the step's keys (tests compare it across meshes)."""

        def fn(state, batch):
            (loss, _), g = jax.value_and_grad(self.loss_fn, has_aux=True)(
                state.params, state.model_state, batch, state.rng, state.step)
            return loss, g

        return self.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                        out_shardings=(sharding.replicated(self.mesh), self.state_shardings.params))

    def jit(self, fn, **kw) -> "MeshJit":
        return MeshJit(jax.jit(fn, **kw), self.mesh)

    def lower(self, batch_size: int | None = None):
        """Lowers the train step from abstract shapes only (nothing is allocated)."""
        return self.step.lower(self.abstract_state, self.example_batch(batch_size))

    def place_batch(self, host_batch: dict) -> dict:
        """This process's rows -> global arrays sharded over the data axes."""
        return sharding.shard_batch(host_batch, self.mesh, self.rules)
