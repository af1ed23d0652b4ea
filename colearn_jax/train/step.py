"""The jitted train step: forward, objective, gradients, optax update, post-update constraints.

One function for every system. It is compiled once with `jax.jit(in_shardings, out_shardings,
donate_argnums=0)`: the state is updated in place on device, the batch arrives sharded over the data
axes, and nothing crosses to the host inside the step (the loop enforces it with a transfer guard).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import optax

from colearn_jax.train.state import TrainState


def make_train_step(model, objective: Callable, tx: optax.GradientTransformation, schedule, constrain_params, rules):
    def train_step(state: TrainState, batch: dict):
        step_rng = jax.random.fold_in(state.rng, state.step)
        mutable = list(state.model_state.keys())

        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            with nn.logical_axis_rules(rules):
                if mutable:
                    outputs, new_model_state = model.apply(
                        variables, batch, train=True, rngs={"dropout": step_rng}, mutable=mutable
                    )
                else:
                    outputs = model.apply(variables, batch, train=True, rngs={"dropout": step_rng})
                    new_model_state = {}
            loss, metrics = objective(outputs, batch)
            return loss, (metrics, new_model_state)

        (loss, (metrics, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = constrain_params(optax.apply_updates(state.params, updates))
        metrics = {
            "loss": loss,
            **metrics,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "lr": schedule(state.step),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, model_state=dict(new_model_state), opt_state=opt_state
        )
        return new_state, metrics

    return train_step
