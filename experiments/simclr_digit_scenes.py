"""SimCLR on digit_scenes/single: pretrain on CPU, then linear-probe and k-NN top-1 on the test split for
(a) SimCLR, (b) the same encoder at random initialisation, (c) raw pixels; and the paper's augmentation
ablation (Chen et al. 2020, Sec. 3.1, Fig. 5: crop + colour vs crop only vs colour only) at this scale.

  python experiments/simclr_digit_scenes.py --workdir=/tmp/simclr_digit_scenes \
      --out=experiments/results/simclr_digit_scenes.json --plot=experiments/results/simclr_digit_scenes.png
  python experiments/simclr_digit_scenes.py --ablation --workdir=/tmp/simclr_ablation \
      --config.train.num_steps=250 --out=experiments/results/simclr_ablation.json

The first command trains `configs/simclr.py:digit_scenes` into --workdir (resuming or skipping what is
already there; the wall time of the training is recorded when this script ran it), evaluates the final
parameters and both baselines with the system's own evaluator (features extracted on the mesh, the optax
linear probe with its L2 penalty picked on a held-out tenth of the *train* features, weighted 20-NN with
T = 0.07), and writes a JSON and a PNG of the training curves with the baselines drawn in. Raw pixels
are probed at the dataset's native 64 px (12288 features). `--ablation` trains one run per augmentation
variant (`--variants`) with the same config and budget, and tabulates their final probes.
Any `--config.*` override applies to every run.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {  # name -> augment overrides (the rest of config.augment stays as configured)
    "crop+colour": dict(crop=True, color=True),
    "crop only": dict(crop=True, color=False),
    "colour only": dict(crop=False, color=True),
    "none (flip only)": dict(crop=False, color=False),
}

if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(ROOT, "configs/simclr.py:digit_scenes"), "SimCLR config.", lock_config=True)
    flags.DEFINE_string("workdir", "/tmp/simclr_digit_scenes", "Run directory (--ablation: one subdirectory each).")
    flags.DEFINE_string("out", "", "Write the results as JSON here.")
    flags.DEFINE_string("plot", "", "Write the training curves (with the baselines) as a PNG here.")
    flags.DEFINE_bool("ablation", False, "Run the augmentation ablation instead.")
    flags.DEFINE_list("variants", list(VARIANTS), "Ablation variants.")
    flags.DEFINE_bool("baselines", True, "Also evaluate the random-init encoder and raw pixels.")
FLAGS = flags.FLAGS


def evaluate(config, variables=None, seed: int | None = None) -> dict:
    """The system's evaluator on `variables` (None: the model freshly initialised with `seed`)."""
    from colearn_jax.train.program import TrainProgram  # noqa: PLC0415

    program = TrainProgram.build(config)
    if variables is None:
        variables = program.init_state(seed).variables()
    evaluator = program.system.make_evaluator(config, program.mesh, program.rules)
    t0 = time.time()
    out = evaluator(program.model, variables)
    return {**out, "eval_s": time.time() - t0}


def raw_pixel_metrics(config, image_size: int = 64) -> dict:
    """Linear probe and k-NN on flattened pixels in [0, 1] at `image_size` (the dataset's native 64 px)."""
    import numpy as np  # noqa: PLC0415

    from colearn_jax.evals.simclr_eval import representation_metrics  # noqa: PLC0415
    from colearn_jax.models import DataContext  # noqa: PLC0415
    from colearn_jax.models.simclr_system import make_eval_data  # noqa: PLC0415

    config = config.copy_and_resolve_references()
    config.data.image_size = image_size
    ctx = DataContext(seed=config.seed)

    def load(split):
        xs, ys = [], []
        for b in make_eval_data(config, ctx, split):
            keep = np.asarray(b["mask"], bool)
            xs.append(np.asarray(b["image"], np.float32).reshape(len(keep), -1)[keep] / 255.0)
            ys.append(np.asarray(b["label"])[keep])
        return np.concatenate(xs), np.concatenate(ys)

    t0 = time.time()
    out = representation_metrics(config, load(config.eval.probe_split), load(config.data.eval_split))
    return {**out, "features": image_size * image_size * 3, "eval_s": time.time() - t0}


def train(config, workdir: str) -> dict:
    """Trains (or resumes) `config` in `workdir`; returns the final variables and this call's wall time."""
    from colearn_jax.train import loop  # noqa: PLC0415

    from colearn_jax.train.stop import stop_requested  # noqa: PLC0415

    t0 = time.time()
    state = loop.train(config, workdir)
    if stop_requested():  # loop.train saved and returned early: end the script, not only this run
        raise SystemExit(f"Stopped by a signal; {workdir} keeps its checkpoint: run the same command to resume.")
    return {"variables": state.variables(), "wall_s": time.time() - t0}


def _curves(workdir: str) -> dict:
    from colearn_jax.train.metrics import read_metrics  # noqa: PLC0415

    rows = read_metrics(workdir)
    pick = lambda key: [(r["step"], r[key]) for r in rows if key in r]  # noqa: E731
    return {k: pick(k) for k in ("train/loss", "train/contrast_acc", "eval/linear_top1", "eval/knn_top1")}


def plot(result: dict, path: str) -> str:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    curves = result["curves"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(*zip(*curves["train/loss"]), color="C0")
    axes[0].set_title("NT-Xent loss (train)")
    axes[1].plot(*zip(*[(s, 100 * v) for s, v in curves["train/contrast_acc"]]), color="C0")
    axes[1].set_title(f"contrastive top-1 in the batch (%) (1 of {2 * result['batch_size'] - 1})")
    for ax_i, (key, name) in enumerate([("linear_top1", "linear probe"), ("knn_top1", "20-NN")]):
        ax = axes[2]
        pts = curves[f"eval/{key}"]
        ax.plot([s for s, _ in pts], [100 * v for _, v in pts], marker="o", color=f"C{ax_i}", label=f"SimCLR {name}")
        for j, (base, style) in enumerate([("random_init", "--"), ("raw_pixels", ":")]):
            if base in result:
                ax.axhline(100 * result[base][key], color=f"C{ax_i}", linestyle=style, alpha=0.7,
                           label=f"{base.replace('_', ' ')} {name}")
    axes[2].axhline(10, color="gray", linewidth=0.8, label="chance")
    axes[2].set_title("test top-1 (%)")
    axes[2].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"SimCLR on digit_scenes/single, 2-core CPU, {result['train_wall_s'] / 60:.1f} min of training"
                 if result.get("train_wall_s") else "SimCLR on digit_scenes/single")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(r: dict) -> str:
    return f"linear {100 * r['linear_top1']:.1f}%  k-NN {100 * r['knn_top1']:.1f}%"


def run_main(config) -> dict:
    workdir = os.path.abspath(FLAGS.workdir)
    trained = train(config, workdir)
    result = {"config": config.to_dict(), "batch_size": config.data.batch_size, "steps": config.train.num_steps,
              "train_wall_s": trained["wall_s"], "simclr": evaluate(config, trained["variables"])}
    print(f"(a) SimCLR:        {_fmt(result['simclr'])}  ({trained['wall_s'] / 60:.1f} min this call)", flush=True)
    if FLAGS.baselines:
        result["random_init"] = evaluate(config, seed=config.seed)
        print(f"(b) random init:   {_fmt(result['random_init'])}", flush=True)
        result["raw_pixels"] = raw_pixel_metrics(config)
        print(f"(c) raw pixels:    {_fmt(result['raw_pixels'])}", flush=True)
    result["curves"] = _curves(workdir)
    return result


def run_ablation(config) -> dict:
    rows = {}
    for name in FLAGS.variants:
        c = config.copy_and_resolve_references()
        c.augment.update(VARIANTS[name])
        c.train.eval_every = 0  # only the final evaluation below
        workdir = os.path.join(os.path.abspath(FLAGS.workdir), name.replace(" ", "_").replace("+", "_").strip("()"))
        trained = train(c, workdir)
        rows[name] = {**evaluate(c, trained["variables"]), "train_wall_s": trained["wall_s"],
                      "final_loss": _curves(workdir)["train/loss"][-1][1]}
        print(f"{name:18s} {_fmt(rows[name])}", flush=True)
    return {"config": config.to_dict(), "steps": config.train.num_steps, "variants": rows}


def main(argv):
    del argv
    from colearn_jax import host_memory  # noqa: PLC0415

    host_memory.configure_allocator()
    from colearn_jax.train.stop import GracefulStop  # noqa: PLC0415

    config = _CONFIG.value
    with GracefulStop():  # held across the runs, so a signal ends the script after the current run saves
        result = run_ablation(config) if FLAGS.ablation else run_main(config)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print("wrote", FLAGS.out)
    if FLAGS.plot and not FLAGS.ablation:
        print("wrote", plot(result, FLAGS.plot))


if __name__ == "__main__":
    app.run(main)
