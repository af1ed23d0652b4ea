"""Evaluate a checkpoint: zero-shot top-1/top-5 and image<->text Recall@1/5/10 on its eval split.

  python experiments/evaluate.py --workdir=/tmp/clip_digits
  python experiments/evaluate.py --workdir=/tmp/clip_digits --step=400 --config.data.eval_split=train

The config stored with the checkpoint is used; `--override key=value` pairs change data/eval fields
(e.g. evaluate on another split or dataset). Prints a table and writes <workdir>/eval_<step>.json.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (or its checkpoints/ folder).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "config overrides, e.g. data.eval_split=train")


def _apply_override(config, item: str):
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"--override {key}: no such config field.")
    old = node[leaf]
    node[leaf] = type(old)(value) if old is not None and not isinstance(old, bool) else (value == "True" if isinstance(old, bool) else value)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    import colearn_jax  # noqa: PLC0415
    from colearn_jax import sharding  # noqa: PLC0415
    from colearn_jax.models import get_system  # noqa: PLC0415

    model, variables, config = colearn_jax.load(_WORKDIR.value, step=_STEP.value)
    for item in _OVERRIDE.value:
        _apply_override(config, item)
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, model=1))
    rules = sharding.get_rules("dp")
    sharding.check_batch_divisible(config.data.eval_batch_size, mesh, rules, "config.data.eval_batch_size")
    evaluator = get_system(config.model.name).make_evaluator(config, mesh, rules)
    import jax  # noqa: PLC0415

    variables = jax.device_put(variables, sharding.replicated(mesh))
    metrics = evaluator(model, variables)
    step = _STEP.value if _STEP.value is not None else "latest"
    print(f"{'metric':24s} value")
    for k, v in metrics.items():
        print(f"{k:24s} {100 * v:6.2f}%")
    out = os.path.join(os.path.abspath(_WORKDIR.value), f"eval_{step}.json")
    with open(out, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
