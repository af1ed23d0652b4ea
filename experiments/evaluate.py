"""Evaluate a checkpoint with its system's evaluator (CLIP: zero-shot top-1/5, Recall@1/5/10).

  python experiments/evaluate.py --workdir=/tmp/clip_digits
  python experiments/evaluate.py --workdir=/tmp/clip_digits --step=400 --override=data.eval_split=train
  python experiments/evaluate.py --workdir=/tmp/clip_digits --best

The config stored with the checkpoint is used, including its mesh and sharding preset when the
devices present allow it; otherwise a data-parallel mesh whose size divides `eval_batch_size` is
picked and printed. `--override key=value` (repeatable) changes stored fields, e.g. another split.
Prints a table (each metric formatted by its description) and writes <workdir>/eval_<step>.json.
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


def apply_override(config, item: str):
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--override {item!r}: expected key=value.")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        if p not in node:
            raise ValueError(f"--override {key}: no such config field {p!r}.")
        node = node[p]
    if leaf not in node:
        raise ValueError(f"--override {key}: no such config field.")
    old = node[leaf]
    if isinstance(old, bool):
        node[leaf] = value.lower() in ("1", "true", "yes")
    elif old is not None:
        node[leaf] = type(old)(value)
    else:
        node[leaf] = value


def eval_mesh(config, num_devices: int):
    """The stored mesh when it fits these devices and batch, else the largest data-parallel mesh
    whose size divides the eval batch. Returns (mesh config, sharding preset, note)."""
    from colearn_jax import sharding  # noqa: PLC0415

    stored = dict(config.mesh)
    try:
        sizes = sharding.mesh_shape(stored, num_devices)
        dp = sizes["data"] * sizes["fsdp"]
        if config.data.eval_batch_size % dp == 0:
            return sizes, config.sharding, "the stored mesh"
    except ValueError:
        pass
    n = max(d for d in range(1, num_devices + 1) if num_devices % d == 0 and config.data.eval_batch_size % d == 0)
    if n != num_devices:
        raise ValueError(
            f"config.data.eval_batch_size={config.data.eval_batch_size} divides no data-parallel mesh over all "
            f"{num_devices} devices (stored mesh {stored}); pass --override=data.eval_batch_size=<multiple of "
            f"{num_devices}>.")
    return dict(data=n, fsdp=1, model=1), "dp", f"data-parallel over {n} devices (stored mesh {stored} does not fit)"


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    import jax  # noqa: PLC0415

    import colearn_jax  # noqa: PLC0415
    from colearn_jax import sharding  # noqa: PLC0415
    from colearn_jax.evals import describe  # noqa: PLC0415
    from colearn_jax.models import get_system  # noqa: PLC0415
    from colearn_jax.train.checkpoint import abstract_variables  # noqa: PLC0415
    from colearn_jax.train.program import model_example_batch  # noqa: PLC0415

    which = "best" if _BEST.value else "checkpoints"
    model, variables, config = colearn_jax.load(_WORKDIR.value, step=_STEP.value, which=which)
    config.unlock()
    for item in _OVERRIDE.value:
        apply_override(config, item)
    mesh_cfg, preset, note = eval_mesh(config, jax.device_count())
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.get_rules(preset)
    print(f"Evaluating on mesh {dict(mesh.shape)} ({preset}): {note}.")
    system = get_system(config.model.name)
    if system.make_evaluator is None:
        raise ValueError(f"System {config.model.name!r} has no evaluator.")
    evaluator = system.make_evaluator(config, mesh, rules)
    target = abstract_variables(model, model_example_batch(system, config, sharding.data_parallel_size(mesh, rules)),
                                mesh, rules)
    variables = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), variables, target)
    metrics = evaluator(model, variables)
    step = _STEP.value if _STEP.value is not None else which if _BEST.value else "latest"
    print(f"{'metric':24s} value")
    for k, v in metrics.items():
        print(f"{k:24s} {describe(v, evaluator.metrics.get(k))}")
    out = os.path.join(os.path.abspath(_WORKDIR.value), f"eval_{step}.json")
    with open(out, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
