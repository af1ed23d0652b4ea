"""Captioning evaluation of a generator: decode the eval split (colearn_jax.decoding.generate) and
score the captions against the references.

Metrics here: `caption_exact` (the caption equals the reference) and the metrics of
`colearn_jax.evals.captioning.caption_metrics` against the reference caption: `caption_bleu1..4`,
`caption_rouge_l`, `caption_cider_d` (coco-caption's conventions) and, when `config.eval.class_names`
is set, `caption_digits_correct` - the caption names the same multiset of classes as the reference,
in any order (on digit scenes: every digit in the image named correctly; a count prefix such as
"two digits:" is skipped), `captioning.classes_named_correctly`.

`decode_fns(model, max_length)` -> (prefill_fn, step_fn) and `config.eval.caption_*` choose how to
decode; the batch is placed sharded over the mesh's data axes, so decoding runs data-parallel.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from colearn_jax import decoding, sharding
from colearn_jax.evals import MetricSpec, captioning


def metric_specs(config) -> dict[str, MetricSpec]:
    if not config.eval.get("captions", False):
        return {}
    specs = {"caption_exact": MetricSpec("caption_exact", description="generated caption == reference caption")}
    digits = bool(config.eval.get("class_names"))
    return {**specs, **captioning.caption_metric_specs(digits=digits, prefix="caption_")}


def corpus_metrics(references: list[str], hypotheses: list[str], class_names=None) -> dict[str, float]:
    """BLEU-1..4 / ROUGE-L / CIDEr-D of each hypothesis against its one reference and, with
    `class_names`, `digits_correct` (`captioning.classes_named_correctly`), as `caption_*`."""
    scores = captioning.caption_metrics(hypotheses, [[r] for r in references], class_names or None)
    return {f"caption_{k}": v for k, v in scores.items()}


def decode_config(config, tokenizer) -> decoding.DecodeConfig:
    e = config.eval
    method = e.get("caption_method", "greedy")
    kw = dict(max_new_tokens=int(e.caption_max_new_tokens), eos_id=int(tokenizer.eot_id), pad_id=0, method=method)
    if method == "beam":
        kw["num_beams"] = int(e.get("caption_num_beams", 3))
    return decoding.DecodeConfig(**kw)


def caption_images(model, variables, images, config, tokenizer, decode_fns, method: str | None = None) -> list[str]:
    """Captions of a batch of model-ready `images` with the config's decoding (`config.eval.caption_*`;
    `method` overrides greedy / beam), on whatever devices hold `images`: the shared engine with the
    model's (cached) `decode_fns`, cut at the first end-of-text."""
    dcfg = decode_config(config, tokenizer)
    if method is not None and method != dcfg.method:
        kw = {"num_beams": int(config.eval.get("caption_num_beams", 3))} if method == "beam" else {}
        dcfg = dataclasses.replace(dcfg, method=method, **kw)
    prefill_fn, step_fn = decode_fns(model, 1 + dcfg.max_new_tokens)
    prompt = np.full((len(images), 1), tokenizer.sot_id, np.int32)
    out = decoding.generate(prefill_fn, step_fn, variables, images, prompt, dcfg)
    return captioning.decode_generated(np.asarray(out.tokens), tokenizer)


def make_caption_evaluator(config, mesh, rules, eval_data, decode_fns, tokenizer):
    """`evaluate(model, variables) -> {metric: value}` over `eval_data()` (this process's rows, with a
    "mask"); `decode_fns(model, max_length)` gives the engine's functions."""
    bsh = sharding.batch_sharding(mesh, rules)
    gather = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))
    dcfg = decode_config(config, tokenizer)
    max_batches = int(config.eval.get("caption_max_batches", 0))
    class_names = list(config.eval.get("class_names") or [])

    def evaluate(model, variables) -> dict[str, float]:
        prefill_fn, step_fn = decode_fns(model, 1 + dcfg.max_new_tokens)
        refs, hyps = [], []
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for i, batch in enumerate(eval_data()):
                if max_batches and i >= max_batches:
                    break
                batch = sharding.shard_batch(batch, mesh, rules)
                keep = np.asarray(gather(batch["mask"]), bool)
                prompt = jax.device_put(np.full((keep.shape[0], 1), tokenizer.sot_id, np.int32), bsh)
                out = decoding.generate(prefill_fn, step_fn, variables, batch["image"], prompt, dcfg)
                tokens = np.asarray(gather(out.tokens))[keep]
                texts = np.asarray(gather(batch["text"]))[keep]
                hyps += captioning.decode_generated(tokens, tokenizer)
                refs += captioning.decode_generated(texts, tokenizer)
        metrics = {"caption_exact": float(np.mean([h.strip() == r.strip() for h, r in zip(hyps, refs)]))}
        metrics.update(corpus_metrics(refs, hyps, class_names))
        return metrics

    return evaluate

