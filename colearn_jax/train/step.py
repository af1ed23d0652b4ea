"""The jitted train step: stream keys, on-device batch transform, forward, objective, gradients, optax
update, post-update constraints, and a non-finite guard.

One function for every system (it names none). `TrainProgram` (train/program.py) compiles it with
`jax.jit(in_shardings, out_shardings, donate_argnums=0)`: the state is updated in place on device,
the batch arrives sharded over the data axes, and nothing crosses to the host inside the step.

Non-finite guard: `metrics["nonfinite"]` is 1 when the loss or the gradient norm is not finite. With
`skip_nonfinite=True` such a step leaves parameters, model state and optimizer state unchanged (a
`jnp.where` on device, no host sync) and only the step counter advances; otherwise the update is
applied and the loop, which reads the flag at log time, stops before anything is saved.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from colearn_jax.train import rng as rng_lib
from colearn_jax.train.state import TrainState


def make_loss_fn(model, objective: Callable, apply_model: Callable, batch_transform, streams, rules):
    """(params, model_state, batch, rng, step) -> (loss, (metrics, new_model_state))."""

    def loss_fn(params, model_state, batch, base_rng, step):
        rngs = rng_lib.step_keys(base_rng, step, streams)
        if batch_transform is not None:
            batch = batch_transform(batch, rngs, step)
        mutable = list(model_state.keys())
        variables = {"params": params, **model_state}
        with nn.logical_axis_rules(rules):
            out = apply_model(model, variables, batch, rngs=rngs, step=step, mutable=mutable or False)
        outputs, new_model_state = out if mutable else (out, {})
        loss, metrics = objective(outputs, batch, rngs, step)
        return loss, (metrics, dict(new_model_state))

    return loss_fn


def _keep_trainable(grads, trainable):
    if trainable is None:
        return grads
    return jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule, constrain_params,
                    trainable=None, skip_nonfinite: bool = False):
    """`trainable`: bool tree (False = frozen; those gradients are dropped before anything reads them)."""

    def train_step(state: TrainState, batch: dict):
        (loss, (metrics, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch, state.rng, state.step
        )
        grads = _keep_trainable(grads, trainable)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = constrain_params(optax.apply_updates(state.params, updates))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            new_model_state = keep(new_model_state, state.model_state)
        metrics = {
            "loss": loss,
            **metrics,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "lr": schedule(state.step),
            "nonfinite": (~finite).astype(jnp.int32),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, model_state=new_model_state, opt_state=opt_state
        )
        return new_state, metrics

    return train_step
