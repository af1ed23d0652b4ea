"""CLIP configs. Run:  python experiments/train.py --config=configs/clip.py:digits --workdir=/tmp/clip_digits

Presets (`--config=configs/clip.py:<preset>`):
  tiny      a few-second model for tests (digits data, 16 px).
  digits    the CPU demo: trains on the bundled handwritten digits in a few minutes, >= 90% zero-shot.
  vit_b32 / vit_b16 / vit_l14 / rn50
            the paper's sizes (Radford et al. 2021, Table 19/20) on TFDS `coco_captions` with the CLIP
            BPE tokenizer (vocab file from the open-clip-torch wheel, or set config.data.vocab_path).
  Append `,siglip` (e.g. `configs/clip.py:digits,siglip`) for the sigmoid loss (Zhai et al. 2023).

Every field can be overridden, e.g.
  python experiments/train.py --config=configs/clip.py:vit_b16 --config.sharding=fsdp \
      --config.mesh.data=-1 --config.mesh.model=2 --workdir=gs://bucket/run
"""
import math

import ml_collections
from ml_collections import config_dict

from colearn_jax.configs import base

DIGITS_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Zero-shot prompts in the captions' style. No trailing period: the digits captions have none, and
# the byte-level text tower pools at the end-of-text token, right after an unseen "." (which cost
# half the zero-shot accuracy, 48% vs 97%). Kept equal to colearn_jax.data.digits.ZEROSHOT_TEMPLATES.
DIGITS_TEMPLATES = [
    "a photo of the digit {}",
    "a handwritten {}",
    "an image of the numeral {}",
    "the number {}",
]
PAPER_SIZES = {
    # name: (image_size, vision(type, patch/layers, width, layers, heads), text(width, layers, heads), embed_dim)
    "vit_b32": (224, ("vit", 32, 768, 12, 12), (512, 12, 8), 512),
    "vit_b16": (224, ("vit", 16, 768, 12, 12), (512, 12, 8), 512),
    "vit_l14": (224, ("vit", 14, 1024, 24, 16), (768, 12, 12), 768),
    "rn50": (224, ("resnet", (3, 4, 6, 3), 64, None, 32), (512, 12, 8), 1024),
}


def _base() -> ml_collections.ConfigDict:
    c = base.get_config()

    c.model.name = "clip"
    c.model.embed_dim = 64
    c.model.activation = "gelu"  # OpenAI weights need "quick_gelu"
    c.model.dtype = "float32"  # compute dtype; params and optimizer state stay float32
    c.model.scan = False  # nn.scan over identical layers (fast compile for deep towers)
    # none | full | dots | dots_no_batch | everything. Saves memory reliably with model.scan=True (the
    # recompute sits inside the scanned backward); unrolled stacks depend on XLA's scheduler, and
    # XLA:CPU hoists the recompute so its memory plan does not shrink (experiments/RESULTS.md §4).
    c.model.remat_policy = "none"
    c.model.attention_impl = config_dict.placeholder(str)  # None (XLA) | "cudnn"
    c.model.dropout = 0.0  # residual-branch dropout in both towers (the "dropout" RNG stream)
    c.model.init_logit_scale = math.log(1 / 0.07)
    c.model.init_logit_bias = config_dict.placeholder(float)  # set for SigLIP
    c.model.vision = ml_collections.ConfigDict(
        dict(type="vit", image_size=32, patch_size=8, width=96, layers=4, heads=4, mlp_ratio=4.0, pool="cls")
    )
    c.model.text = ml_collections.ConfigDict(
        dict(vocab_size=384, context_length=32, width=64, layers=2, heads=4, mlp_ratio=4.0)
    )

    c.loss = ml_collections.ConfigDict(dict(name="clip", gather="auto"))

    c.data.name = "digits_captions"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_key = "image"
    c.data.text_key = "captions"  # several per image: training samples one, eval takes the first
    c.data.label_key = "label"
    c.data.image_size = 32
    c.data.context_length = 32
    c.data.batch_size = 128  # global
    c.data.eval_batch_size = 100
    c.data.augment = False
    c.data.tokenizer = "byte"  # byte | clip_bpe
    c.data.vocab_path = config_dict.placeholder(str)  # bpe_simple_vocab_16e6.txt.gz for clip_bpe
    c.data.cache_decoded = True  # decode the 1497 digits once (4.6 MiB) instead of every epoch
    # Several datasets at once: [{"name": ..., "weight": w, <other data fields to override>}, ...]
    c.data.mixture = []
    c.data.normalize_on_device = False  # True: uint8 batches, normalised inside the step (4x fewer bytes)

    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.end_lr_factor = 0.0
    c.optim.grad_clip_norm = 1.0

    c.train.num_steps = 600
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 200
    c.train.best_metric = "zeroshot_top1"

    c.eval.zeroshot = True  # classify the eval split's labels with prompt ensembles
    c.eval.class_names = list(DIGITS_CLASSES)
    c.eval.templates = list(DIGITS_TEMPLATES)
    c.eval.retrieval = True
    return c


def _digits(c):
    return c


def _tiny(c):
    c.model.embed_dim = 16
    c.model.vision.update(image_size=16, patch_size=8, width=32, layers=2, heads=2)
    c.model.text.update(context_length=24, width=32, layers=2, heads=2)
    c.data.image_size = 16
    c.data.context_length = 24
    c.data.batch_size = 32
    c.data.eval_batch_size = 40
    c.train.num_steps = 8
    c.train.log_every = 2
    c.train.eval_every = 8
    c.train.checkpoint_every = 4
    c.train.progress_bar = False
    c.train.compilation_cache_dir = ""
    c.optim.warmup_steps = 2
    return c


def _paper(name):
    def apply(c):
        image_size, (vtype, patch_or_layers, vwidth, vlayers, vheads), (twidth, tlayers, theads), embed = PAPER_SIZES[name]
        c.model.embed_dim = embed
        c.model.scan = True
        c.model.activation = "gelu"
        if vtype == "vit":
            c.model.vision = ml_collections.ConfigDict(dict(
                type="vit", image_size=image_size, patch_size=patch_or_layers, width=vwidth, layers=vlayers,
                heads=vheads, mlp_ratio=4.0, pool="cls"))
        else:
            c.model.vision = ml_collections.ConfigDict(dict(
                type="resnet", image_size=image_size, layers=list(patch_or_layers), width=vwidth, heads=vheads))
            c.optim.b2, c.optim.eps = 0.999, 1e-8  # CLIP's ResNet settings
        c.model.text = ml_collections.ConfigDict(
            dict(vocab_size=49408, context_length=77, width=twidth, layers=tlayers, heads=theads, mlp_ratio=4.0))
        c.data.update(name="coco_captions", train_split="train", eval_split="val", text_key="captions/text",
                      label_key=config_dict.placeholder(str), image_size=image_size, context_length=77,
                      batch_size=256, eval_batch_size=256, tokenizer="clip_bpe", cache_decoded=False)
        c.eval.zeroshot = False
        c.train.best_metric = "i2t_r1"
        c.optim.update(lr=5e-4, warmup_steps=10_000)
        c.train.update(num_steps=100_000, eval_every=5000, checkpoint_every=2000, log_every=100)
        return c

    return apply


PRESETS = {"tiny": _tiny, "digits": _digits, **{k: _paper(k) for k in PAPER_SIZES}}


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    """`arg` = preset name, optionally followed by ',siglip'."""
    parts = [p for p in (arg or "digits").split(",") if p]
    preset, extras = parts[0], parts[1:]
    if preset not in PRESETS:
        raise ValueError(f"Unknown CLIP preset {preset!r}; choose one of {sorted(PRESETS)}.")
    c = PRESETS[preset](_base())
    for extra in extras:
        if extra == "siglip":
            c.loss.name = "siglip"
            c.model.init_logit_scale = math.log(10.0)
            c.model.init_logit_bias = -10.0
        else:
            raise ValueError(f"Unknown CLIP config option {extra!r} (known: siglip).")
    c.lock()
    return c
