"""Training-curve plots from `<workdir>/metrics.jsonl`: loss, learning rate and every eval metric.

Eval metrics are drawn as their `MetricSpec` describes them: fractions together on one panel in
percent (the axis fits the data, not a fixed 0-100), every other unit on a panel of its own, each
titled with its direction ("higher is better" / "lower is better").
"""
from __future__ import annotations

import os

from colearn_jax.train.metrics import read_metrics


def _eval_panels(eval_keys: list[str], specs: dict) -> list[tuple[str, list[str]]]:
    """[(title, keys)]: one panel for all fractions, one per other metric."""
    fractions, others = [], []
    for key in eval_keys:
        spec = specs.get(key[len("eval/"):])
        (fractions if spec is None or spec.is_fraction else others).append(key)
    panels = [("held-out (%)", fractions)] if fractions else []
    for key in others:
        spec = specs[key[len("eval/"):]]
        direction = "higher is better" if spec.higher_is_better else "lower is better"
        panels.append((f"{spec.name} ({spec.unit}; {direction})", [key]))
    return panels


def plot_metrics(workdir: str, out: str | None = None, specs: dict | None = None) -> str | None:
    """Writes a PNG of the run's curves (default `<workdir>/metrics.png`); returns its path."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(workdir)
    if not rows:
        return None
    specs = specs or {}

    def series(key, scale=1.0):
        pts = [(r["step"], r[key] * scale) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    panels = [("loss", ["train/loss"]), ("learning rate", ["train/lr"])] + _eval_panels(eval_keys, specs)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        percent = title.startswith("held-out")
        for key in keys:
            ax.plot(*series(key, 100.0 if percent else 1.0), marker="o" if key.startswith("eval/") else None,
                    label=key.split("/", 1)[1])
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or os.path.join(workdir, "metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
