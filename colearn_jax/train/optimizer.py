"""Optax optimizers and schedules from `config.optim`.

AdamW (Loshchilov & Hutter 2019) with CLIP's defaults (Radford et al. 2021, Sec. 2.5 and App. F:
beta2 0.98, eps 1e-6, weight decay 0.2), linear warm-up then cosine decay, global-norm clipping,
and an optax mask that exempts biases, norms, position/class embeddings and the logit scale/bias
from weight decay. SGD (momentum/Nesterov) and LARS are available for SimCLR-style training.
"""
from __future__ import annotations

import re

import jax
import optax

# Parameters never decayed: 1-D tensors and any whose path matches one of these patterns.
NO_DECAY_PATTERNS = (
    r"positional_embedding", r"class_embedding", r"logit_scale", r"logit_bias", r"(^|/)ln", r"bn",
    r"(^|/)bias[^/]*$",  # biases, also the per-head [heads, kv] attention biases (ndim 2)
)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params, patterns=NO_DECAY_PATTERNS):
    """True for parameters that get weight decay (ndim >= 2 and no exempt name in the path)."""
    compiled = [re.compile(p) for p in patterns]

    def decide(path, leaf):
        name = _path_str(path)
        return leaf.ndim >= 2 and not any(c.search(name) for c in compiled)

    return jax.tree_util.tree_map_with_path(decide, params)


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
        return optax.join_schedules(
            [optax.linear_schedule(0.0, optim_cfg.lr, max(warmup, 1)), optax.constant_schedule(optim_cfg.lr)],
            [warmup],
        )
    raise ValueError(f"config.optim.schedule={name!r}; choose 'cosine' or 'constant'.")


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, learning-rate schedule)."""
    schedule = make_schedule(optim_cfg, total_steps)
    name = optim_cfg.name
    if name == "adamw":
        opt = optax.adamw(
            schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask,
        )
    elif name == "sgd":
        opt = optax.chain(
            optax.add_decayed_weights(optim_cfg.weight_decay, mask=weight_decay_mask),
            optax.sgd(schedule, momentum=optim_cfg.get("momentum", 0.9), nesterov=optim_cfg.get("nesterov", False)),
        )
    elif name == "lars":
        opt = optax.lars(
            schedule, weight_decay=optim_cfg.weight_decay, weight_decay_mask=weight_decay_mask,
            trust_coefficient=optim_cfg.get("trust_coefficient", 1e-3), trust_ratio_mask=weight_decay_mask,
            momentum=optim_cfg.get("momentum", 0.9),
        )
    else:
        raise ValueError(f"config.optim.name={name!r}; choose 'adamw', 'sgd' or 'lars'.")
    clip = optim_cfg.get("grad_clip_norm")
    if clip:
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt, schedule
