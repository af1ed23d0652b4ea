"""A toy system registered only in tests: it owns its data (an in-memory grain pipeline), draws two RNG
streams (dropout in the model, a per-example "augment" stream in an on-device batch transform),
keeps BatchNorm statistics, and describes a lower-is-better metric. It proves the trainer hosts a
system that shares nothing with CLIP."""
from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from colearn_jax.configs import base
from colearn_jax.evals import DescribedEvaluator, MetricSpec
from colearn_jax.models import System, register
from colearn_jax.train import rng as rng_lib

FEATURES = 8
# Test-only fault hook: 0-based step indices whose loss (and so gradient) is multiplied by NaN. Read when
# the objective is built, so a test sets it (monkeypatch) before `loop.train`; not a config field, so
# a resume after the fault sees an unchanged config.
NAN_STEPS: tuple[int, ...] = ()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = base.get_config()
    c.model.name = "toy"
    c.model.hidden = 16
    c.model.dropout = 0.3
    c.data.num_examples = 256
    c.data.noise = 0.1  # on-device augmentation strength
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.optim.update(name="adamw", lr=1e-2, warmup_steps=2, weight_decay=1e-4)
    c.train.update(num_steps=8, log_every=2, eval_every=4, checkpoint_every=4, progress_bar=False,
                   compilation_cache_dir="", best_metric="mse")
    return c


class ToyModel(nn.Module):
    hidden: int
    dropout: float

    @nn.compact
    def __call__(self, batch, train: bool = False):
        dense = lambda n, axes, name: nn.Dense(  # noqa: E731
            n, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)), name=name)
        h = dense(self.hidden, ("embed", "mlp"), "fc")(batch["x"])
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(h))
        return {"pred": dense(1, ("mlp", "embed"), "out")(h)[:, 0]}


def _examples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    w = np.linspace(-1, 1, FEATURES).astype(np.float32)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    return [{"x": x[i], "y": np.float32(np.tanh(x[i] @ w))} for i in range(n)]


def make_train_data(config, ctx):
    per = config.data.batch_size // ctx.process_count
    ds = grain.MapDataset.source(_examples(config.data.num_examples, 0)).seed(ctx.seed).shuffle().repeat()
    ds = ds[ctx.process_index::ctx.process_count].batch(per, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def make_eval_data(config, ctx, split=None):
    del split
    rows = _examples(128, 1)
    return [{k: np.stack([r[k] for r in rows[i:i + 64]]) for k in rows[0]} for i in range(0, 128, 64)]


def example_batch(config, batch_size):
    return {"x": jax.ShapeDtypeStruct((batch_size, FEATURES), jnp.float32),
            "y": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}


def make_batch_transform(config):
    def transform(batch, rngs, step):
        keys = rng_lib.per_example_keys(rngs["augment"], batch["x"].shape[0])
        noise = jax.vmap(lambda k: jax.random.normal(k, (FEATURES,)))(keys)
        return {**batch, "x": batch["x"] + config.data.noise * noise}

    return transform


def make_objective(config, mesh=None, rules=None):
    nan_steps = tuple(NAN_STEPS)

    def objective(outputs, batch, rngs, step):
        loss = jnp.mean((outputs["pred"] - batch["y"]) ** 2)
        if nan_steps:
            bad = jnp.any(jnp.asarray(nan_steps) == step)
            loss = loss * jnp.where(bad, jnp.nan, 1.0)
        return loss, {}

    return objective


def make_evaluator(config, mesh, rules):
    ctx = None

    def evaluate(model, variables):
        errs = [np.asarray(model.apply(variables, b)["pred"]) - b["y"] for b in make_eval_data(config, ctx)]
        return {"mse": float(np.mean(np.concatenate(errs) ** 2))}

    return DescribedEvaluator(evaluate, describe_metrics(config))


def describe_metrics(config):
    return {"mse": MetricSpec("mse", unit="squared error", higher_is_better=False)}


def validate_config(config):
    if not 0 <= config.model.dropout < 1:
        raise ValueError(f"config.model.dropout={config.model.dropout} must be in [0, 1).")


@register("toy")
def toy_system() -> System:
    return System(
        name="toy",
        build_model=lambda c: ToyModel(c.model.hidden, c.model.dropout),
        make_objective=make_objective,
        example_batch=example_batch,
        make_train_data=make_train_data,
        make_eval_data=make_eval_data,
        make_evaluator=make_evaluator,
        describe_metrics=describe_metrics,
        validate_config=validate_config,
        rng_streams=("dropout", "augment"),
        make_batch_transform=make_batch_transform,
    )
