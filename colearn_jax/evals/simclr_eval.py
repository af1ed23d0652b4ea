"""SimCLR's evaluators: linear evaluation and k-NN on the frozen representation (pretraining), top-1
of the fine-tuned classifier (fine-tuning).

Features are extracted once per evaluation *on the mesh*: every eval batch is placed as a global
array sharded over the data axes, a jitted encoder (BatchNorm on its running statistics) returns
replicated features, and every process then fits the same probe (`evals.linear_probe`, optax, on
device) and runs the same k-NN (`evals.knn`). The probe trains on `config.eval.probe_split`
(default: the train split, no labels were used before) and is scored on the eval split.

Metrics (fractions): `linear_top1`, `knn_top1` (pretraining); `top1` (fine-tuning).
"""
from __future__ import annotations

from typing import Callable, Iterable

import flax.linen as nn
import jax
import numpy as np

from colearn_jax import sharding
from colearn_jax.evals import DescribedEvaluator, MetricSpec
from colearn_jax.evals.knn import knn_accuracy
from colearn_jax.evals.linear_probe import linear_probe


def metric_specs(config) -> dict[str, MetricSpec]:
    specs = {}
    if config.eval.linear_probe:
        specs["linear_top1"] = MetricSpec("linear_top1", description="linear evaluation top-1 (frozen encoder)")
    if config.eval.knn:
        specs["knn_top1"] = MetricSpec(
            "knn_top1", description=f"weighted {config.eval.knn_k}-NN top-1 (cosine, T={config.eval.knn_temperature})")
    return specs


def finetune_metric_specs(config) -> dict[str, MetricSpec]:
    return {"top1": MetricSpec("top1", description="fine-tuned classifier top-1")}


def sharded_apply(apply_fn: Callable, mesh, rules) -> Callable:
    """`apply_fn(variables, images)` jitted with the images sharded over the data axes and a replicated
    result (every process gets all rows); the logical-axis rules apply inside."""

    def fn(variables, images):
        with nn.logical_axis_rules(rules):
            return apply_fn(variables, images)

    return jax.jit(fn, in_shardings=(None, sharding.batch_sharding(mesh, rules)),
                   out_shardings=sharding.replicated(mesh))


def extract(fn: Callable, variables, batches: Iterable[dict], mesh, rules, key: str = "image"
            ) -> tuple[np.ndarray, np.ndarray]:
    """(outputs [n, ...], labels [n]) of `fn(variables, batch[key])` (a `sharded_apply`) over every real
    row of `batches` (this process's rows of each global batch, with a `mask`)."""
    gather = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))
    outs, labels = [], []
    with jax.set_mesh(mesh):
        for batch in batches:
            batch = sharding.shard_batch(batch, mesh, rules)
            keep = np.asarray(gather(batch["mask"]), bool)
            outs.append(np.asarray(fn(variables, batch[key]))[keep])
            labels.append(np.asarray(gather(batch["label"]))[keep])
    return np.concatenate(outs), np.concatenate(labels)


def representation_metrics(config, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
                           ) -> dict[str, float]:
    """Linear-probe and k-NN top-1 of features (train_x, train_y) -> (test_x, test_y) under `config.eval`."""
    ev, out = config.eval, {}
    if ev.linear_probe:
        p = ev.probe
        out["linear_top1"] = linear_probe(*train, *test, ev.num_classes, epochs=p.epochs, batch_size=p.batch_size,
                                          lr=p.lr, weight_decays=list(p.weight_decays),
                                          holdout_fraction=p.holdout_fraction, seed=config.seed)["top1"]
    if ev.knn:
        out["knn_top1"] = knn_accuracy(*train, *test, ev.num_classes, k=ev.knn_k, temperature=ev.knn_temperature)
    return out


def make_representation_evaluator(config, mesh, rules, eval_data: Callable):
    """`eval_data(split=None)` -> this process's rows of each eval batch (System.make_eval_data)."""
    cache = {}

    def evaluate(model, variables) -> dict[str, float]:
        if id(model) not in cache:
            cache[id(model)] = sharded_apply(lambda v, x: model.apply(v, x, method=model.encode), mesh, rules)
        fn = cache[id(model)]
        train = extract(fn, variables, eval_data(config.eval.probe_split), mesh, rules)
        test = extract(fn, variables, eval_data(), mesh, rules)
        return representation_metrics(config, train, test)

    return DescribedEvaluator(evaluate, metric_specs(config))


def make_classifier_evaluator(config, mesh, rules, eval_data: Callable):
    cache = {}

    def evaluate(model, variables) -> dict[str, float]:
        if id(model) not in cache:
            cache[id(model)] = sharded_apply(lambda v, x: model.apply(v, {"image": x})["logits"].argmax(-1),
                                             mesh, rules)
        pred, labels = extract(cache[id(model)], variables, eval_data(), mesh, rules)
        return {"top1": float(np.mean(pred == labels))}

    return DescribedEvaluator(evaluate, finetune_metric_specs(config))
