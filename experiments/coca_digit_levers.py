"""python experiments/coca_digit_levers.py --config=configs/coca.py:scenes --config.loss.lambda_tag=4.0 --steps=1000 --out=/tmp/lever.json

Quick lever study for CoCa on digit_scenes/scenes: trains a `configs/coca.py` preset with `--config.<key>`
overrides (ml_collections config flags) for `--steps` steps (the cosine schedule ends there) and, every `--every`
steps, measures how well the captioner *reads the digits* with teacher forcing, which needs no decoding:
at every caption position whose next word is a digit name (not the "one/two/three digits:" count word),
is the argmax over the ten digit words the right one? Reported on 500 validation scenes (unseen
handwriting) and 500 training scenes: per digit (`*_digit`) and per caption, every digit right (`*_all`,
the teacher-forced analogue of the evaluator's `caption_digits_correct`). One 1000-step run takes 5-8 minutes
on a 2-core CPU, a third of a full preset run, so levers can be compared before a full run
(experiments/coca_scenes.py gives the real figures: greedy captions of the whole test split).

`--checkpoint=<workdir>` trains nothing: it measures a finished run's checkpoint the same way (its own
config), e.g. the train-validation gap at the end of a full run:
  python experiments/coca_digit_levers.py --checkpoint=/tmp/coca_scenes/coca_tagged --examples=1000
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

if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(ROOT, "configs/coca.py:scenes"), "A configs/coca.py preset; --config.<key>=<value> overrides.")
    flags.DEFINE_integer("steps", 1000, "Training steps (train.num_steps: the schedule ends there).")
    flags.DEFINE_integer("every", 250, "Measure every this many steps.")
    flags.DEFINE_integer("examples", 500, "Scenes per measured split.")
    flags.DEFINE_string("out", "", "Write the curve as JSON here.")
    flags.DEFINE_string("checkpoint", "", "Measure this workdir's latest checkpoint instead of training.")
FLAGS = flags.FLAGS


def digit_reading(logits, text, digit_ids, start_id):
    """(per-digit accuracy, fraction of captions with every digit right) under teacher forcing."""
    import numpy as np  # noqa: PLC0415

    targets, previous = text[:, 1:], text[:, :-1]
    is_digit = np.isin(targets, digit_ids) & (previous != start_id)  # not the count word after the start token
    lookup = {int(t): i for i, t in enumerate(digit_ids)}
    truth = np.vectorize(lambda t: lookup.get(int(t), -1))(targets)
    guess = logits[..., digit_ids].argmax(-1)
    right = (guess == truth) & is_digit
    return right.sum() / max(is_digit.sum(), 1), (right | ~is_digit).all(1).mean()


def main(argv):
    del argv
    from colearn_jax import host_memory  # noqa: PLC0415

    host_memory.configure_allocator()
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from colearn_jax.models import DataContext, clip_system  # noqa: PLC0415
    from colearn_jax.train.program import TrainProgram  # noqa: PLC0415

    if FLAGS.checkpoint:
        import colearn_jax  # noqa: PLC0415

        model, variables, config = colearn_jax.load(FLAGS.checkpoint)
        program = None
    else:
        config = _CONFIG.value
        config.unlock()
        config.train.num_steps = FLAGS.steps
        program = TrainProgram.build(config)
        model = program.model
    tok = clip_system.tokenizer(config)
    length = config.data.context_length
    encode = lambda word: [int(t) for t in np.asarray(tok([word], length)[0]) if t]  # noqa: E731
    start_id = encode("")[0]
    digit_ids = np.array([encode(name)[1] for name in config.eval.class_names])
    ctx = DataContext(seed=config.seed)

    def collect(split):
        rows = []
        for batch in clip_system.make_eval_data(config, ctx, split):
            rows.append({k: np.asarray(batch[k]) for k in ("image", "text")})
            if sum(len(r["text"]) for r in rows) >= FLAGS.examples:
                break
        return {k: np.concatenate([r[k] for r in rows])[:FLAGS.examples] for k in ("image", "text")}

    splits = {"val": collect("validation"), "train": collect("train")}
    logits_fn = jax.jit(lambda params, images, text: model.apply(
        {"params": params}, {"image": images, "text": text})["logits"])

    def measure(params, data):
        parts = [digit_reading(np.asarray(logits_fn(params, data["image"][i:i + 100], data["text"][i:i + 100])),
                               data["text"][i:i + 100], digit_ids, start_id) for i in range(0, len(data["text"]), 100)]
        return tuple(float(np.mean(p)) for p in zip(*parts))

    if program is None:
        record = {"checkpoint": FLAGS.checkpoint}
        for name, data in splits.items():
            digit, every = measure(variables["params"], data)
            record.update({f"{name}_digit": round(digit, 3), f"{name}_all": round(every, 3)})
        print(record, flush=True)
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump({"config": config.to_dict(), "checkpoint": record}, f, indent=1, default=str)
        return
    state = program.init_state()
    train_data = program.system.make_train_data(config, ctx)
    curve, t0 = [], time.time()
    for step in range(1, FLAGS.steps + 1):
        state, metrics = program.step(state, program.place_batch(next(train_data)))
        if step % FLAGS.every == 0 or step == FLAGS.steps:
            metrics = jax.device_get(metrics)
            record = {"step": step, "wall_s": round(time.time() - t0), "caption_loss": float(metrics["caption_loss"])}
            if "tag_loss" in metrics:
                record["tag_loss"] = float(metrics["tag_loss"])
            for name, data in splits.items():
                digit, every = measure(state.params, data)
                record.update({f"{name}_digit": round(digit, 3), f"{name}_all": round(every, 3)})
            curve.append(record)
            print(record, flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"config": config.to_dict(), "steps": FLAGS.steps, "curve": curve}, f, indent=1, default=str)
        print("wrote", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
