"""Training-curve plots from `<workdir>/metrics.jsonl`: loss, learning rate and every eval metric."""
from __future__ import annotations

import os

from colearn_jax.train.metrics import read_metrics


def plot_metrics(workdir: str, out: str | None = None) -> str | None:
    """Writes a PNG of the run's curves (default `<workdir>/metrics.png`); returns its path."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(workdir)
    if not rows:
        return None

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    panels = [("train/loss", "loss"), ("train/lr", "learning rate")] + ([("eval", "held-out")] if eval_keys else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        if key == "eval":
            for k in eval_keys:
                ax.plot(*series(k), marker="o", label=k[len("eval/"):])
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        else:
            ax.plot(*series(key))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or os.path.join(workdir, "metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
