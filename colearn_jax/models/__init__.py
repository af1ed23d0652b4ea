"""Registry of systems. A system = a linen module + an objective + an evaluator, built from config.

The generic trainer (`colearn_jax.train.loop`) only talks to `System`; nothing in it is model specific.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Objective = Callable[[dict, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    build_model: Callable[[Any], Any]  # config -> nn.Module taking (batch, train=...)
    make_objective: Callable[..., Objective]  # (config, mesh, rules) -> (outputs, batch) -> (loss, metrics)
    example_batch: Callable[[Any, int], dict]  # (config, batch_size) -> dict of jax.ShapeDtypeStruct
    constrain_params: Callable[[Any], Any] = lambda params: params  # applied after every update
    make_evaluator: Callable[..., Callable] | None = None  # (config, mesh, rules) -> fn(model, variables) -> metrics


_REGISTRY: dict[str, Callable[[], System]] = {}


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def get_system(name: str) -> System:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"config.model.name={name!r} is not a known system; known: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]()


def _load_builtin():
    from colearn_jax.models import clip_system  # noqa: F401,PLC0415
