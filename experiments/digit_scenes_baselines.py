"""Baselines and an example grid for the `digit_scenes` dataset (colearn_jax/data/digit_scenes.py).

  python experiments/digit_scenes_baselines.py --out=/tmp/digit_scenes_baselines.json
  python experiments/digit_scenes_baselines.py --time_build \
      --grid=experiments/results/digit_scenes_examples.png \
      --out=experiments/results/digit_scenes_baselines.json      # the README's figures
  python experiments/digit_scenes_baselines.py --nobaselines --grid=/tmp/scenes.png   # grid only

Reports, as a table and as JSON (`--out`):
  * build time of each config at its default size (`--time_build`: wall and CPU seconds of a
    fresh build, into --data_dir if it lacks the config, else into a temporary directory);
  * a linear classifier (sklearn LogisticRegression, C picked on validation) on raw pixels of
    `single`, top-1 on validation / test / test_heldout - the dataset is meant to make this weak -
    next to the same classifier on the raw 8x8 pixels of the source digits (digits_captions'
    split), which is what made the old dataset too easy;
  * majority-answer baselines for the `scenes` QA pairs, fitted on train: one answer for
    everything, and the most frequent answer per question type; accuracy overall and per type.
`--grid` writes a PNG of test scenes with their boxes, captions and a question each.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time
import warnings

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from colearn_jax.data import digit_scenes as D  # noqa: E402
from colearn_jax.data import scene_render as R  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR, else "
                    "~/tensorflow_datasets).")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
flags.DEFINE_string("grid", None, "Write a PNG grid of example scenes here.")
flags.DEFINE_integer("grid_rows", 3, "Rows of the example grid (4 scenes a row).")
flags.DEFINE_bool("time_build", False, "Time a fresh default-size build of each config.")
flags.DEFINE_bool("baselines", True, "Fit the baselines; --nobaselines: only --grid, --time_build.")
flags.DEFINE_list("probe_c", ["0.01", "1.0"], "LogisticRegression C values tried on validation.")
flags.DEFINE_integer("probe_max_iter", 200, "LogisticRegression iterations.")
flags.DEFINE_integer("threads", 1, "BLAS threads for scikit-learn (more can be far slower on a "
                     "busy machine).")


def time_builds(data_dir: str | None) -> dict:
    """Wall and CPU seconds of a default-size build of each config: into `data_dir` when it lacks
    the config, else into a temporary directory."""
    out = {}
    for name in D.CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            target = data_dir or D.default_data_dir()
            if os.path.exists(os.path.join(target, D.NAME, name)):
                target = tmp
            wall, cpu = time.time(), time.process_time()
            D.ensure_built(target, name)
            out[name] = {"wall_s": time.time() - wall, "cpu_s": time.process_time() - cpu,
                         "examples": sum(getattr(D.CONFIGS[name], f"num_{s}") for s in D.SPLITS)}
    return out


def load(config: str, split: str, data_dir: str | None) -> list[dict]:
    source = D.data_source(split, data_dir, config)
    return [source[i] for i in range(len(source))]


def linear_probe(data: dict[str, list[dict]], cs=(0.01, 1.0), max_iter: int = 200) -> dict:
    """LogisticRegression on raw pixels (scaled to [0, 1]) of `single`; C chosen on validation."""
    from sklearn.exceptions import ConvergenceWarning  # pylint: disable=import-outside-toplevel
    from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

    xy = {s: (np.stack([ex["image"].reshape(-1) for ex in exs]).astype(np.float32) / 255.0,
              np.asarray([ex["label"] for ex in exs])) for s, exs in data.items()}
    best = None
    for c in cs:
        with warnings.catch_warnings():  # stops at max_iter, having fit train (train_top1)
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=c, max_iter=max_iter).fit(*xy["train"])
        val = clf.score(*xy["validation"])
        if best is None or val > best[0]:
            best = (val, c, clf)
    _, c, clf = best
    result = {"C": c, "train_size": len(xy["train"][1]), "features": int(xy["train"][0].shape[1])}
    result.update({f"{s}_top1": float(clf.score(*xy[s])) for s in xy})
    result["majority_class_test_top1"] = float(
        np.mean(xy["test"][1] == np.bincount(xy["train"][1]).argmax()))
    return result


def source_digits_probe() -> dict:
    """The same classifier on the raw 8x8 source digits with digits_captions' train/test split."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

    from colearn_jax.data import digits  # pylint: disable=import-outside-toplevel

    src = load_digits()
    x, y = src.images.reshape(len(src.images), -1) / 16.0, src.target
    train, test = digits.split_indices(y)
    clf = LogisticRegression(max_iter=1000).fit(x[train], y[train])
    return {"test_top1": float(clf.score(x[test], y[test])), "features": int(x.shape[1])}


def _qa(examples: list[dict]):
    """(question type name, answer) pairs of every real question."""
    return [(D.QUESTION_TYPES[t], a.decode()) for ex in examples
            for t, a, ok in zip(ex["question_types"], ex["answers"], ex["question_mask"]) if ok]


def qa_majority(data: dict[str, list[dict]]) -> dict:
    train = _qa(data["train"])
    overall = collections.Counter(a for _, a in train).most_common(1)[0][0]
    per_type = {t: collections.Counter(a for tt, a in train if tt == t).most_common(1)[0][0]
                for t in D.QUESTION_TYPES}
    result = {"train_questions": len(train), "majority_answer": overall,
              "majority_answer_per_type": per_type}
    for split in ("validation", "test", "test_heldout"):
        qa = _qa(data[split])
        hit_all = [a == overall for _, a in qa]
        hit_type = [a == per_type[t] for t, a in qa]
        result[split] = {
            "questions": len(qa),
            "global_majority": float(np.mean(hit_all)),
            "per_type_majority": float(np.mean(hit_type)),
            "per_type": {t: {"count": sum(tt == t for tt, _ in qa),
                             "accuracy": float(np.mean([h for (tt, _), h in zip(qa, hit_type)
                                                        if tt == t]))}
                         for t in D.QUESTION_TYPES},
        }
    return result


def stats(data: dict[str, list[dict]]) -> dict:
    return {s: {"examples": len(exs),
                "mean_digits": float(np.mean([ex["num_digits"] for ex in exs])),
                "max_caption_chars": max(len(c) for ex in exs for c in ex["captions"]),
                "mean_questions": float(np.mean([ex["question_mask"].sum() for ex in exs])),
                "mean_valid_proposals": float(np.mean([ex["proposal_mask"].sum() for ex in exs]))}
            for s, exs in data.items()}


def write_grid(examples: list[dict], path: str, rows: int) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import textwrap  # pylint: disable=import-outside-toplevel

    cols = 4
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 4.3))
    for ax, ex in zip(np.ravel(axes), examples):
        size = ex["image"].shape[0]
        ax.imshow(ex["image"], interpolation="nearest")
        for box, ok, colour in zip(ex["boxes"], ex["box_mask"], ex["box_colours"]):
            if ok:
                x1, y1, x2, y2 = box * size - 0.5
                edge = np.asarray(R.COLOURS[D.COLOUR_NAMES[colour]]) / 255.0
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2,
                                           ec=edge, ls="--"))
        q = int(np.flatnonzero(ex["question_mask"])[-1])
        text = [ex["captions"][0].decode(), ex["captions"][1].decode(),
                f"Q: {ex['questions'][q].decode()}  A: {ex['answers'][q].decode()}"]
        ax.set_title("\n".join(textwrap.fill(t, 34) for t in text), fontsize=7, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv):
    del argv
    from threadpoolctl import threadpool_limits  # pylint: disable=import-outside-toplevel

    with threadpool_limits(FLAGS.threads):
        run()


def run():
    results = {}
    if FLAGS.time_build:
        results["build"] = time_builds(FLAGS.data_dir)
    if not FLAGS.baselines:
        if FLAGS.grid:
            write_grid(load("scenes", "test", FLAGS.data_dir)[: 4 * FLAGS.grid_rows], FLAGS.grid,
                       FLAGS.grid_rows)
        print(json.dumps(results, indent=1))
        return
    data = {c: {s: load(c, s, FLAGS.data_dir) for s in D.SPLITS} for c in D.CONFIGS}
    results["stats"] = {c: stats(d) for c, d in data.items()}
    results["linear_probe_single"] = linear_probe(
        data["single"], [float(c) for c in FLAGS.probe_c], FLAGS.probe_max_iter)
    results["linear_probe_source_digits"] = source_digits_probe()
    results["qa_majority_scenes"] = qa_majority(data["scenes"])

    print("\n== digit_scenes baselines ==")
    for name, b in results.get("build", {}).items():
        print(f"build {name:7s} {b['examples']} examples: {b['wall_s']:.1f} s wall, "
              f"{b['cpu_s']:.1f} s CPU")
    lp = results["linear_probe_single"]
    print(f"\nlinear classifier on raw pixels ({lp['features']} features, {lp['train_size']} "
          f"train, C={lp['C']}), top-1:")
    print(f"  single   train {lp['train_top1']:.3f}  validation {lp['validation_top1']:.3f}  "
          f"test {lp['test_top1']:.3f}  test_heldout {lp['test_heldout_top1']:.3f}  "
          f"(majority class {lp['majority_class_test_top1']:.3f}, chance 0.100)")
    print(f"  source 8x8 digits (digits_captions split) test "
          f"{results['linear_probe_source_digits']['test_top1']:.3f}")
    qa = results["qa_majority_scenes"]
    print(f"\nQA majority baselines on scenes (fit on {qa['train_questions']} train questions; "
          f"global majority answer {qa['majority_answer']!r}):")
    header = f"  {'type':9s} {'answer':8s}" + "".join(f" {s:>22s}" for s in
                                                   ("validation", "test", "test_heldout"))
    print(header)
    for t in D.QUESTION_TYPES + ("all",):
        answer = qa["majority_answer_per_type"].get(t, "")
        cells = []
        for s in ("validation", "test", "test_heldout"):
            r = qa[s]
            if t == "all":
                cells.append(f"{r['per_type_majority']:.3f} (glob {r['global_majority']:.3f})")
            else:
                cells.append(f"{r['per_type'][t]['accuracy']:.3f} (n={r['per_type'][t]['count']})")
        print(f"  {t:9s} {answer:8s}" + "".join(f" {c:>22s}" for c in cells))
    if FLAGS.grid:
        write_grid(data["scenes"]["test"][: 4 * FLAGS.grid_rows], FLAGS.grid, FLAGS.grid_rows)
        print(f"\nexample grid: {FLAGS.grid}")
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results: {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
