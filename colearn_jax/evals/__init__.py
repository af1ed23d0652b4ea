"""colearn_jax.evals: evaluators and the description of what they measure.

Every evaluator a system returns (`System.make_evaluator`) is a callable `(model, variables) ->
{name: float}` with a `metrics` attribute `{name: MetricSpec}`. Logs, `experiments/train.py`'s summary,
`experiments/evaluate.py` and the training-curve plot format each value from its spec (a fraction as
a percentage, anything else with its unit), and the best-checkpoint keeper reads `higher_is_better`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str = "fraction"  # "fraction" (0..1, shown as %) or a unit such as "nats", "BLEU", "ms"
    higher_is_better: bool = True
    description: str = ""

    @property
    def is_fraction(self) -> bool:
        return self.unit == "fraction"

    def format(self, value: float) -> str:
        if self.is_fraction:
            return f"{100 * value:.2f}%"
        return f"{value:.4g} {self.unit}".rstrip()


def describe(value: float, spec: MetricSpec | None) -> str:
    return spec.format(value) if spec is not None else f"{value:.4g}"


@dataclasses.dataclass
class DescribedEvaluator:
    """Wraps `fn(model, variables) -> {name: float}` with the specs of the names it returns."""

    fn: Callable
    metrics: dict

    def __call__(self, model, variables) -> dict:
        out = self.fn(model, variables)
        unknown = set(out) - set(self.metrics)
        if unknown:
            raise KeyError(f"evaluator returned metrics without a MetricSpec: {sorted(unknown)}")
        return out
