"""Config validation that runs before a workdir is created or anything is compiled.

`validate(config, system, mesh, rules)` checks the generic fields (mesh, batch, optimizer, train; see
`colearn_jax/configs/base.py`) and then calls the system's own `validate_config`. Every error is a
ValueError whose message starts with the config key and the value, and says what is allowed.
Every float anywhere in the config must be finite. `check_ranges` / `positive_ints` are the helpers
systems use for their own fields. `unknown_key_message` turns a misspelt key into one line with a
suggestion (experiments/train.py, evaluate.py --override).
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import re

import jax

from colearn_jax import sharding

OPTIMIZERS = ("adamw", "sgd", "lars")
SCHEDULES = ("cosine", "constant")
GROUP_KEYS = {"pattern", "lr_mult", "frozen", "weight_decay"}


def _check(ok: bool, key: str, value, rule: str):
    if not ok:
        raise ValueError(f"config.{key}={value!r} {rule}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(config, key: str, integer: bool = False):
    value = _get(config, key)
    ok = (_is_int(value) if integer else isinstance(value, (int, float))) and value > 0
    _check(ok, key, value, "must be a positive integer" if integer else "must be > 0")


def _non_negative(config, key: str, integer: bool = True):
    value = _get(config, key)
    ok = (_is_int(value) if integer else isinstance(value, (int, float))) and value >= 0
    _check(ok, key, value, "must be an integer >= 0" if integer else "must be >= 0")


def positive_ints(config, keys) -> None:
    """Each of `keys` (dotted, under `config`) must be an integer > 0."""
    for key in keys:
        _positive(config, key, integer=True)


def check_ranges(config, ranges: dict) -> None:
    """`ranges`: {key: (low, high, closed_high)}; value must lie in [low, high] or [low, high)."""
    for key, (low, high, closed) in ranges.items():
        value = _get(config, key)
        ok = isinstance(value, (int, float)) and low <= value and (value <= high if closed else value < high)
        _check(ok, key, value, f"must be in [{low}, {high}{']' if closed else ')'}")


def check_divisible(config, key: str, by: str) -> None:
    value, divisor = _get(config, key), _get(config, by)
    _check(value % divisor == 0, key, value, f"is not divisible by config.{by}={divisor}")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def flat_keys(tree, prefix: str = "") -> dict:
    """{"model.vision.width": value} over nested dicts/ConfigDicts."""
    out = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _finite(config) -> None:
    for key, value in flat_keys(config).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"config.{key}={value!r} must be a finite number.")


def suggest(keys, wanted: str, n: int = 3) -> list[str]:
    """Close matches of the dotted key `wanted` among `keys`: a sibling with a close name first; else
    fields with a close name under other parents ('model.widht' -> 'model.vision.width') and keys
    close as a whole ('trian.num_steps' -> 'train.num_steps')."""
    keys = sorted(keys)
    parent, _, leaf = wanted.rpartition(".")
    by_leaf = [k for k in keys if difflib.get_close_matches(leaf, [k.rpartition(".")[2]], cutoff=0.75)]
    siblings = [k for k in by_leaf if k.rpartition(".")[0] == parent]
    if siblings:
        return siblings[:n]
    by_leaf.sort(key=lambda k: (not k.startswith(parent + "."), k.count("."), k))
    whole = difflib.get_close_matches(wanted, keys, n=n, cutoff=0.8)
    return list(dict.fromkeys(by_leaf + whole))[:n]


def has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def unknown_key_message(config, wanted: str) -> str:
    """'config.model.widht is not a config field; did you mean model.vision.width or model.text.width?'"""
    keys = flat_keys(config)
    keys = set(keys) | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    close = suggest(keys, wanted)
    parent = wanted.rpartition(".")[0]
    if close:
        hint = f"did you mean {' or '.join(close)}?"
    elif parent and has_field(config, parent) and hasattr(_get(config, parent), "keys"):
        hint = f"config.{parent} has: {', '.join(sorted(_get(config, parent).keys()))}."
    else:
        hint = f"the top-level fields are: {', '.join(sorted(config.keys()))}."
    return f"config.{wanted} is not a config field; {hint}"


def _check_allow_config_change(config) -> None:
    spec = config.train.get("allow_config_change", "")
    _check(isinstance(spec, str), "train.allow_config_change", spec, "must be a comma-separated string of keys")
    keys = set(flat_keys(config))
    for pattern in (p.strip() for p in spec.split(",") if p.strip()):
        if not any(k == pattern or k.startswith(pattern + ".") or fnmatch.fnmatchcase(k, pattern) for k in keys):
            raise ValueError(f"config.train.allow_config_change names {pattern!r}, which matches no field; "
                             + unknown_key_message(config, pattern).split("; ", 1)[1])


def validate_optim(optim) -> None:
    o = optim
    _check(o.name in OPTIMIZERS, "optim.name", o.name, f"is not an optimizer; choose one of {OPTIMIZERS}")
    _check(o.get("schedule", "cosine") in SCHEDULES, "optim.schedule", o.get("schedule"),
           f"is not a schedule; choose one of {SCHEDULES}")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0 (a negative rate would ascend the loss)")
    _check(_is_int(o.warmup_steps) and o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps,
           "must be an integer >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    if o.get("trust_coefficient") is not None:
        _check(o.trust_coefficient > 0, "optim.trust_coefficient", o.trust_coefficient, "must be > 0")
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
    _finite(config)
    _non_negative(config, "seed")
    positive_ints(config, ("data.batch_size", "data.eval_batch_size", "train.num_steps", "train.keep_checkpoints",
                           "train.stop_sync_every"))
    for key in ("train.log_every", "train.eval_every", "train.checkpoint_every", "data.prefetch",
                "train.max_consecutive_skips"):
        _non_negative(config, key)
    if config.train.get("init_from_step") is not None:
        _non_negative(config, "train.init_from_step")
    _check_allow_config_change(config)
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
    best = config.train.get("best_metric")
    if best and system.describe_metrics is not None:
        names = sorted(system.describe_metrics(config))
        _check(best in names, "train.best_metric", best,
               f"is not a metric of this system's evaluator; choose one of {names} (or '' to keep no best)")
    system.validate_config(config)
