"""Captioning evaluation of a generator: decode the eval split (colearn_jax.decoding.generate) and
score the captions against the references.

Metrics here: `caption_exact` (the caption equals the reference) and, when `config.eval.class_names`
is set, `caption_digits_correct` — the caption names the same classes in the same order as the
reference (on digit scenes: every digit named correctly; a count prefix such as "two digits:" is
skipped), and the corpus metrics of `colearn_jax.evals.captioning` against the reference caption:
`caption_bleu1..4`, `caption_rouge_l`, `caption_cider_d` (coco-caption's conventions).

`decode_fns(model, max_length)` -> (prefill_fn, step_fn) and `config.eval.caption_*` choose how to
decode; the batch is placed sharded over the mesh's data axes, so decoding runs data-parallel.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import numpy as np

from colearn_jax import decoding, sharding
from colearn_jax.evals import MetricSpec, captioning

_WORD = re.compile(r"[a-z]+")


def metric_specs(config) -> dict[str, MetricSpec]:
    if not config.eval.get("captions", False):
        return {}
    specs = {"caption_exact": MetricSpec("caption_exact", description="generated caption == reference caption")}
    if config.eval.get("class_names"):
        specs["caption_digits_correct"] = MetricSpec(
            "caption_digits_correct", description="caption names the reference's classes, in order")
    return {**specs, **captioning.caption_metric_specs(prefix="caption_")}


def named_classes(text: str, class_names) -> list[str]:
    """The class names a caption mentions, in order (after a "...:" count prefix, if any)."""
    text = text.lower()
    if ":" in text:
        text = text.split(":", 1)[1]
    names = set(class_names)
    return [w for w in _WORD.findall(text) if w in names]


def corpus_metrics(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """BLEU-1..4 / ROUGE-L / CIDEr-D of each hypothesis against its one reference, as `caption_*`."""
    scores = captioning.caption_metrics(hypotheses, [[r] for r in references])
    return {f"caption_{k}": v for k, v in scores.items()}


def decode_config(config, tokenizer) -> decoding.DecodeConfig:
    e = config.eval
    method = e.get("caption_method", "greedy")
    kw = dict(max_new_tokens=int(e.caption_max_new_tokens), eos_id=int(tokenizer.eot_id), pad_id=0, method=method)
    if method == "beam":
        kw["num_beams"] = int(e.get("caption_num_beams", 3))
    return decoding.DecodeConfig(**kw)


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
        if class_names:
            metrics["caption_digits_correct"] = float(np.mean(
                [named_classes(h, class_names) == named_classes(r, class_names) for h, r in zip(hyps, refs)]))
        metrics.update(corpus_metrics(refs, hyps))
        return metrics

    return evaluate

