"""colearn_jax: multimodal co-learning models in JAX/Flax, sharded over a named device mesh."""

__version__ = "0.1.0"


def load(path, step=None):
    """Loads `(model, variables, config)` from a checkpoint directory onto the local devices.

    See `colearn_jax.train.checkpoint.load` for details.
    """
    from colearn_jax.train.checkpoint import load as _load

    return _load(path, step=step)
