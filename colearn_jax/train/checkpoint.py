"""Orbax checkpoints: what inference needs, what resuming needs, the data position and the config.

Layout: `<workdir>/checkpoints/<step>/{model, train, data, config, checksums}`:
  model   `{"params": ..., **model_state}` — all that `colearn_jax.load`, `train.init_from` and the
          converters read or write (a converter writes only `model` and `config`);
  train   `{"step", "opt_state", "rng"}` — optimizer moments etc., read only to resume;
  data    the grain iterator position;  config  the run's config as JSON;
  checksums  `{"model": {path: uint32}, "train": {...}}` (train/integrity.py), written with the step.
Saves are asynchronous (the device-to-host copy blocks, the write does not), keep the newest N, and
are atomic: Orbax writes into a temporary directory and renames it when complete, so an interrupted
save never replaces the last good checkpoint (leftover temporary directories are removed when a
writable `Checkpointer` opens). A state with a non-finite leaf is never saved. Restoring takes
abstract trees whose leaves carry the *target* shardings, so a checkpoint written on one mesh
restores onto any other (or one CPU), then checks every restored leaf: finite, and equal to its
checksum. A step that fails (unreadable files, a changed bit) raises `CorruptCheckpointError`;
`quarantine(step)` moves it to `<directory>_quarantine/<step>` where Orbax no longer sees it.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from colearn_jax.train import integrity
from colearn_jax.train.state import TrainState

ITEMS = ("model", "train", "data", "config", "checksums")
CONFIG_FILE = "metadata"  # the file the `config` item's JSON handler writes (`read_config` reads it directly)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the step and directory."""


class CorruptCheckpointError(CheckpointError):
    """A stored step is unreadable, holds a non-finite leaf, or differs from its checksums."""

    def __init__(self, step: int, directory: str, reason: str):
        super().__init__(f"Checkpoint step {step} in {directory} is corrupt: {reason}.")
        self.step, self.directory, self.reason = step, directory, reason


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (e.g. the disk is full); earlier checkpoints are untouched."""


def _is_disk_full(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _drain_stray_callbacks(quiet_s: float = 0.5, max_wait_s: float = 10.0):
    """Orbax restores on a fresh event loop and closes it as soon as one read fails; every read still in
    flight then calls back into the closed loop and Python prints its 'RuntimeError: Event loop is
    closed' as an unraisable exception — hundreds of tracebacks burying the real error — and asyncio
    logs 'Task exception was never retrieved' for the failed reads' siblings. Inside this context those
    (and only those) are dropped; after a failure it waits until they stop arriving (`quiet_s` without
    one, at most `max_wait_s`) and collects the orphaned tasks."""
    previous = sys.unraisablehook
    last = [time.monotonic()]

    def hook(args):
        if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
            last[0] = time.monotonic()
            return
        previous(args)

    def unretrieved(record):  # the failed gather's sibling tasks, logged by asyncio when collected
        return not record.getMessage().startswith("Task exception was never retrieved")

    sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(unretrieved)
    try:
        yield
    except BaseException:
        failed = last[0] = max(last[0], time.monotonic())
        while time.monotonic() - last[0] < quiet_s and time.monotonic() - failed < max_wait_s:
            time.sleep(0.05)
        gc.collect()  # collect those tasks now, while their complaint is filtered
        raise
    finally:
        sys.unraisablehook = previous
        asyncio_log.removeFilter(unretrieved)


def _short(e: Exception, limit: int = 400) -> str:
    """'ValueError: DATA_LOSS: ...' without TensorStore's spec dumps, at most `limit` characters."""
    text = str(e).split(" [tensorstore_spec")[0]
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(e).__name__}: {text}"


def _listed(paths, limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def _item_handlers() -> dict:
    handlers = dict(model=ocp.PyTreeCheckpointHandler(), train=ocp.PyTreeCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler(filename=CONFIG_FILE), checksums=ocp.JsonCheckpointHandler())
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
        if read_only:  # what Orbax would force anyway, without its warnings
            kw.update(save_interval_steps=0)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only, **kw
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        self._pending = None  # the step of the newest save (async: possibly still being written)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator, config, *, force: bool = False,
             metrics: dict | None = None) -> bool:
        trees = dict(model=state.variables(), train=state.progress())
        items = {name: _save(tree) for name, tree in trees.items()}
        items["config"] = ocp.args.JsonSave(config.to_dict())
        items["checksums"] = ocp.args.JsonSave(self._checksums(step, trees))
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            import grain  # noqa: PLC0415

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._write(step, items, force=force, metrics=metrics)

    def save_variables(self, step: int, variables: dict, config, metrics: dict | None = None) -> bool:
        """Parameters + model state + config only (inference, `init_from`, converters, best checkpoints)."""
        items = dict(model=_save(variables), config=ocp.args.JsonSave(config.to_dict()),
                     checksums=ocp.args.JsonSave(self._checksums(step, dict(model=variables))))
        return self._write(step, items, force=True, metrics=metrics)

    def _checksums(self, step: int, trees: dict) -> dict:
        """Per-leaf checksums of the trees about to be saved; refuses a non-finite leaf (a run never
        replaces a good checkpoint with a NaN one)."""
        out = {"algorithm": integrity.ALGORITHM}
        for name, tree in trees.items():
            prints = integrity.fingerprint(tree)
            bad = integrity.nonfinite(prints)
            if bad:
                raise CheckpointSaveError(
                    f"Refusing to save checkpoint step {step} in {self.directory}: non-finite values in "
                    f"{name}/{_listed(bad)}. The earlier checkpoints are untouched.")
            out[name] = integrity.checksums(prints)
        return out

    def _write(self, step: int, items: dict, **kw) -> bool:
        try:  # Orbax waits for the previous async write anyway; one that failed is reported for its own step
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (Orbax re-raises the writer thread's error as is)
            failed, self._pending = self._pending, None
            raise self._save_error(failed, e) from e
        self._pending = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), **kw)
        except Exception as e:  # noqa: BLE001
            self._pending = None
            raise self._save_error(step, e) from e

    def last_saved_step(self) -> int | None:
        """The newest step written or being written (an async save still in flight counts)."""
        steps = self.steps_on_disk() + ([self._pending] if self._pending is not None else [])
        return max(steps) if steps else None

    def _save_error(self, step: int | None, e: Exception) -> CheckpointSaveError:
        hint = " The disk is full: free space or point --workdir elsewhere." if _is_disk_full(e) else ""
        done = [s for s in self.steps_on_disk() if s != step]
        kept = f"the previous checkpoint (step {max(done)}) is intact" if done else "no earlier checkpoint exists"
        which = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointSaveError(
            f"Could not write {which} in {self.directory}: {type(e).__name__}: {e}; {kept}.{hint}")

    def steps_on_disk(self) -> list[int]:
        """Finalized step directories (an interrupted or failed save leaves only a temporary one)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory)
                      if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    # ------------------------------------------------------------------ reading
    def step_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _read(self, step: int, what: str, fn):
        """`fn()` (an Orbax read of `step`); any failure is a CorruptCheckpointError naming the step."""
        try:
            with _drain_stray_callbacks():
                return fn()
        except Exception as e:  # surface which checkpoint is bad; the files are left untouched
            raise CorruptCheckpointError(step, self.directory, f"unreadable {what} ({_short(e)})") from e

    def _restore(self, step: int, items: dict):
        return self._read(step, "+".join(items), lambda: self.manager.restore(step, args=ocp.args.Composite(**items)))

    def stored_checksums(self, step: int) -> dict:
        """The step's `checksums` item, or {} for checkpoints written before checksums existed."""
        if not os.path.isdir(os.path.join(self.step_directory(step), "checksums")):
            return {}
        return self._restore(step, dict(checksums=ocp.args.JsonRestore()))["checksums"] or {}

    def verify(self, step: int, trees: dict, stored: dict | None = None):
        """Raises CorruptCheckpointError when a restored leaf is non-finite or differs from its checksum."""
        stored = self.stored_checksums(step) if stored is None else stored
        for name, tree in trees.items():
            prints = integrity.fingerprint(tree)
            bad = integrity.nonfinite(prints)
            if bad:
                raise CorruptCheckpointError(step, self.directory, f"non-finite values in {name}/{_listed(bad)}")
            changed = integrity.mismatches(prints, stored.get(name, {}))
            if changed:
                raise CorruptCheckpointError(
                    step, self.directory, f"{name}/{_listed(changed)} differ from the checksums written with "
                    "the step (changed bits on disk)")

    def restore(self, step: int, abstract_state: TrainState, data_iterator=None):
        """Restores (state, data_iterator) at `step` into the shardings carried by `abstract_state`,
        verified (finite, checksums)."""
        items = dict(model=_restore_args(abstract_state.variables()), train=_restore_args(abstract_state.progress()))
        if data_iterator is not None and hasattr(data_iterator, "set_state"):
            import grain  # noqa: PLC0415

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._restore(step, items)
        self.verify(step, dict(model=restored["model"], train=restored["train"]))
        state = TrainState.from_parts(restored["model"], restored["train"])
        return state, restored.get("data", data_iterator)

    def restore_variables(self, step: int, abstract_variables, partial: bool = False) -> dict:
        """Only `{"params", **model_state}` (parameter-sized: no optimizer moments are read), verified;
        `partial`: `abstract_variables` names a subset of the stored leaves."""
        variables = self._restore(step, dict(model=_restore_args(abstract_variables, partial)))["model"]
        self.verify(step, dict(model=variables))
        return variables

    def quarantine(self, step: int) -> str:
        """Moves step `step` out of Orbax's sight to `<directory>_quarantine/<step>[.n]` (never deletes it).
        Returns the new path."""
        target_root = self.directory.rstrip(os.sep) + "_quarantine"
        target = os.path.join(target_root, str(step))
        n = 0
        while os.path.exists(target):
            n += 1
            target = os.path.join(target_root, f"{step}.{n}")
        if jax.process_index() == 0:
            os.makedirs(target_root, exist_ok=True)
            shutil.move(self.step_directory(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"colearn_jax_quarantine_{step}")
        self.manager.reload()
        return target

    def stored_shapes(self, step: int) -> dict[str, dict[str, tuple]]:
        """{item: {path: shape}} of the stored `model` and `train` arrays, from metadata only."""
        meta = self._read(step, "metadata", lambda: self.manager.item_metadata(step))
        out = {}
        for name in ("model", "train"):
            tree = meta[name] if meta is not None else None
            if tree is None:
                continue
            tree = getattr(tree, "tree", tree)
            out[name] = {integrity.path_str(p): tuple(getattr(leaf, "shape", ()))
                         for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
        return out

    def variables_metadata(self, step: int):
        """Tree of the stored variables' metadata (shape, dtype) without reading any array."""
        meta = self._read(step, "metadata", lambda: self.manager.item_metadata(step))
        model = meta["model"] if meta is not None else None
        if model is None:
            raise FileNotFoundError(f"Checkpoint step {step} in {self.directory} has no 'model' item.")
        return getattr(model, "tree", model)

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        config = self._restore(step, dict(config=ocp.args.JsonRestore()))["config"]
        if not isinstance(config, dict):
            raise CorruptCheckpointError(step, self.directory,
                                         f"its config item is {type(config).__name__}, not a dict")
        return ml_collections.ConfigDict(config)

    def wait(self):
        """Waits for an in-flight async save; a failed write raises CheckpointSaveError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (Orbax re-raises the writer thread's error as is)
            failed, self._pending = self._pending, None
            raise self._save_error(failed, e) from e

    def close(self):
        try:
            self.wait()
        finally:
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
