"""Writing a converted model: checking its variables against the model its config builds, and saving
them (with the config, no optimizer state) as a colearn_jax checkpoint directory.

    check_variables(config, variables)           # ConversionError naming missing / extra / misshapen leaves
    save_checkpoint(config, variables, "/tmp/x") # -> "/tmp/x/checkpoints"; colearn_jax.load("/tmp/x")

The directory is what `colearn_jax.load` reads and what `config.train.init_from` starts a run from.
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from colearn_jax.convert.reading import ConversionError


def check_variables(config: ml_collections.ConfigDict, variables: dict) -> None:
    """Raises ConversionError unless `variables` has exactly the tree and shapes the model initialises."""
    import jax  # noqa: PLC0415
    import flax.linen as nn  # noqa: PLC0415

    from colearn_jax.models import get_system  # noqa: PLC0415

    system = get_system(config.model.name)
    model = system.build_model(config)
    from colearn_jax.train.program import model_example_batch  # noqa: PLC0415

    batch = model_example_batch(system, config, 1)  # what the model sees: after the system's batch transform
    expected = nn.unbox(jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b, train=False), batch))
    exp_flat = {jax.tree_util.keystr(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got_flat = {jax.tree_util.keystr(p): tuple(np.shape(x))
                for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
    missing = sorted(set(exp_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(exp_flat))
    wrong = sorted(k for k in set(exp_flat) & set(got_flat) if exp_flat[k] != got_flat[k])
    if missing or extra or wrong:
        raise ConversionError(
            "converted variables do not fit the model built from the config: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shapes {[(k, got_flat[k], exp_flat[k]) for k in wrong[:5]]}"
        )


def save_checkpoint(config: ml_collections.ConfigDict, variables: dict, output_dir: str, *, step: int = 0) -> str:
    """Writes what inference and `train.init_from` need: the variables and the config (no optimizer
    state). The result loads with `colearn_jax.load(output_dir)`. Returns the checkpoint directory."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from colearn_jax.train.checkpoint import Checkpointer  # noqa: PLC0415

    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    directory = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} already holds checkpoints; choose an empty --output.")
    check_variables(config, variables)
    cpu = jax.local_devices(backend="cpu")[0] if jax.default_backend() != "cpu" else jax.local_devices()[0]
    with jax.default_device(cpu):
        variables = jax.tree.map(jnp.asarray, variables)
        with Checkpointer(directory, keep=1, async_save=False) as ckpt:
            ckpt.save_variables(step, variables, config)
    return directory
