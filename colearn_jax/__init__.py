"""colearn_jax: multimodal co-learning models in JAX/Flax, sharded over a named device mesh."""

__version__ = "0.1.0"


def load(path, step=None, which: str = "checkpoints"):
    """Loads `(model, variables, config)` from a workdir or checkpoint directory onto one local device.

    Parameters and model state only (no optimizer moments); `which="best"` reads the checkpoint kept
    by `config.train.best_metric`. See `colearn_jax.train.checkpoint.load`.
    """
    from colearn_jax.train.checkpoint import load as _load

    return _load(path, step=step, which=which)
