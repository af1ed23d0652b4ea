"""Resuming a run from its workdir: the same run, from its newest good checkpoint.

`resume(ckpt, program, make_train_data, say, warn)` walks the stored steps from the newest:
  1. reads the step's config and compares it with the requested one *before any array is read*
     (`check_config_change`): a changed model, optimizer, schedule, loss, seed, batch size or
     `train.num_steps` is refused with one `ConfigChangeError` listing every differing key (stored vs
     requested), unless `config.train.allow_config_change` names it (then a warning lists it). Keys
     that never change what a run computes are free: the mesh and sharding, log/eval/checkpoint
     cadence, progress bar, cache and data paths, eval settings (`FREE_KEYS` plus the system's
     `System.resume_free_keys`);
  2. checks the stored array shapes (metadata only) against the requested model, so even an allowed
     change cannot make Orbax fail half-way through a restore;
  3. restores and verifies the state (finite, checksums; `Checkpointer.restore`).
A step that cannot be read or verified is reported by name, moved to `<workdir>/checkpoints_quarantine/`
(never deleted) and the previous step is tried; a config mismatch is the user's to resolve and is
never quarantined.
"""
from __future__ import annotations

import fnmatch
import json

import jax

from colearn_jax.train.checkpoint import Checkpointer, CheckpointError, CorruptCheckpointError
from colearn_jax.train.integrity import path_str

# Generic fields (colearn_jax/configs/base.py) that may change between the segments of one run.
FREE_KEYS = (
    "mesh", "sharding", "data.prefetch", "data.eval_batch_size", "eval",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.compilation_cache_dir", "train.progress_bar", "train.stop_sync_every",
    "train.nonfinite", "train.max_consecutive_skips", "train.allow_config_change", "train.best_metric",
    "train.init_from", "train.init_from_map", "train.init_from_step",  # a resume ignores init_from
)
ABSENT = "<absent>"
MAX_LISTED = 20


class ConfigChangeError(ValueError):
    """The requested config changes what the stored run computes."""


def flatten(tree, prefix: str = "") -> dict:
    """{"model.vision.width": 32, ...}; lists and tuples are leaves, compared as JSON."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def matches(key: str, patterns) -> bool:
    """`patterns` name keys ("train.num_steps"), subtrees ("model") or globs ("model.*_dim")."""
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)


def allowed_patterns(config) -> tuple[str, ...]:
    spec = config.train.get("allow_config_change", "") or ""
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def config_diff(stored: dict, requested: dict, free=()) -> list[tuple[str, object, object]]:
    """[(key, stored value, requested value)] for keys that differ and are not `free`."""
    a, b = flatten(stored), flatten(requested)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, ABSENT) != b.get(k, ABSENT) and not matches(k, free))
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in keys]


def _rows(diff) -> str:
    rows = [f"  {k}: {s!r} (stored) -> {r!r} (requested)" for k, s, r in diff[:MAX_LISTED]]
    if len(diff) > MAX_LISTED:
        rows.append(f"  ... and {len(diff) - MAX_LISTED} more")
    return "\n".join(rows)


def check_config_change(stored, requested, *, free=(), where: str = "") -> list:
    """Raises ConfigChangeError for changes `requested.train.allow_config_change` does not allow;
    returns the allowed ones (for a warning)."""
    diff = config_diff(stored.to_dict(), requested.to_dict(), tuple(FREE_KEYS) + tuple(free))
    allowed = allowed_patterns(requested)
    refused = [d for d in diff if not matches(d[0], allowed)]
    if refused:
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigChangeError(
            f"Cannot resume {where}: the config differs from the run's stored config in {len(refused)} "
            f"key(s) that change what it computes:\n{_rows(refused)}\n"
            "Restore those values to continue the run, or start a new --workdir (with "
            "--config.train.init_from=<this workdir> to start from its weights). If the change is meant "
            f"(e.g. a longer schedule), pass --config.train.allow_config_change={keys}")
    return [d for d in diff if matches(d[0], allowed)]


def check_shapes(ckpt: Checkpointer, step: int, abstract_state) -> None:
    """Raises ConfigChangeError when the stored arrays do not fit the requested state (metadata only)."""
    stored = ckpt.stored_shapes(step)  # unreadable metadata: CorruptCheckpointError
    wanted = {name: {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
              for name, tree in (("model", abstract_state.variables()), ("train", abstract_state.progress()))}
    problems = []
    for name, want in wanted.items():
        have = stored.get(name)
        if have is None:
            raise CorruptCheckpointError(step, ckpt.directory, f"it has no '{name}' item")
        problems += [f"{name}/{k}: missing from the checkpoint" for k in sorted(set(want) - set(have))]
        problems += [f"{name}/{k}: not in the requested model" for k in sorted(set(have) - set(want))]
        problems += [f"{name}/{k}: stored {have[k]} vs requested {want[k]}"
                     for k in sorted(set(want) & set(have)) if have[k] != want[k]]
    if problems:
        listing = "\n  ".join(problems[:MAX_LISTED]) + (f"\n  ... and {len(problems) - MAX_LISTED} more"
                                                       if len(problems) > MAX_LISTED else "")
        raise ConfigChangeError(
            f"Cannot resume {ckpt.directory} at step {step}: the stored arrays do not fit the requested "
            f"model:\n  {listing}\nA run cannot change its parameter shapes; start a new --workdir "
            "(config.train.init_from can map the weights that still fit).")


def resume(ckpt: Checkpointer, program, make_train_data, say, warn):
    """(state, train_data, step) from the newest good checkpoint, or None when there is none yet."""
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
        return None
    set_aside = []
    for step in steps:
        try:
            stored = ckpt.restore_config(step)
            allowed = check_config_change(stored, program.config, free=program.system.resume_free_keys,
                                          where=f"{ckpt.directory} at step {step}")
            check_shapes(ckpt, step, program.abstract_state)
            state, train_data = ckpt.restore(step, program.abstract_state, make_train_data())
        except CorruptCheckpointError as e:
            where = ckpt.quarantine(step)
            warn(f"WARNING: {e} Moved it to {where} (delete it when no longer needed); trying the previous one.")
            set_aside.append(step)
            continue
        if allowed:
            warn(f"WARNING: resuming step {step} with config changes allowed by "
                 f"config.train.allow_config_change:\n{_rows(allowed)}")
        if set_aside:
            warn(f"WARNING: resuming from step {step}, the newest good checkpoint; steps {set_aside} were set aside.")
        return state, train_data, step
    raise CheckpointError(
        f"No checkpoint in {ckpt.directory} could be restored; steps {set_aside} were moved to "
        f"{ckpt.directory}_quarantine. Running the same command again starts the run from scratch.")
