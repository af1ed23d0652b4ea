"""Evaluating a stored checkpoint with its system's evaluator (what `experiments/evaluate.py` runs).

    result = evaluate_checkpoint("/tmp/clip_digits", overrides=["data.eval_split=train"])
    result.metrics   # {"zeroshot_top1": 0.93, ...};  result.specs: their MetricSpecs

The config stored with the checkpoint is used, with its mesh and sharding preset when the devices
present allow it (the stored mesh resolves over them and its data-parallel size divides
`data.eval_batch_size`); otherwise the largest data-parallel mesh whose size divides the eval batch.
"""
from __future__ import annotations

import dataclasses
import math

import jax


@dataclasses.dataclass
class EvalResult:
    metrics: dict
    specs: dict
    step: int | str
    mesh: dict
    sharding: str
    note: str


def apply_override(config, item: str):
    """`key=value` onto `config` (the value parsed as the field's current type)."""
    from colearn_jax.config_checks import has_field, unknown_key_message  # noqa: PLC0415

    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--override {item!r}: expected key=value.")
    if not has_field(config, key):
        raise ValueError(f"--override {key}: " + unknown_key_message(config, key))
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
        node[leaf] = value.lower() in ("1", "true", "yes")
    elif old is not None:
        node[leaf] = type(old)(value)
    else:
        node[leaf] = value


def eval_mesh(config, num_devices: int):
    """The stored mesh when it fits these devices and batch, else the largest data-parallel mesh
    whose size divides the eval batch. Returns (mesh sizes, sharding preset, note)."""
    from colearn_jax import sharding  # noqa: PLC0415

    stored = dict(config.mesh)
    try:
        sizes = sharding.mesh_shape(stored, num_devices)
        dp = math.prod(sizes[ax] for ax in sharding.batch_axes(sharding.get_rules(config.sharding)))
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


def evaluate_checkpoint(workdir: str, step: int | None = None, best: bool = False, overrides=(),
                        devices=None) -> EvalResult:
    import colearn_jax  # noqa: PLC0415
    from colearn_jax import sharding  # noqa: PLC0415
    from colearn_jax.models import get_system  # noqa: PLC0415
    from colearn_jax.train.checkpoint import abstract_variables  # noqa: PLC0415
    from colearn_jax.train.program import model_example_batch  # noqa: PLC0415

    which = "best" if best else "checkpoints"
    model, variables, config = colearn_jax.load(workdir, step=step, which=which)
    config.unlock()
    for item in overrides:
        apply_override(config, item)
    devices = devices or jax.devices()
    mesh_cfg, preset, note = eval_mesh(config, len(devices))
    mesh, rules = sharding.make_mesh(mesh_cfg, devices), sharding.get_rules(preset)
    system = get_system(config.model.name)
    if system.make_evaluator is None:
        raise ValueError(f"System {config.model.name!r} has no evaluator.")
    evaluator = system.make_evaluator(config, mesh, rules)
    target = abstract_variables(model, model_example_batch(system, config, sharding.data_parallel_size(mesh, rules)),
                                mesh, rules)
    variables = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), variables, target)
    metrics = evaluator(model, variables)
    label = step if step is not None else which if best else "latest"
    return EvalResult(metrics, dict(evaluator.metrics), label, dict(mesh.shape), preset if isinstance(preset, str)
                      else "explicit rules", note)
