"""python experiments/digit_readout_control.py --out=experiments/results/digit_readout_control.json

Supervised control for the digit-scenes captioners: how fast does the `configs/coca.py:scenes` image encoder
(ViT, 64 px, patch 8, width 96, 4 layers; `--stem` conv or patch) learn *digit identity* on
`digit_scenes/single` when the label is given directly, read out through different heads? It separates "the
encoder cannot learn the digit in the budget" from "the objective's path to the encoder is slow" (CoCa, Yu et
al. 2022, Sec. 3.2: attentional poolers feed a multimodal decoder that cross-attends to them).

Readouts (`--readouts`), each trained from scratch with the label's cross-entropy:
  gap              mean of the ViT tokens -> linear (a plain classifier)
  attn_pool        a 1-query attentional pooler (`nn/pooling.py`) -> linear
  pooler_mean      CoCa's 16-query pooler, the mean of queries 1.. -> linear
  decoder          CoCa's captioning path: the 16-query pooler + ln_post (open_clip layout, queries 1..) as
                   memory, a 2-layer `MultimodalDecoder` (causal self-attention, cross-attention, CLIP
                   init) reading it from one learned input token, its 10 logits
  decoder_tokens   the same decoder reading the ViT tokens (linearly mapped to its width) without a pooler
Same data (5000 train scenes, 1000 test scenes of unseen handwriting), batch 64, AdamW (lr 2e-3, b2 0.98,
wd 0.1, 100 warm-up steps, cosine), global-norm clip 1, no augmentation; test top-1 every quarter of `--steps`.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

READOUTS = ("gap", "attn_pool", "pooler_mean", "decoder", "decoder_tokens")
if __name__ == "__main__":
    flags.DEFINE_list("readouts", list(READOUTS), f"Which readouts, of {READOUTS}.")
    flags.DEFINE_integer("steps", 400, "Training steps per readout.")
    flags.DEFINE_enum("stem", "conv", ["conv", "patch"], "The ViT's stem.")
    flags.DEFINE_float("lr", 2e-3, "Peak AdamW learning rate.")
    flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS


def load(split: str):
    import numpy as np  # noqa: PLC0415

    from colearn_jax.data import digit_scenes  # noqa: PLC0415
    from colearn_jax.data.image_ops import normalize  # noqa: PLC0415

    src = digit_scenes.data_source(split, config="single")
    examples = [src[i] for i in range(len(src))]
    return normalize(np.stack([e["image"] for e in examples])), np.array([e["label"] for e in examples])


def make_model(readout: str, stem: str):
    import flax.linen as nn  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from colearn_jax.models.coca import MultimodalDecoder  # noqa: PLC0415
    from colearn_jax.nn import layers  # noqa: PLC0415
    from colearn_jax.nn.pooling import AttentionalPooler  # noqa: PLC0415
    from colearn_jax.nn.vit import VisionTransformer  # noqa: PLC0415

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, images):
            tokens = VisionTransformer(image_size=64, patch_size=8, width=96, num_layers=4, num_heads=4,
                                       pool="none", stem=stem)(images)["tokens"]
            if readout == "gap":
                return nn.Dense(10)(tokens[:, 1:].mean(1))
            if readout == "attn_pool":
                return nn.Dense(10)(AttentionalPooler(1, 4, 64)(tokens)[:, 0])
            if readout == "pooler_mean":
                return nn.Dense(10)(AttentionalPooler(16, 4, 64)(tokens)[:, 1:].mean(1))
            if readout == "decoder":
                memory = layers.LayerNorm(1e-5)(AttentionalPooler(16, 4, 64)(tokens))[:, 1:]
            else:
                memory = nn.Dense(64)(tokens)
            query = self.param("query", nn.initializers.normal(0.02), (1, 64))
            start = jnp.broadcast_to(query, (tokens.shape[0], 1, 64))
            return MultimodalDecoder(vocab_size=10, width=64, num_layers=2, num_heads=4)(start, memory)[:, 0]

    return Classifier()


def run(readout: str, data) -> dict:
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    (train_x, train_y), (test_x, test_y) = data
    model = make_model(readout, FLAGS.stem)
    params = nn.unbox(model.init(jax.random.key(0), train_x[:2]))
    schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, 100, FLAGS.steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.1))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: model.apply(p, x).argmax(-1))
    rng = np.random.default_rng(0)
    curve, t0 = [], time.time()
    for i in range(1, FLAGS.steps + 1):
        idx = rng.integers(0, len(train_x), 64)
        params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx])
        if i % max(1, FLAGS.steps // 4) == 0:
            pred = np.concatenate([np.asarray(predict(params, test_x[j:j + 250])) for j in range(0, len(test_x), 250)])
            curve.append({"step": i, "train_loss": float(loss), "test_top1": float(np.mean(pred == test_y))})
            print(f"{readout:15s} step {i:5d}  loss {float(loss):.3f}  test top-1 {100 * curve[-1]['test_top1']:.1f}% "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return {"curve": curve, "test_top1": curve[-1]["test_top1"], "wall_s": time.time() - t0}


def main(argv):
    del argv
    unknown = set(FLAGS.readouts) - set(READOUTS)
    if unknown:
        raise ValueError(f"--readouts: unknown {sorted(unknown)}; choose from {READOUTS}.")
    data = (load("train"), load("test"))
    results = {r: run(r, data) for r in FLAGS.readouts}
    print(f"\n| readout (stem={FLAGS.stem}, {FLAGS.steps} steps) | test top-1 (%) |\n|---|---|")
    for r, res in results.items():
        print(f"| {r} | {100 * res['test_top1']:.1f} |")
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump({"stem": FLAGS.stem, "steps": FLAGS.steps, "lr": FLAGS.lr, "results": results}, f, indent=1)
        print("wrote", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
