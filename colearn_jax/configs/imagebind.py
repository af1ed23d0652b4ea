"""ImageBind configs. Run:  python experiments/train.py --config=configs/imagebind.py:digits --workdir=/tmp/imagebind_digits

Presets (`--config=configs/imagebind.py:<preset>[,option...]`; Girdhar et al. 2023, Sec. 4 and App. B):
  tiny      seconds-sized towers for tests, on the local `digit_modalities` (16 px images, short audio / IMU).
  digits    the CPU demo on `digit_modalities`: all six towers small, image<->{audio, depth, thermal,
            IMU, text} trained jointly from scratch (text joins the pairs since there is no CLIP here).
  huge      the released imagebind_huge sizes: vision 1280/32/16 (patch 2x14x14, 224 px), text 1024/24/16,
            audio 768/12/12 (128x204 mel, 16x16 stride 10, drop-path 0.1), depth 384/12/8, thermal
            768/12/12, IMU 512/6/8 (drop-path 0.7, head dropout 0.5), joint space 1024; layers scanned.
Options (applied in order):
  from_clip=<dir>   the paper's recipe: start vision + text (+ its logit scale) from an ImageBind checkpoint
                    written by `imagebind_system.inflate_clip` from a CLIP run, frozen by optim.groups,
                    and bind only audio / depth / thermal / IMU to the images.
  paired_datasets   the paper's data: a mixture with one member per pair, each giving images and that one
                    modality (`data.modalities`); the other pairs' losses mask its rows out.
e.g.  python experiments/train.py --config=configs/imagebind.py:huge --config.sharding=fsdp --compile_only
"""
import math

import ml_collections
from ml_collections import config_dict

from colearn_jax.configs import base
from colearn_jax.configs.clip import DIGITS_CLASSES, DIGITS_TEMPLATES

# Zero-shot prompts per modality ({} = class name): the digit templates a digits CLIP's text tower was
# trained on (so `from_clip`'s frozen text tower reads them) plus one phrase naming the modality. With the
# modality phrases alone ("the sound of the digit {}") that frozen tower scored audio at chance (10.7 %),
# although audio matched images of its class 98 % of the time (experiments/imagebind_digits.py).
PROMPTS = {"vision": list(DIGITS_TEMPLATES)}
PROMPTS.update({m: list(DIGITS_TEMPLATES) + [phrase] for m, phrase in (
    ("audio", "the sound of the digit {}"), ("depth", "a depth map of the digit {}"),
    ("thermal", "a thermal image of the digit {}"), ("imu", "writing the digit {}"))})
FROZEN_CLIP = [{"pattern": r"^(vision|text)/|^text_logit_scale$", "frozen": True}]


def _tower(width, layers, heads, **kw):
    t = dict(width=width, layers=layers, heads=heads, patch=[16, 16], stride=None, input_size=[224, 224],
             in_channels=1, mlp_ratio=4.0, add_bias_kv=False, drop_path=0.0, head_dropout=0.0, vocab_size=49408,
             context_length=77, logit_scale=None, learnable_scale=False)
    t.update(kw)
    return ml_collections.ConfigDict(t)


def _towers(size, img, mel, frames, imu_len, dt=None):
    """size: {modality: (width, layers, heads)} plus stems scaled to the inputs; dt: depth/thermal side (img)."""
    dt = dt or img
    return ml_collections.ConfigDict(dict(
        vision=_tower(*size["vision"], patch=size["vision_patch"], input_size=[img, img], in_channels=3),
        text=_tower(*size["text"], vocab_size=size["vocab"], context_length=size["context"],
                    logit_scale=1 / 0.07, learnable_scale=True),
        audio=_tower(*size["audio"], patch=size["audio_patch"], stride=size["audio_stride"], input_size=[mel, frames],
                     add_bias_kv=True, drop_path=size["audio_dp"], logit_scale=20.0),
        depth=_tower(*size["depth"], patch=size["depth_patch"], input_size=[dt, dt], add_bias_kv=True, logit_scale=5.0),
        thermal=_tower(*size["thermal"], patch=size["depth_patch"], input_size=[dt, dt], add_bias_kv=True,
                       logit_scale=10.0),
        imu=_tower(*size["imu"], patch=[size["imu_patch"]], input_size=[6, imu_len], add_bias_kv=True,
                   drop_path=size["imu_dp"], head_dropout=0.5, logit_scale=5.0),
    ))


def _base():
    c = base.get_config()
    c.model.name = "imagebind"
    c.model.embed_dim = 64
    c.model.dtype = "float32"
    c.model.scan = False
    c.model.remat_policy = "none"
    c.model.attention_impl = config_dict.placeholder(str)
    c.model.modalities = ["vision", "text", "audio", "depth", "thermal", "imu"]
    c.loss = ml_collections.ConfigDict(dict(gather="auto", pairs=["text", "audio", "depth", "thermal", "imu"]))

    c.data.name = "digit_modalities"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.text_key = "caption"
    c.data.label_key = "label"
    c.data.image_size = 32
    c.data.context_length = 24
    c.data.tokenizer = "byte"
    c.data.vocab_path = config_dict.placeholder(str)
    c.data.cache_decoded = True
    c.data.mixture = []
    # Which of model.modalities this dataset gives ([] = all). A mixture member may list fewer, e.g.
    # {"name": "digit_modalities", "weight": 1, "modalities": ["vision", "audio"]}: the rest are zero-filled
    # and masked out of the loss (the paper's image+audio, image+depth, ... datasets).
    c.data.modalities = []
    c.data.audio_seconds = 2.0  # samples per example read from the dataset (16 kHz)
    c.data.audio_clip_seconds = 2.0
    c.data.audio_clips = 1
    c.data.audio_mel_bins = 64
    c.data.audio_target_length = 204
    c.data.imu_length = 2000
    c.data.batch_size = 64
    c.data.eval_batch_size = 100

    c.optim.update(name="adamw", lr=1e-3, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.05, warmup_steps=50,
                   schedule="cosine", grad_clip_norm=1.0)
    c.train.update(num_steps=800, log_every=20, eval_every=200, checkpoint_every=200,
                   best_metric="zeroshot_audio_top1")
    c.eval.class_names = list(DIGITS_CLASSES)
    c.eval.prompts = ml_collections.ConfigDict({k: list(v) for k, v in PROMPTS.items()})
    c.eval.zeroshot_modalities = ["vision", "audio", "depth", "thermal", "imu"]
    c.eval.retrieval_pairs = [["audio", "depth"], ["imu", "audio"]]
    c.eval.arithmetic_pairs = [["audio", "depth"], ["thermal", "imu"]]
    return c


SMALL = dict(vision=(64, 2, 4), vision_patch=[2, 8, 8], text=(64, 2, 4), vocab=384, context=24,
             audio=(64, 2, 4), audio_patch=[16, 16], audio_stride=[16, 16], audio_dp=0.1,
             depth=(64, 2, 4), depth_patch=[8, 8], thermal=(64, 2, 4), imu=(64, 2, 4), imu_patch=40, imu_dp=0.1)


def _digits(c):
    c.model.towers = _towers(SMALL, 32, 64, 204, 2000)
    return c


def _tiny(c):
    size = dict(SMALL, vision=(16, 1, 2), text=(16, 1, 2), audio=(16, 1, 2), depth=(16, 1, 2), thermal=(16, 1, 2),
                imu=(16, 1, 2), vision_patch=[2, 8, 8], audio_patch=[16, 16], audio_stride=[16, 16],
                depth_patch=[16, 16], imu_patch=100)
    c.model.embed_dim = 16
    c.data.update(image_size=16, audio_seconds=0.5, audio_clip_seconds=0.5, audio_mel_bins=32, audio_target_length=48,
                  imu_length=400, batch_size=32, eval_batch_size=40)
    c.model.towers = _towers(size, 16, 32, 48, 400, dt=32)  # depth / thermal stay 32 px
    c.train.update(num_steps=8, log_every=2, eval_every=8, checkpoint_every=4, progress_bar=False,
                   compilation_cache_dir="")
    c.optim.warmup_steps = 2
    return c


HUGE = dict(vision=(1280, 32, 16), vision_patch=[2, 14, 14], text=(1024, 24, 16), vocab=49408, context=77,
            audio=(768, 12, 12), audio_patch=[16, 16], audio_stride=[10, 10], audio_dp=0.1,
            depth=(384, 12, 8), depth_patch=[16, 16], thermal=(768, 12, 12), imu=(512, 6, 8), imu_patch=8, imu_dp=0.7)


def _huge(c):
    c.model.embed_dim = 1024
    c.model.scan = True
    c.model.towers = _towers(HUGE, 224, 128, 204, 2000)
    c.data.update(image_size=224, context_length=77, tokenizer="clip_bpe", audio_mel_bins=128, audio_target_length=204,
                  audio_clips=3, audio_seconds=2.0, batch_size=512, eval_batch_size=256)
    c.loss.pairs = ["audio", "depth", "thermal", "imu"]
    c.optim.groups = [dict(g) for g in FROZEN_CLIP]  # the paper freezes the OpenCLIP image and text towers
    c.train.update(num_steps=16_000, eval_every=2000, checkpoint_every=1000, log_every=100)
    return c


PRESETS = {"tiny": _tiny, "digits": _digits, "huge": _huge}


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "digits").split(",") if p]
    preset, extras = parts[0], parts[1:]
    if preset not in PRESETS:
        raise ValueError(f"Unknown ImageBind preset {preset!r}; choose one of {sorted(PRESETS)}.")
    c = PRESETS[preset](_base())
    for extra in extras:
        key, _, value = extra.partition("=")
        if key == "from_clip":
            c.train.init_from = value
            c.train.init_from_map = "vision,text,text_logit_scale"
            c.optim.groups = [dict(g) for g in FROZEN_CLIP]
            c.loss.pairs = [p for p in c.loss.pairs if p != "text"]
        elif key == "paired_datasets":
            # The paper's data: one dataset per pair, each giving images + that modality only (here the
            # same local dataset split into members), masked out of the other pairs' losses.
            c.data.mixture = [{"name": c.data.name, "weight": 1.0, "modalities": ["vision", p]} for p in c.loss.pairs]
        else:
            raise ValueError(f"Unknown ImageBind config option {extra!r} (known: from_clip=<dir>, paired_datasets).")
    c.lock()
    return c
