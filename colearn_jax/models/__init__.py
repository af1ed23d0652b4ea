"""Registry of systems, and the `System` interface the generic trainer talks to.

A system is everything one co-learning method brings (DESIGN.md "One system = ..."): a linen module,
an objective, its own data (train iterator, eval data, and the example batch from the same feature
spec), the RNG streams it draws, an on-device batch transform (augmentation), its evaluator (which
describes its metrics), its config checks and its weight-decay roles. The trainer in
`colearn_jax.train` names no model, field, tokenizer or metric of any system: where it must, a hook
belongs here. `README.md` "Adding a system" shows CLIP as the worked example.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Protocol

import jax

# objective(outputs, batch, rngs, step) -> (scalar loss, {metric: scalar}); rngs: {stream: key}.
Objective = Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, dict]]
# transform(batch, rngs, step) -> batch, run inside the jitted step before the model (e.g. augmentation).
BatchTransform = Callable[[dict, dict, jax.Array], dict]


class Evaluator(Protocol):
    """`evaluator(model, variables) -> {name: float}`; `evaluator.metrics` describes each name."""

    metrics: dict  # name -> colearn_jax.evals.MetricSpec

    def __call__(self, model, variables) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class DataContext:
    """Where a process sits in the run: what a system's data hooks need besides the config."""

    seed: int
    process_index: int = 0
    process_count: int = 1


def _no_checks(config) -> None:
    del config


def _identity(params):
    return params


def apply_model(model, variables, batch, *, rngs, step, mutable):
    """The default forward: `model.apply(variables, batch, train=True)` with the step's RNG streams."""
    del step  # a system whose model needs the step (schedules inside the model) overrides this hook
    return model.apply(variables, batch, train=True, rngs=rngs, mutable=mutable)


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    build_model: Callable[[Any], Any]  # config -> nn.Module taking (batch, train=...)
    make_objective: Callable[..., Objective]  # (config, mesh, rules) -> objective
    # (config, global_batch_size) -> {feature: jax.ShapeDtypeStruct}: the feature spec of one batch as
    # the train iterator yields it (before `make_batch_transform`); parameters are initialised from it.
    example_batch: Callable[[Any, int], dict]
    # (config, DataContext) -> endless iterator of this process's rows of each global batch (numpy
    # dicts matching example_batch). Checkpointable when it has get_state()/set_state() (grain).
    make_train_data: Callable[[Any, DataContext], Iterator[dict]]
    # (config, DataContext, split or None) -> one ordered pass over an eval split (with a bool "mask").
    make_eval_data: Callable[[Any, DataContext, str | None], Iterable[dict]] | None = None
    make_evaluator: Callable[..., Evaluator] | None = None  # (config, mesh, rules) -> Evaluator
    describe_metrics: Callable[[Any], dict] | None = None  # config -> {name: MetricSpec} of the evaluator
    validate_config: Callable[[Any], None] = _no_checks  # raises ValueError naming the config key
    rng_streams: tuple[str, ...] = ("dropout",)  # drawn per step from (seed, step); see train/rng.py
    make_batch_transform: Callable[[Any], BatchTransform | None] | None = None  # config -> on-device transform
    apply_model: Callable[..., Any] = apply_model  # the forward inside the train step
    constrain_params: Callable[[Any], Any] = _identity  # applied after every update
    # params -> bool tree (True: decayed). None: the default by shape and role (train/optimizer.py).
    weight_decay_mask: Callable[[Any], Any] | None = None
    # The system's own config keys (or subtrees, globs) that may change when a run resumes because they
    # change nothing it computes, e.g. a data directory; every other change is refused (train/resume.py).
    resume_free_keys: tuple[str, ...] = ()


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
    from colearn_jax.models import clip_system, coca_system, imagebind_system, simclr_system  # noqa: F401,PLC0415
