"""SimCLR learns: a short pretraining run through the generic trainer (two on-device views, global BN,
NT-Xent, LARS) lowers the loss and its linear probe and k-NN beat the same encoder at random
initialisation by a wide margin; fine-tuning then starts from its checkpoint through `train.init_from`
on 10% of the labels. Data: the bundled handwritten digits (`digits_captions`, built locally), small
enough for a run of about a minute on a CPU."""
import json
import logging
import os

import jax
import ml_collections
import pytest

from colearn_jax.train import loop
from colearn_jax.train.program import TrainProgram
from tests.helpers import load_config

STEPS = 60


def _pretrain_config():
    c = load_config("simclr.py:tiny")
    c.unlock()
    c.data.update(name="digits_captions", image_size=32, batch_size=64, eval_batch_size=120)
    c.model.encoder.update(stage_sizes=[1, 1, 1], width_multiplier=0.25)
    c.augment.update(crop_scale=(0.3, 1.0), strength=0.5)
    c.optim.update(lr=0.6, warmup_steps=5)
    c.train.update(num_steps=STEPS, log_every=10, eval_every=STEPS, checkpoint_every=STEPS)
    c.eval.probe.update(epochs=30, weight_decays=[1e-4])
    return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    config = _pretrain_config()
    workdir = str(tmp_path_factory.mktemp("simclr_digits"))
    state = loop.train(config, workdir)
    program = TrainProgram.build(config)
    evaluator = program.system.make_evaluator(config, program.mesh, program.rules)
    random_init = evaluator(program.model, program.init_state(seed=config.seed).variables())
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return dict(config=config, workdir=workdir, state=state, rows=rows, random_init=random_init)


def test_pretraining_lowers_the_loss_and_beats_random_init(pretrained):
    rows = pretrained["rows"]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    late = sum(losses[-3:]) / 3  # one logged batch is noisy (±0.15 at batch 64): the last three's mean
    assert late < losses[0] - 0.5, losses
    final = [r for r in rows if "eval/linear_top1" in r][-1]
    base = pretrained["random_init"]
    print(f"SimCLR linear {final['eval/linear_top1']:.3f} knn {final['eval/knn_top1']:.3f}; "
          f"random init linear {base['linear_top1']:.3f} knn {base['knn_top1']:.3f}")
    assert final["eval/linear_top1"] > base["linear_top1"] + 0.08
    assert final["eval/knn_top1"] > base["knn_top1"] + 0.08


def test_finetuning_starts_from_the_pretrained_checkpoint(pretrained, tmp_path, caplog):
    c = load_config("simclr.py:tiny,finetune")
    c.unlock()
    p = pretrained["config"]
    c.data = ml_collections.ConfigDict(p.data.to_dict())
    c.model.encoder = ml_collections.ConfigDict(p.model.encoder.to_dict())
    c.data.train_fraction = 0.1  # 150 labelled digits
    c.augment.crop_scale = p.augment.crop_scale
    c.optim.lr = 0.05
    c.train.update(init_from=pretrained["workdir"], num_steps=30, eval_every=30, log_every=10)
    with caplog.at_level(logging.INFO, logger="colearn_jax"):
        loop.train(c, str(tmp_path))
    pretrained_arrays = len(jax.tree.leaves(pretrained["state"].variables()))  # encoder + head, params + BN
    assert f"Initialised {pretrained_arrays} arrays from" in caplog.text
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["eval/top1"] for r in rows if "eval/top1" in r][-1] > 0.25  # 10 classes: chance is 0.1
