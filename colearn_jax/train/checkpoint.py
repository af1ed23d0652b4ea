"""Orbax checkpoints: what inference needs, what resuming needs, the data position and the config.

Layout: `<workdir>/checkpoints/<step>/{model, train, data, config}`:
  model   `{"params": ..., **model_state}` — all that `colearn_jax.load`, `train.init_from` and the
          converters read or write (a converter writes only `model` and `config`);
  train   `{"step", "opt_state", "rng"}` — optimizer moments etc., read only to resume;
  data    the grain iterator position;  config  the run's config as JSON.
Saves are asynchronous (the device-to-host copy blocks, the write does not), keep the newest N, and
are atomic: Orbax writes into a temporary directory and renames it when complete, so an interrupted
save never replaces the last good checkpoint. Restoring takes abstract trees whose leaves carry the
*target* shardings, so a checkpoint written on one mesh restores onto any other (or one CPU).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from colearn_jax.train.state import TrainState

ITEMS = ("model", "train", "data", "config")
CONFIG_FILE = "metadata"  # the file the `config` item's JSON handler writes (`read_config` reads it directly)


def _item_handlers() -> dict:
    handlers = dict(model=ocp.PyTreeCheckpointHandler(), train=ocp.PyTreeCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler(filename=CONFIG_FILE))
    try:  # the data position; grain is absent on inference-only installs (e.g. a bare GPU image)
        import grain  # noqa: PLC0415

        handlers["data"] = grain.checkpoint.CheckpointHandler()
    except ImportError:
        pass
    return handlers


def _save(tree):
    return ocp.args.PyTreeSave(tree)


def _restore_args(abstract_tree, partial: bool = False):
    """Restore into `abstract_tree` (ShapeDtypeStructs with target shardings); `partial`: a subset."""
    return ocp.args.PyTreeRestore(item=abstract_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(
        abstract_tree), partial_restore=partial)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False,
                 best_metric: str | None = None, best_mode: str = "max"):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        kw = {}
        if best_metric:
            kw = dict(best_fn=lambda metrics: metrics[best_metric], best_mode=best_mode,
                      keep_checkpoints_without_metrics=False)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only, **kw
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator, config, *, force: bool = False,
             metrics: dict | None = None) -> bool:
        items = dict(
            model=_save(state.variables()),
            train=_save(state.progress()),
            config=ocp.args.JsonSave(config.to_dict()),
        )
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            import grain  # noqa: PLC0415

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)

    def save_variables(self, step: int, variables: dict, config, metrics: dict | None = None) -> bool:
        """Parameters + model state + config only (inference, `init_from`, converters, best checkpoints)."""
        items = dict(model=_save(variables), config=ocp.args.JsonSave(config.to_dict()))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True, metrics=metrics)

    def _restore(self, step: int, items: dict):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # surface which checkpoint is bad; the files are left untouched
            raise RuntimeError(
                f"Could not restore checkpoint step {step} from {self.directory}: {type(e).__name__}: {e}"
            ) from e

    def restore(self, step: int, abstract_state: TrainState, data_iterator=None):
        """Restores (state, data_iterator) at `step` into the shardings carried by `abstract_state`."""
        items = dict(model=_restore_args(abstract_state.variables()), train=_restore_args(abstract_state.progress()))
        if data_iterator is not None and hasattr(data_iterator, "set_state"):
            import grain  # noqa: PLC0415

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._restore(step, items)
        state = TrainState.from_parts(restored["model"], restored["train"])
        return state, restored.get("data", data_iterator)

    def restore_variables(self, step: int, abstract_variables, partial: bool = False) -> dict:
        """Only `{"params", **model_state}` (parameter-sized: no optimizer moments are read);
        `partial`: `abstract_variables` names a subset of the stored leaves."""
        return self._restore(step, dict(model=_restore_args(abstract_variables, partial)))["model"]

    def variables_metadata(self, step: int):
        """Tree of the stored variables' metadata (shape, dtype) without reading any array."""
        meta = self.manager.item_metadata(step)
        model = meta["model"] if meta is not None else None
        if model is None:
            raise FileNotFoundError(f"Checkpoint step {step} in {self.directory} has no 'model' item.")
        return getattr(model, "tree", model)

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(restored["config"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def list_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in `directory` (in-progress or interrupted saves excluded)."""
    with Checkpointer(directory, read_only=True, async_save=False) as ckpt:
        return sorted(ckpt.all_steps())


def checkpoint_dir(path: str, which: str = "checkpoints") -> str:
    """`path` may be a workdir (its `checkpoints/` or `best/` is used) or a checkpoint directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint directory at {path}.")
    sub = os.path.join(path, which)
    if os.path.isdir(sub):
        return sub
    if which == "best":
        raise FileNotFoundError(f"No best checkpoint in {path} (set config.train.best_metric when training).")
    return path


def pick_step(ckpt: Checkpointer, step: int | None) -> int:
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"No complete checkpoint found in {ckpt.directory}.")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"Checkpoint step {step} not in {ckpt.directory}; available steps: {sorted(steps)}.")
    return step


def read_config(path: str, step: int | None = None, which: str = "checkpoints") -> tuple[dict, int, str]:
    """The config stored with a checkpoint, as a dict, read straight from its JSON file.

    No CheckpointManager is created, so JAX is not started: config files call this while the command
    line is parsed, before `--num_cpu_devices` / `--multihost` take effect. `path` as for `load`; the
    newest step whose config is complete unless `step` is given (an unfinished save is still in a
    temporary directory, not `<step>/`). Returns (config dict, step, checkpoint directory).
    """
    directory = checkpoint_dir(path, which)
    steps = sorted(int(name) for name in os.listdir(directory)
                   if name.isdigit() and os.path.isfile(os.path.join(directory, name, "config", CONFIG_FILE)))
    if not steps:
        raise FileNotFoundError(f"No complete checkpoint with a stored config in {directory}.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"Checkpoint step {step} not in {directory}; available steps: {steps}.")
    with open(os.path.join(directory, str(step), "config", CONFIG_FILE)) as f:
        return json.load(f), step, directory


def abstract_variables(model, example_batch, mesh: Mesh, rules):
    """Abstract `{"params", **model_state}` of `model` with target shardings on `mesh`."""
    import flax.linen as nn  # noqa: PLC0415

    example_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example_batch)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda b: model.init({"params": jax.random.PRNGKey(0)}, b, train=False), example_batch)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    from colearn_jax.train.program import with_shardings  # noqa: PLC0415

    return with_shardings(nn.unbox(boxed), shardings)


def load(path: str, step: int | None = None, devices=None, which: str = "checkpoints"
         ) -> tuple[Any, dict, ml_collections.ConfigDict]:
    """Loads `(model, variables, config)` from a workdir or a checkpoint directory.

    Restores parameters and model state only (never optimizer moments) onto `devices` (default: the
    first local device, e.g. the single CPU in Colab), whatever mesh wrote them. `which="best"` reads
    `<workdir>/best`, the checkpoint kept by `config.train.best_metric`. `variables` is
    `{"params": ..., **model_state}`, ready for `model.apply(variables, ...)`.
    """
    from colearn_jax import sharding  # noqa: PLC0415
    from colearn_jax.models import get_system  # noqa: PLC0415

    directory = checkpoint_dir(path, which)
    with Checkpointer(directory, read_only=True, async_save=False) as ckpt:
        step = pick_step(ckpt, step)
        config = ckpt.restore_config(step)
        devices = devices or jax.local_devices()[:1]
        mesh = Mesh(np.asarray(devices).reshape(len(devices), 1, 1), sharding.MESH_AXES)
        rules = sharding.get_rules("dp")
        system = get_system(config.model.name)
        model = system.build_model(config)
        from colearn_jax.train.program import model_example_batch  # noqa: PLC0415

        example = model_example_batch(system, config, len(devices))
        variables = ckpt.restore_variables(step, abstract_variables(model, example, mesh, rules))
    return model, variables, config
