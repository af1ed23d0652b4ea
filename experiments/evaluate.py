"""Evaluate a checkpoint with its system's evaluator (CLIP: zero-shot top-1/5, Recall@1/5/10).

  python experiments/evaluate.py --workdir=/tmp/clip_digits
  python experiments/evaluate.py --workdir=/tmp/clip_digits --step=400 --override=data.eval_split=train
  python experiments/evaluate.py --workdir=/tmp/clip_digits --best

Flags: --workdir (a run directory or its checkpoints/ folder), --step (default: newest), --best
(evaluate <workdir>/best, kept by config.train.best_metric), --override key=value (repeatable; changes
a stored config field, e.g. another split). The config stored with the checkpoint is used, including
its mesh and sharding preset when the devices present allow it; otherwise a data-parallel mesh whose
size divides `eval_batch_size` is picked and printed (colearn_jax/evals/checkpoint_eval.py).
Prints a table (each metric formatted by its description) and writes <workdir>/eval_<step>.json.
Exit codes: 0 done; 2 a bad flag, override or missing checkpoint; 1 a corrupt checkpoint.
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
_BEST = flags.DEFINE_bool("best", False, "Evaluate <workdir>/best (kept by config.train.best_metric).")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "config overrides, e.g. data.eval_split=train")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    from colearn_jax.evals import describe  # noqa: PLC0415
    from colearn_jax.evals.checkpoint_eval import evaluate_checkpoint  # noqa: PLC0415
    from colearn_jax.train.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        result = evaluate_checkpoint(_WORKDIR.value, step=_STEP.value, best=_BEST.value, overrides=_OVERRIDE.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"Evaluated on mesh {result.mesh} ({result.sharding}): {result.note}.")
    print(f"{'metric':24s} value")
    for k, v in result.metrics.items():
        print(f"{k:24s} {describe(v, result.specs.get(k))}")
    out = os.path.join(os.path.abspath(_WORKDIR.value), f"eval_{result.step}.json")
    with open(out, "w") as f:
        json.dump(result.metrics, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
