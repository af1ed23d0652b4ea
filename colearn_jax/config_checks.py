"""Config validation that runs before a workdir is created or anything is compiled.

`validate(config, system, mesh, rules)` checks the generic fields (mesh, batch, optimizer, train; see
`colearn_jax/configs/base.py`) and then calls the system's own `validate_config`. Every error is a
ValueError whose message starts with the config key and the value, and says what is allowed.
"""
from __future__ import annotations

import re

import jax

from colearn_jax import sharding

OPTIMIZERS = ("adamw", "sgd", "lars")
SCHEDULES = ("cosine", "constant")
GROUP_KEYS = {"pattern", "lr_mult", "frozen", "weight_decay"}


def _check(ok: bool, key: str, value, rule: str):
    if not ok:
        raise ValueError(f"config.{key}={value!r} {rule}.")


def _positive(config, key: str, integer: bool = False):
    value = _get(config, key)
    _check(value is not None and value > 0 and (not integer or int(value) == value), key, value,
           "must be a positive integer" if integer else "must be > 0")


def _non_negative(config, key: str):
    value = _get(config, key)
    _check(value is not None and value >= 0, key, value, "must be >= 0")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def validate_optim(optim) -> None:
    o = optim
    _check(o.name in OPTIMIZERS, "optim.name", o.name, f"is not an optimizer; choose one of {OPTIMIZERS}")
    _check(o.get("schedule", "cosine") in SCHEDULES, "optim.schedule", o.get("schedule"),
           f"is not a schedule; choose one of {SCHEDULES}")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0 (a negative rate would ascend the loss)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(0 <= o.get("end_lr_factor", 0.0) <= 1, "optim.end_lr_factor", o.get("end_lr_factor"), "must be in [0, 1]")
    for beta in ("b1", "b2", "momentum"):
        if o.get(beta) is not None:
            _check(0 <= o[beta] < 1, f"optim.{beta}", o[beta], "must be in [0, 1)")
    if o.get("eps") is not None:
        _check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    if o.get("grad_clip_norm") is not None:
        _check(o.grad_clip_norm > 0, "optim.grad_clip_norm", o.grad_clip_norm, "must be > 0 (or None to disable)")
    for i, group in enumerate(o.get("groups") or ()):
        group = dict(group)
        unknown = set(group) - GROUP_KEYS
        _check(not unknown, f"optim.groups[{i}]", group, f"has unknown keys {sorted(unknown)}; allowed {sorted(GROUP_KEYS)}")
        _check("pattern" in group, f"optim.groups[{i}]", group, "needs a 'pattern' (a regex on parameter paths)")
        try:
            re.compile(group["pattern"])
        except re.error as e:
            raise ValueError(f"config.optim.groups[{i}].pattern={group['pattern']!r} is not a regex: {e}.") from None
        if "lr_mult" in group:
            _check(group["lr_mult"] >= 0, f"optim.groups[{i}].lr_mult", group["lr_mult"], "must be >= 0")
        if group.get("weight_decay") is not None:
            _check(group["weight_decay"] >= 0, f"optim.groups[{i}].weight_decay", group["weight_decay"], "must be >= 0")


def validate(config, system, mesh, rules) -> None:
    """Generic checks, then `system.validate_config(config)`."""
    for key in ("data.batch_size", "data.eval_batch_size", "train.num_steps"):
        _positive(config, key, integer=True)
    for key in ("train.log_every", "train.eval_every", "train.checkpoint_every"):
        _non_negative(config, key)
    _positive(config, "train.keep_checkpoints", integer=True)
    _non_negative(config, "data.prefetch")
    _positive(config, "train.stop_sync_every", integer=True)
    _non_negative(config, "train.max_consecutive_skips")
    _check(config.train.nonfinite in ("stop", "skip"), "train.nonfinite", config.train.nonfinite,
           "must be 'stop' or 'skip'")
    sharding.check_batch_divisible(config.data.batch_size, mesh, rules, "config.data.batch_size")
    sharding.check_batch_divisible(config.data.eval_batch_size, mesh, rules, "config.data.eval_batch_size")
    if config.data.batch_size % jax.process_count():
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by the "
            f"{jax.process_count()} processes."
        )
    validate_optim(config.optim)
    if config.train.get("init_from_map") and not config.train.get("init_from"):
        raise ValueError(
            f"config.train.init_from_map={config.train.init_from_map!r} is set but config.train.init_from is empty."
        )
    system.validate_config(config)
