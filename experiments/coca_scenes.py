"""CoCa on digit_scenes/scenes, and the paper's loss ablation at small scale (Yu et al. 2022, Sec. 3.1 Eq. 3
and Sec. 4.5 / Table 8a: captioning-only and contrastive-only against both losses):

  python experiments/coca_scenes.py --workdir=/tmp/coca_scenes \
      --out=experiments/results/coca_scenes.json --plot=experiments/results/coca_scenes.png

Four runs on a 2-core CPU, the same budget each; three of `configs/coca.py:scenes`:
  coca              lambda_con = 1, lambda_cap = 2 (the paper's and open_clip's weights);
  captioning_only   lambda_con = 0 (a captioner with CoCa's architecture: the contrastive path untrained);
  contrastive_only  lambda_cap = 0 (a CLIP with CoCa's towers: the decoder untrained);
and `configs/coca.py:scenes_tagged`:
  coca_tagged       coca + the auxiliary tagging loss on the scene's digits (not in the paper; declared).
Each is evaluated by the system's evaluator on the whole test split (1000 scenes of unseen handwriting) and on
test_heldout (1000 scenes, each with at least one colour-digit pair no training scene has): greedy captions'
CIDEr-D / BLEU-4 and the fraction naming every digit in the image correctly
(`captioning.classes_named_correctly`), and zero-shot digit classification through the contrastive path on
digit_scenes/single (test split). The PNG shows test and held-out scenes with the captions of `coca_tagged`
(or of `coca` when that run is not among --runs).
A run whose `result.json` is in --workdir is reused; an interrupted one resumes. `--runs=coca` runs one.
"""
from __future__ import annotations

import os
import sys
import textwrap

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_utils import evaluate, prepare_output, run_script, train_and_evaluate, write_json  # noqa: E402

RUNS = {"coca": dict(lambda_con=1.0, lambda_cap=2.0), "captioning_only": dict(lambda_con=0.0, lambda_cap=2.0),
        "contrastive_only": dict(lambda_con=1.0, lambda_cap=0.0), "coca_tagged": dict(preset="scenes_tagged")}
if __name__ == "__main__":
    flags.DEFINE_string("workdir", "/tmp/coca_scenes", "Root directory: one subdirectory per run.")
    flags.DEFINE_list("runs", list(RUNS), f"Which runs, of {list(RUNS)}.")
    flags.DEFINE_integer("steps", 0, "Override train.num_steps of every run (0: the preset's).")
    flags.DEFINE_string("out", "", "Write the results as JSON here.")
    flags.DEFINE_string("plot", "", "Write example scenes with the coca run's captions here (PNG).")
FLAGS = flags.FLAGS


def run_config(name: str):
    from colearn_jax.configs import coca  # noqa: PLC0415

    overrides = dict(RUNS[name])
    c = coca.get_config(overrides.pop("preset", "scenes"))
    c.unlock()
    c.loss.update(overrides)
    if FLAGS.steps:
        c.train.num_steps = FLAGS.steps
    c.train.progress_bar = False
    c.eval.caption_max_batches = 0  # the final evaluation captions the whole split
    return c


def heldout_config(config):
    """The same evaluator on test_heldout, captions only (zero-shot has its own data)."""
    c = config.copy_and_resolve_references()
    c.data.eval_split = "test_heldout"
    c.eval.zeroshot = False
    return c


def run(name: str, root: str) -> dict:
    config = run_config(name)
    heldout = lambda state: {f"heldout_{k}": v for k, v in evaluate(heldout_config(config), state.variables()).items()}  # noqa: E731
    return train_and_evaluate(config, os.path.join(root, name), extra_evals=heldout)


def run_and_report(name: str, root: str) -> dict:
    r = run(name, root)
    print(f"{name}: digits named {100 * r['caption_digits_correct']:.1f}% (held-out pairs "
          f"{100 * r['heldout_caption_digits_correct']:.1f}%), CIDEr-D {r['caption_cider_d']:.2f}, zero-shot "
          f"{100 * r['zeroshot_top1']:.1f}% ({r['train_wall_s'] / 60:.1f} min)", flush=True)
    return r


ROWS = (("captions naming every digit, test (%)", "caption_digits_correct", 100),
        ("captions naming every digit, held-out pairs (%)", "heldout_caption_digits_correct", 100),
        ("CIDEr-D, test", "caption_cider_d", 1), ("CIDEr-D, held-out pairs", "heldout_caption_cider_d", 1),
        ("BLEU-4, test (%)", "caption_bleu4", 100), ("caption = reference, test (%)", "caption_exact", 100),
        ("zero-shot digit top-1 on `single` (%)", "zeroshot_top1", 100))


def table(results: dict) -> str:
    names = [n for n in RUNS if n in results]
    head = {"coca": "CoCa (λ_con 1, λ_cap 2)", "captioning_only": "captioning only (λ_con 0)",
            "contrastive_only": "contrastive only (λ_cap 0)", "coca_tagged": "CoCa + tag loss (`scenes_tagged`)"}
    lines = ["| | " + " | ".join(head[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for label, key, scale in ROWS:
        cells = [f"{scale * results[n][key]:.{1 if scale == 100 else 2}f}" if key in results[n] else "—" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| training wall time (min) | " + " | ".join(f"{results[n]['train_wall_s'] / 60:.1f}" for n in names)
                 + " |")
    return "\n".join(lines)


def plot_examples(workdir: str, path: str, per_split: int = 6) -> str:
    """Test and held-out scenes with the run's greedy captions (green: every digit named) and references."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import colearn_jax  # noqa: PLC0415
    from colearn_jax.data.image_ops import CLIP_MEAN, CLIP_STD  # noqa: PLC0415
    from colearn_jax.evals import caption_eval, captioning  # noqa: PLC0415
    from colearn_jax.models import DataContext, clip_system  # noqa: PLC0415
    from colearn_jax.models.coca import decode_fns  # noqa: PLC0415

    model, variables, config = colearn_jax.load(workdir)
    tok = clip_system.tokenizer(config)
    names = list(config.eval.class_names)
    fig, axes = plt.subplots(2, per_split, figsize=(2.6 * per_split, 7.4))
    for row, split in enumerate(("test", "test_heldout")):
        c = config.copy_and_resolve_references()
        c.data.eval_split = split
        batch = next(iter(clip_system.make_eval_data(c, DataContext(seed=0))))
        images = np.asarray(batch["image"])[:per_split]
        refs = captioning.decode_generated(np.asarray(batch["text"])[:per_split], tok)
        hyps = caption_eval.caption_images(model, variables, images, config, tok, decode_fns, method="greedy")
        ok = captioning.classes_named_correctly(hyps, refs, names)
        for ax, image, hyp, ref, good in zip(axes[row], images, hyps, refs, ok):
            ax.imshow(np.clip(image * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN), 0, 1))
            ax.set_title("\n".join(textwrap.wrap(hyp, 30)[:3]), fontsize=7.5, color="green" if good else "red")
            ax.set_xlabel("\n".join(textwrap.wrap("ref: " + ref, 34)[:3]), fontsize=6.5, color="gray")
            ax.set_xticks([]), ax.set_yticks([])
        axes[row][0].set_ylabel({"test": "test", "test_heldout": "held-out pairs"}[split])
    fig.suptitle("CoCa on digit_scenes: greedy captions (green = every digit named) above, reference below",
                 fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(hspace=0.45)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv):
    del argv
    unknown = set(FLAGS.runs) - set(RUNS)
    if unknown:
        raise ValueError(f"--runs: unknown {sorted(unknown)}; choose from {list(RUNS)}.")
    root = os.path.abspath(FLAGS.workdir)
    results = run_script(lambda: {name: run_and_report(name, root) for name in FLAGS.runs})
    print(table(results))
    if FLAGS.out:
        write_json(FLAGS.out, results)
    shown = next((n for n in ("coca_tagged", "coca") if n in results), None)
    if FLAGS.plot and shown:
        prepare_output(FLAGS.plot)
        print("wrote", plot_examples(os.path.join(root, shown), FLAGS.plot))


if __name__ == "__main__":
    app.run(main)
