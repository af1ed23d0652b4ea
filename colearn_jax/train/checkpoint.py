"""Orbax checkpoints: train state, data-iterator state and config, saved together per step.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`. Saves are asynchronous (the device to
host copy blocks, the write does not), keep the newest N, and are atomic: Orbax writes into a
temporary directory and renames it when complete, so an interrupted save never replaces the last
good checkpoint. grain is imported only when a data iterator is saved or restored, so building and
compiling a train step (benchmarks on synthetic batches) never needs grain. Restoring takes an abstract state whose leaves carry the *target* shardings, so a
checkpoint written on one mesh restores onto any other (or onto one CPU, see `load`).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, config, *, force: bool = False) -> bool:
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
        if data_iterator is not None:
            import grain  # noqa: PLC0415 (lazy: see the module docstring)

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores (state, data_iterator) at `step` into the shardings carried by `abstract_state`."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            import grain  # noqa: PLC0415 (lazy: see the module docstring)

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # surface which checkpoint is bad; the files are left untouched
            raise RuntimeError(
                f"Could not restore checkpoint step {step} from {self.directory}: {type(e).__name__}: {e}"
            ) from e
        return restored["state"], restored.get("data", None)

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


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def _checkpoint_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint directory at {path}.")
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def load(path: str, step: int | None = None, devices=None) -> tuple[Any, dict, ml_collections.ConfigDict]:
    """Loads `(model, variables, config)` from a workdir or its `checkpoints/` directory.

    Restores onto `devices` (default: the first local device, e.g. the single CPU in Colab),
    whatever mesh the checkpoint was written from. `variables` is `{"params": ..., **model_state}`,
    ready for `model.apply(variables, ...)`.
    """
    from colearn_jax import sharding  # noqa: PLC0415
    from colearn_jax.models import get_system  # noqa: PLC0415
    from colearn_jax.train.optimizer import make_optimizer  # noqa: PLC0415
    from colearn_jax.train.state import state_shardings  # noqa: PLC0415

    directory = _checkpoint_dir(path)
    with Checkpointer(directory, read_only=True, async_save=False) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"No complete checkpoint found in {directory}.")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"Checkpoint step {step} not in {directory}; available steps: {sorted(steps)}.")
        config = ckpt.restore_config(step)
        devices = devices or jax.local_devices()[:1]
        mesh = Mesh(np.asarray(devices).reshape(len(devices), 1, 1), sharding.MESH_AXES)
        rules = sharding.get_rules("dp")
        system = get_system(config.model.name)
        model = system.build_model(config)
        tx, _ = make_optimizer(config.optim, config.train.num_steps)
        abstract, shardings = state_shardings(model, tx, system.example_batch(config, len(devices)), mesh, rules)
        state, _ = ckpt.restore(step, with_shardings(abstract, shardings))
    return model, state.variables(), config


