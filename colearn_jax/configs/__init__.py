"""Configs the package itself needs (converters, `colearn_jax.load`), importable after a normal install.

`base.get_config()` holds every field the generic trainer reads (seed, mesh, sharding, optim, train,
data batch sizes, eval cadence); each system's file extends it with only what is its own. The files
under the repository's `configs/` directory are thin entry points for `--config=configs/<system>.py:<preset>`.
"""
import importlib


def get_config(spec: str):
    """`spec` = '<system>:<arg>' or '<system>', e.g. 'clip:tiny' -> colearn_jax.configs.clip.get_config('tiny')."""
    name, _, arg = spec.partition(":")
    try:
        module = importlib.import_module(f"colearn_jax.configs.{name}")
    except ModuleNotFoundError:
        raise ValueError(f"No config module colearn_jax.configs.{name} (from {spec!r}).") from None
    return module.get_config(arg) if arg else module.get_config()
