"""ImageBind on `digit_modalities`: emergent zero-shot and cross-modal retrieval on the held-out test split
(300 digits whose handwriting training never saw), for four runs on a 2-core CPU (Girdhar et al. 2023:
binding through images, Sec. 3; emergent zero-shot classification and embedding arithmetic, Sec. 4-5):

  joint      `configs/imagebind.py:digits`: every tower trained from scratch, each modality paired only
             with images (text joins the image pairs, since there is no pretrained CLIP); the image tower
             is *not* frozen.
  from_clip  the paper's recipe: a CLIP with ImageBind's image/text tower sizes is trained on
             digits_captions (`configs/clip.py:digits` resized by `imagebind_system.clip_config_for`),
             inflated into an ImageBind checkpoint (`inflate_clip`), and `digits,from_clip=<it>` binds
             audio / depth / thermal / IMU to its *frozen* image tower.
  from_clip_unfrozen  the same start, but the image tower trains too (the text tower stays frozen and
             unpaired).
  from_clip_paired  `from_clip` on the paper's kind of data: one dataset per modality, each giving images
             and that modality only (`,paired_datasets`: the other pairs' losses mask its rows out).

Audio, depth, thermal and IMU are never paired with text, nor with each other: their zero-shot accuracy
from text prompts ("the sound of the digit seven") and the audio<->depth / IMU<->audio retrieval are
emergent. The modalities of one example share only the digit's identity (a different "recording" of the
same class), so instance recall@1 between two non-image modalities cannot exceed ~1/30 on the 300 test
examples (30 per class): class precision@1 (is the nearest neighbour the same digit?) is the measure
that can show alignment, and both are reported.

  python experiments/imagebind_digits.py --workdir=/tmp/imagebind_digits \
      --out=experiments/results/imagebind_digits.json --plot=experiments/results/imagebind_digits.png

A run whose `result.json` is already in --workdir is reused (with the wall time it recorded); an
interrupted one resumes. `--runs=joint` runs one of them.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RUNS = ("joint", "from_clip", "from_clip_unfrozen", "from_clip_paired")
if __name__ == "__main__":
    flags.DEFINE_string("workdir", "/tmp/imagebind_digits", "Root directory: one subdirectory per run.")
    flags.DEFINE_list("runs", list(RUNS), f"Which runs, of {RUNS}.")
    flags.DEFINE_integer("steps", 0, "Override train.num_steps of every ImageBind run (0: the preset's).")
    flags.DEFINE_integer("clip_steps", 0, "Override the CLIP run's train.num_steps (0: the preset's).")
    flags.DEFINE_string("out", "", "Write the results as JSON here.")
    flags.DEFINE_string("plot", "", "Write a bar chart of the zero-shot accuracies here (PNG).")
FLAGS = flags.FLAGS

MODALITIES = ("image", "audio", "depth", "thermal", "imu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_utils import prepare_output, run_script, train_and_evaluate, write_json  # noqa: E402


def _ib_config(arg: str):
    from colearn_jax.configs import imagebind  # noqa: PLC0415

    c = imagebind.get_config(arg)
    c.unlock()
    if FLAGS.steps:
        c.train.num_steps = FLAGS.steps
    c.train.progress_bar = False
    return c


def run_joint(root: str) -> dict:
    return train_and_evaluate(_ib_config("digits"), os.path.join(root, "joint"))


def _clip_start(root: str, ib) -> tuple[str, dict]:
    """Trains the CLIP with `ib`'s image/text sizes (once) and inflates it into an ImageBind checkpoint."""
    from colearn_jax.configs import clip  # noqa: PLC0415
    from colearn_jax.models.imagebind_system import clip_config_for, inflate_clip  # noqa: PLC0415

    clip_cfg = clip.get_config("digits")
    clip_cfg.unlock()
    clip_config_for(ib, clip_cfg)
    if FLAGS.clip_steps:
        clip_cfg.train.num_steps = FLAGS.clip_steps
    clip_cfg.train.progress_bar = False
    clip_result = train_and_evaluate(clip_cfg, os.path.join(root, "clip"))
    print(f"CLIP (image/text towers for from_clip): zero-shot {100 * clip_result['zeroshot_top1']:.1f}% "
          f"in {clip_result['train_wall_s'] / 60:.1f} min", flush=True)
    inflated = os.path.join(root, "clip_inflated")
    if not os.path.isdir(inflated):
        inflate_clip(os.path.join(root, "clip"), ib, inflated)
    return inflated, clip_result


def run_from_clip(root: str, frozen_image: bool = True, paired: bool = False) -> dict:
    inflated, clip_result = _clip_start(root, _ib_config("digits"))
    config = _ib_config(f"digits,from_clip={inflated}" + (",paired_datasets" if paired else ""))
    if not frozen_image:
        config.optim.groups = [{"pattern": r"^text/|^text_logit_scale$", "frozen": True}]
    name = "from_clip" + ("" if frozen_image else "_unfrozen") + ("_paired" if paired else "")
    return {**train_and_evaluate(config, os.path.join(root, name)), "clip": clip_result}


def table(results: dict) -> str:
    """Markdown: one column per run."""
    names = [n for n in RUNS if n in results]
    head = {"joint": "joint, from scratch", "from_clip": "from CLIP, image+text frozen",
            "from_clip_unfrozen": "from CLIP, image tower trained",
            "from_clip_paired": "from CLIP, frozen, one dataset per modality"}
    rows = [("zero-shot " + m, f"zeroshot_{m}_top1") for m in MODALITIES]
    rows += [("audio->depth R@1 (1 / 30 = 3.3 if only the class is found)", "audio2depth_r1"), ("audio->depth class P@1", "audio2depth_class_p1"),
             ("depth->audio class P@1", "depth2audio_class_p1"), ("imu->audio class P@1", "imu2audio_class_p1"),
             ("audio+depth -> image top-1", "audio+depth_to_image_top1"),
             ("thermal+imu -> image top-1", "thermal+imu_to_image_top1")]
    lines = ["| test split (300 unseen digits), % | " + " | ".join(head[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(f"{100 * results[n][key]:.1f}" for n in names) + " |")
    lines.append("| training wall time (min) | " + " | ".join(
        f"{results[n]['train_wall_s'] / 60:.1f}" + (f" (+{results[n]['clip']['train_wall_s'] / 60:.1f} CLIP)"
                                                     if "clip" in results[n] else "") for n in names) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> str:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    names = [n for n in RUNS if n in results]
    x = np.arange(len(MODALITIES))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [100 * results[n][f"zeroshot_{m}_top1"] for m in MODALITIES]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=n)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.axhline(10, color="gray", linestyle=":", label="chance")
    ax.set_xticks(x, [m if m == "image" else f"{m}\n(emergent)" for m in MODALITIES])
    ax.set_ylabel("zero-shot top-1 from text prompts (%)")
    ax.set_ylim(0, 105)
    ax.set_title("ImageBind on digit_modalities (test split), 2-core CPU")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(names) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv):
    del argv
    run_script(_main)


def _main():
    unknown = set(FLAGS.runs) - set(RUNS)
    if unknown:
        raise ValueError(f"--runs: unknown {sorted(unknown)}; choose from {RUNS}.")
    root = os.path.abspath(FLAGS.workdir)
    results = {}
    for name in FLAGS.runs:
        run = {"joint": run_joint, "from_clip": run_from_clip,
               "from_clip_unfrozen": lambda r: run_from_clip(r, frozen_image=False),
               "from_clip_paired": lambda r: run_from_clip(r, paired=True)}[name]
        results[name] = run(root)
        print(f"{name}: " + ", ".join(f"{m} {100 * results[name][f'zeroshot_{m}_top1']:.1f}%" for m in MODALITIES)
              + f" ({results[name]['train_wall_s'] / 60:.1f} min)", flush=True)
    print(table(results))
    if FLAGS.out:
        write_json(FLAGS.out, results)
    if FLAGS.plot:
        prepare_output(FLAGS.plot)
        print("wrote", plot(results, FLAGS.plot))


if __name__ == "__main__":
    app.run(main)
