"""SimCLR configs. Run:  python experiments/train.py --config=configs/simclr.py:digit_scenes --workdir=/tmp/simclr_digit_scenes

Presets (`--config=configs/simclr.py:<preset>[,finetune]`):
  tiny               a few-second model for tests.
  digit_scenes       the CPU demo: pretraining on digit_scenes/single in under 20 minutes on 2 cores.
  cifar10            Chen et al. 2020, App. B.9: ResNet-50 with the CIFAR stem, tau 0.5, TFDS cifar10.
  resnet50_imagenet  the paper's main setting: ResNet-50, batch 4096, tau 0.1, LARS 4.8, 100 epochs.
  Append `,finetune` to fine-tune a pretrained run (system `simclr_finetune`), e.g.
    python experiments/train.py --config=configs/simclr.py:digit_scenes,finetune \
        --config.train.init_from=/tmp/simclr_digit_scenes --config.data.train_fraction=0.1 --workdir=/tmp/simclr_ft10

Every field can be overridden; the paper's augmentation ablation (Sec. 3, Fig. 5) is a config change,
e.g. `--config.augment.color=False` (crop only) or `--config.augment.crop=False` (colour only).

Field layout: model {encoder {depth, width_multiplier, cifar_stem, stage_sizes, block, zero_init_residual},
head {num_layers, out_dim, hidden_dim}, ft_proj_selector, dtype}; loss {temperature, gather,
normalization}; augment {crop, color, strength, blur, flip, crop_scale}; data {name, image_size,
train_fraction, ...}; eval {linear_probe, knn, knn_k, knn_temperature, num_classes, probe_split,
probe {epochs, batch_size, lr, weight_decays, holdout_fraction}}.
"""
import math

import ml_collections
from ml_collections import config_dict

from colearn_jax.configs import base


def learning_rate(batch_size: int, base_lr: float = 0.3, scaling: str = "linear") -> float:
    """SimCLR's rule (Chen et al. 2020, App. B.1): `base_lr * batch / 256` ("linear", base 0.3) or
    `base_lr * sqrt(batch)` ("sqrt", base 0.075, better for small batches). Batch 4096: 4.8 either way."""
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(f"learning-rate scaling {scaling!r}; choose 'linear' or 'sqrt'.")


def steps_for(epochs: float, num_examples: int, batch_size: int) -> int:
    return max(1, int(round(epochs * num_examples / batch_size)))


def set_schedule(c, *, num_examples: int, epochs: float, warmup_epochs: float, base_lr: float,
                 scaling: str = "linear") -> ml_collections.ConfigDict:
    """LARS learning rate from the batch size, warm-up then cosine, steps from epochs."""
    c.optim.lr = learning_rate(c.data.batch_size, base_lr, scaling)
    c.optim.warmup_steps = steps_for(warmup_epochs, num_examples, c.data.batch_size) if warmup_epochs else 0
    c.train.num_steps = steps_for(epochs, num_examples, c.data.batch_size)
    return c


def _base() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model.name = "simclr"
    c.model.dtype = "float32"
    c.model.encoder = ml_collections.ConfigDict(dict(
        depth=50, width_multiplier=1.0, cifar_stem=False, stage_sizes=[], block=config_dict.placeholder(str),
        zero_init_residual=True, kind="resnet",
        # kind="vit": a VisionTransformer encoder (MoCo v3 style) at data.image_size
        vit=ml_collections.ConfigDict(dict(patch_size=8, width=96, layers=4, heads=4, mlp_ratio=4.0, pool="gap",
                                           stem="conv"))))
    c.model.head = ml_collections.ConfigDict(dict(num_layers=3, out_dim=128, hidden_dim=config_dict.placeholder(int)))
    c.model.ft_proj_selector = 0  # head stage fine-tuning builds on (0: h)

    c.loss = ml_collections.ConfigDict(dict(name="ntxent", temperature=0.1, gather="auto", normalization="reference"))
    c.augment = ml_collections.ConfigDict(dict(crop=True, color=True, strength=1.0, blur=True, flip=True,
                                               crop_scale=(0.08, 1.0),
                                               # object-aware crops (Mishra et al. 2022): each crop placed to
                                               # contain the image's first box of `object_box_key` (x1, y1,
                                               # x2, y2 fractions): declared weak localisation supervision
                                               object_crop=False, object_box_key="boxes",
                                               # background swaps (Ryali et al. 2021): each view shows the
                                               # image's foreground (`segmentation_key` > 0) on another
                                               # image's background: declared weak segmentation supervision
                                               background_swap=False, segmentation_key="segmentation"))

    c.data.name = "digit_scenes/single"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_key = "image"
    c.data.label_key = "label"
    c.data.image_size = 64
    c.data.batch_size = 256
    c.data.eval_batch_size = 200
    c.data.train_fraction = 1.0  # fine-tuning on a fixed random subset of the labels (0.01, 0.1)
    c.data.train_fraction_seed = 0

    c.optim.name = "lars"
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 1e-3  # eeta
    c.optim.weight_decay = 1e-6
    c.optim.schedule = "cosine"

    c.train.best_metric = "linear_top1"

    c.eval.linear_probe = True
    c.eval.knn = True
    c.eval.knn_k = 20
    c.eval.knn_temperature = 0.07
    c.eval.num_classes = 10
    c.eval.probe_split = "train"
    c.eval.probe = ml_collections.ConfigDict(dict(epochs=100, batch_size=256, lr=0.1,
                                                  weight_decays=[0.0, 1e-4, 1e-3], holdout_fraction=0.1))
    return c


def _tiny(c):
    """python experiments/train.py --config=configs/simclr.py:tiny --workdir=/tmp/simclr_tiny

    Seconds on a CPU: a 2-stage, 8-channel ResNet on 16 px digit_scenes/single; for tests."""
    c.model.encoder.update(stage_sizes=[1, 1], block="basic", width_multiplier=0.125, cifar_stem=True)
    c.model.head.update(num_layers=2, out_dim=16)
    c.data.update(image_size=16, batch_size=16, eval_batch_size=40)
    c.loss.temperature = 0.5
    c.augment.blur = False
    c.optim.update(lr=learning_rate(16), warmup_steps=1)
    c.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4, progress_bar=False,
                   compilation_cache_dir="")
    c.eval.probe.update(epochs=5, weight_decays=[0.0])
    return c


def _digit_scenes(c):
    """python experiments/train.py --config=configs/simclr.py:digit_scenes --workdir=/tmp/simclr_digit_scenes

    The CPU demo (README "SimCLR"): pretraining on the 5000 digit_scenes/single training images in about
    17 minutes on a 2-core CPU; linear probe and k-NN on the test split every 700 steps. The encoder is a
    small conv-stem ViT at 32 px (16 tokens; ~350 examples/s here, 6x the ResNet-18 x 0.25 of earlier
    stops), with object-aware crops (Mishra et al. 2022) and background swaps (Ryali et al. 2021), which
    use the dataset's boxes and segmentation: declared weak localisation supervision. README "SimCLR" has
    the pilots behind each choice. The paper's ResNet is `model.encoder.kind="resnet"` (see cifar10)."""
    c.model.encoder.update(kind="vit", depth=18, width_multiplier=0.25, cifar_stem=True)
    c.model.encoder.vit.update(patch_size=8, width=96, layers=4, heads=4, pool="gap", stem="conv")
    c.model.head.update(num_layers=2, out_dim=64)
    c.data.update(image_size=32, batch_size=128, eval_batch_size=200)
    c.loss.temperature = 0.2
    c.augment.update(strength=0.75, blur=False, crop_scale=(0.1, 0.6), object_crop=True, background_swap=True)
    c.optim.update(name="adamw", lr=1e-3, weight_decay=0.1, warmup_steps=50)
    c.train.update(num_steps=2800, log_every=50, eval_every=700, checkpoint_every=700)
    return c


def _cifar10(c):
    """python experiments/train.py --config=configs/simclr.py:cifar10 --workdir=/tmp/simclr_cifar10

    Chen et al. 2020, App. B.9: ResNet-50 with the CIFAR stem (3x3 stride-1 conv, no max pool), tau 0.5,
    colour strength 0.5, no blur, batch 512, 1000 epochs, LARS (base 1.0, linear scaling), weight decay
    1e-4. (The reference README's single-GPU command uses ResNet-18 and weight decay 1e-6.) Needs TFDS
    `cifar10` prepared as array_record (`tfds build cifar10 --file_format=array_record`)."""
    c.model.encoder.update(depth=50, width_multiplier=1.0, cifar_stem=True)
    c.data.update(name="cifar10", image_size=32, batch_size=512, eval_batch_size=400, label_key="label")
    c.loss.temperature = 0.5
    c.augment.update(strength=0.5, blur=False)
    set_schedule(c, num_examples=50_000, epochs=1000, warmup_epochs=10, base_lr=1.0)
    c.optim.weight_decay = 1e-4
    c.train.update(log_every=100, eval_every=5000, checkpoint_every=2000)
    return c


def _resnet50_imagenet(c):
    """python experiments/train.py --config=configs/simclr.py:resnet50_imagenet --config.sharding=fsdp --workdir=gs://bucket/simclr_r50

    The paper's main setting (Sec. 2.3, App. B): ResNet-50 (1x), 224 px, batch 4096, tau 0.1, LARS lr
    0.3 x 4096/256 = 4.8 (= 0.075 x sqrt(4096) with the sqrt rule: `set_schedule(..., scaling="sqrt")`),
    weight decay 1e-6, 10 warm-up epochs then cosine, 100 epochs, blur on, global BN, v2's 3-layer head.
    Needs TFDS `imagenet2012` prepared as array_record (manual download). Host side, each image is
    resized (short side) and centre-cropped to 224 before the on-device random resized crop, which
    therefore crops from that square rather than from the full image."""
    c.model.encoder.update(depth=50, width_multiplier=1.0, cifar_stem=False)
    c.data.update(name="imagenet2012", image_size=224, batch_size=4096, eval_batch_size=1024,
                  eval_split="validation", num_threads=16, prefetch_buffer_size=512)
    c.loss.temperature = 0.1
    set_schedule(c, num_examples=1_281_167, epochs=100, warmup_epochs=10, base_lr=0.3)
    c.optim.weight_decay = 1e-6
    c.eval.num_classes = 1000
    c.eval.probe.update(epochs=90, batch_size=4096)
    c.train.update(log_every=100, eval_every=10_000, checkpoint_every=2000)
    return c


def _finetune(c):
    """Fine-tuning (system `simclr_finetune`): a zero-initialised linear classifier on head stage
    `model.ft_proj_selector`, softmax cross-entropy on `data.train_fraction` of the labels, crop + flip
    views, SGD with Nesterov momentum (the reference README's fine-tuning command: momentum, base lr
    0.1 scaled by batch/256, no weight decay, no warm-up), starting from `train.init_from`."""
    c.model.name = "simclr_finetune"
    c.train.init_from_map = "encoder,head"
    c.train.best_metric = "top1"
    c.augment.update(color=False, blur=False, object_crop=False, background_swap=False)  # labelled views: crop + flip
    c.optim.update(name="sgd", nesterov=True, momentum=0.9, weight_decay=0.0, warmup_steps=0,
                   lr=learning_rate(c.data.batch_size, 0.1))
    c.eval.update(linear_probe=False, knn=False)
    return c


PRESETS = {"tiny": _tiny, "digit_scenes": _digit_scenes, "cifar10": _cifar10, "resnet50_imagenet": _resnet50_imagenet}
OPTIONS = {"finetune": _finetune}


def get_config(arg: str = "digit_scenes") -> ml_collections.ConfigDict:
    """`arg` = preset name, optionally followed by ',finetune'."""
    parts = [p for p in (arg or "digit_scenes").split(",") if p]
    preset, extras = parts[0], parts[1:]
    if preset not in PRESETS:
        raise ValueError(f"Unknown SimCLR preset {preset!r}; choose one of {sorted(PRESETS)}.")
    c = PRESETS[preset](_base())
    for extra in extras:
        if extra not in OPTIONS:
            raise ValueError(f"Unknown SimCLR config option {extra!r} (known: {sorted(OPTIONS)}).")
        c = OPTIONS[extra](c)
    c.lock()
    return c
