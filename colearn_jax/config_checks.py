"""Config validation that runs before anything is compiled, with errors that name the config key."""
from __future__ import annotations

import jax

from colearn_jax import sharding
from colearn_jax.losses.contrastive import GATHER_MODES


def validate(config, mesh, rules, tokenizer=None) -> None:
    dp = sharding.data_parallel_size(mesh, rules)
    sharding.check_batch_divisible(config.data.batch_size, mesh, rules, "config.data.batch_size")
    sharding.check_batch_divisible(config.data.eval_batch_size, mesh, rules, "config.data.eval_batch_size")
    if config.data.batch_size % jax.process_count():
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by the "
            f"{jax.process_count()} processes."
        )
    if config.train.num_steps <= 0:
        raise ValueError(f"config.train.num_steps={config.train.num_steps} must be positive.")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if config.train[key] < 0:
            raise ValueError(f"config.train.{key}={config.train[key]} must be >= 0 (0 disables).")
    loss = config.get("loss")
    if loss is not None and loss.get("gather") not in GATHER_MODES:
        raise ValueError(f"config.loss.gather={loss.get('gather')!r}; choose one of {GATHER_MODES}.")
    model = config.model
    if "vision" in model and "image_size" in model.vision and model.vision.image_size != config.data.image_size:
        raise ValueError(
            f"config.model.vision.image_size={model.vision.image_size} differs from "
            f"config.data.image_size={config.data.image_size}."
        )
    if "text" in model:
        if model.text.context_length < config.data.context_length:
            raise ValueError(
                f"config.data.context_length={config.data.context_length} exceeds "
                f"config.model.text.context_length={model.text.context_length}."
            )
        if tokenizer is not None and tokenizer.vocab_size > model.text.vocab_size:
            raise ValueError(
                f"config.model.text.vocab_size={model.text.vocab_size} is smaller than the "
                f"{config.data.tokenizer!r} tokenizer's vocabulary ({tokenizer.vocab_size})."
            )
    del dp
