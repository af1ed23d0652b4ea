"""Optax optimizers, schedules, weight-decay roles and parameter groups from `config.optim`.

AdamW (Loshchilov & Hutter 2019), SGD (momentum/Nesterov) and LARS (You et al. 2017, as SimCLR uses
it), each with linear warm-up then cosine (or constant) and optional global-norm clipping.

Weight decay (and LARS' trust ratio) applies by *shape and role*, not by a model's parameter names:
parameters with fewer than 2 dimensions (norm scales, biases, logit scales), any leaf named `bias*`
(per-head [heads, kv] attention biases, add_bias_kv), and position / class / modality / token-type
embeddings are exempt. A system may replace the rule (`System.weight_decay_mask`).

Parameter groups (`config.optim.groups`, first matching regex on the "a/b/kernel" path wins) give a
learning-rate multiplier, a frozen flag or their own weight decay, through `optax.multi_transform`.
Frozen parameters get `optax.set_to_zero()` (no optimizer moments at all) and the step drops their
gradients before anything reads them, so XLA never computes them.
"""
from __future__ import annotations

import re
from typing import Callable

import jax
import optax

# A path component that names an embedding the model adds, not a weight it multiplies by.
_EMBEDDING_ROLE = re.compile(r"(pos|position|positional|class|cls|modality|type|token_type|segment)(al)?_?emb.*")
_BIAS_ROLE = re.compile(r"bias.*")


def path_str(path) -> str:
    """'vision/transformer/attn/query/kernel' for a jax key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(name))
    return "/".join(parts)


def decays_by_role(path: str, ndim: int) -> bool:
    """The default rule: True when a parameter gets weight decay."""
    parts = path.split("/")
    if ndim < 2 or _BIAS_ROLE.fullmatch(parts[-1]):
        return False
    return not any(_EMBEDDING_ROLE.fullmatch(p) for p in parts)


def weight_decay_mask(params):
    """Bool tree: True for parameters that get weight decay (the default rule above)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: decays_by_role(path_str(p), x.ndim), params)


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    warmup = int(optim_cfg.warmup_steps)
    name = optim_cfg.get("schedule", "cosine")
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=optim_cfg.lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=optim_cfg.lr * optim_cfg.get("end_lr_factor", 0.0),
        )
    if name == "constant":
        if warmup == 0:
            return optax.constant_schedule(optim_cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, optim_cfg.lr, warmup), optax.constant_schedule(optim_cfg.lr)], [warmup]
        )
    raise ValueError(f"config.optim.schedule={name!r}; choose 'cosine' or 'constant'.")


def _groups(optim_cfg) -> list[dict]:
    return [dict(g) for g in (optim_cfg.get("groups") or ())]


def group_label(path: str, groups: list[dict]) -> str:
    for i, g in enumerate(groups):
        if re.search(g["pattern"], path):
            return f"group_{i}"
    return "default"


def param_labels(params, optim_cfg):
    groups = _groups(optim_cfg)
    return jax.tree_util.tree_map_with_path(lambda p, _: group_label(path_str(p), groups), params)


def trainable_mask(params, optim_cfg):
    """Bool tree: False for parameters of a frozen group."""
    groups = _groups(optim_cfg)

    def trainable(path, _):
        label = group_label(path_str(path), groups)
        return label == "default" or not groups[int(label.split("_")[1])].get("frozen", False)

    return jax.tree_util.tree_map_with_path(trainable, params)


def _base_optimizer(optim_cfg, schedule, weight_decay: float, decay_mask: Callable) -> optax.GradientTransformation:
    name = optim_cfg.name
    if name == "adamw":
        return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=weight_decay, mask=decay_mask)
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=optim_cfg.get("momentum", 0.9), nesterov=optim_cfg.get("nesterov", False)),
        )
    if name == "lars":
        return optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=decay_mask,
                          trust_coefficient=optim_cfg.get("trust_coefficient", 1e-3), trust_ratio_mask=decay_mask,
                          momentum=optim_cfg.get("momentum", 0.9))
    raise ValueError(f"config.optim.name={name!r}; choose 'adamw', 'sgd' or 'lars'.")


def _scaled(schedule, mult: float):
    return lambda step: schedule(step) * mult


def make_optimizer(optim_cfg, total_steps: int, decay_mask: Callable | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, base learning-rate schedule)."""
    schedule = make_schedule(optim_cfg, total_steps)
    decay_mask = decay_mask or weight_decay_mask
    groups = _groups(optim_cfg)
    opt = _base_optimizer(optim_cfg, schedule, optim_cfg.weight_decay, decay_mask)
    if groups:
        transforms = {"default": opt}
        for i, g in enumerate(groups):
            if g.get("frozen", False):
                transforms[f"group_{i}"] = optax.set_to_zero()
            else:
                wd = g.get("weight_decay")
                transforms[f"group_{i}"] = _base_optimizer(
                    optim_cfg, _scaled(schedule, float(g.get("lr_mult", 1.0))),
                    optim_cfg.weight_decay if wd is None else wd, decay_mask)
        opt = optax.multi_transform(transforms, lambda params: param_labels(params, optim_cfg))
    clip = optim_cfg.get("grad_clip_norm")
    if clip:
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt, schedule
