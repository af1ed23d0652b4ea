"""CLIP evaluation on the eval split: zero-shot top-1/top-5 and image<->text Recall@1/5/10.

Each process reads its rows of every eval batch; the batch is placed as a global array sharded over
the mesh's data axes, the jitted encoders return replicated embeddings, and every process computes
the same metrics on the host (the eval sets here are small; large ones would stream top-k instead).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from colearn_jax import sharding
from colearn_jax.evals import DescribedEvaluator, MetricSpec
from colearn_jax.evals.retrieval import retrieval_recall
from colearn_jax.evals.zeroshot import topk_accuracy, zeroshot_classifier


def _padded_apply(fn, x: np.ndarray, multiple: int, placement) -> np.ndarray:
    """fn over a host array that is identical on every process, padded to a multiple of the devices."""
    n = x.shape[0]
    pad = (-n) % multiple
    if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return np.asarray(fn(jax.device_put(x, placement)))[:n]


RECALL_KS = (1, 5, 10)


def metric_specs(config) -> dict[str, MetricSpec]:
    specs = {}
    if config.eval.retrieval:
        for k in RECALL_KS:
            specs[f"i2t_r{k}"] = MetricSpec(f"i2t_r{k}", description=f"image->text Recall@{k}")
            specs[f"t2i_r{k}"] = MetricSpec(f"t2i_r{k}", description=f"text->image Recall@{k}")
    if config.eval.zeroshot:
        for k in (1, 5):
            specs[f"zeroshot_top{k}"] = MetricSpec(f"zeroshot_top{k}", description=f"zero-shot top-{k} accuracy")
    return specs


def make_clip_evaluator(config, mesh, rules, eval_data=None):
    """`eval_data(split=None)` -> iterable of this process's rows of each eval batch (System.make_eval_data)."""
    from colearn_jax.data import get_tokenizer  # noqa: PLC0415

    tokenizer = get_tokenizer(config.data.tokenizer, config.data.get("vocab_path"))
    bsh = sharding.batch_sharding(mesh, rules)
    dp = sharding.data_parallel_size(mesh, rules)
    cache = {}

    def encoders(model):
        if id(model) not in cache:
            def enc_img(variables, images):
                with nn.logical_axis_rules(rules):
                    return model.apply(variables, images, method=model.encode_image)

            def enc_txt(variables, ids):
                with nn.logical_axis_rules(rules):
                    return model.apply(variables, ids, method=model.encode_text)

            rep = sharding.replicated(mesh)
            cache[id(model)] = (
                jax.jit(enc_img, in_shardings=(None, bsh), out_shardings=rep),
                jax.jit(enc_txt, in_shardings=(None, bsh), out_shardings=rep),
                jax.jit(lambda x: x, out_shardings=rep),  # all-gathers mask/labels to every process
            )
        return cache[id(model)]

    def evaluate(model, variables) -> dict[str, float]:
        enc_img, enc_txt, gather = encoders(model)
        images, texts, labels = [], [], []
        batches = eval_data()
        with jax.set_mesh(mesh):
            for batch in batches:
                batch = sharding.shard_batch(batch, mesh, rules)
                keep = np.asarray(gather(batch["mask"]), bool)
                images.append(np.asarray(enc_img(variables, batch["image"]))[keep])
                texts.append(np.asarray(enc_txt(variables, batch["text"]))[keep])
                if "label" in batch:
                    labels.append(np.asarray(gather(batch["label"]))[keep])
            image_embeds, text_embeds = np.concatenate(images), np.concatenate(texts)
            metrics = {}
            if config.eval.retrieval:
                metrics.update(retrieval_recall(image_embeds, text_embeds, ks=RECALL_KS))
            if config.eval.zeroshot and labels:
                classifier = zeroshot_classifier(
                    lambda ids: _padded_apply(lambda x: enc_txt(variables, x), ids, dp, bsh),
                    tokenizer, list(config.eval.class_names), list(config.eval.templates), config.data.context_length,
                )
                acc = topk_accuracy(image_embeds @ classifier.T, np.concatenate(labels))
                metrics.update({f"zeroshot_{k}": v for k, v in acc.items()})
        return metrics

    return DescribedEvaluator(evaluate, metric_specs(config))
