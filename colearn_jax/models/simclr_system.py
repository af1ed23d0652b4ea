"""SimCLR as trainable systems (Chen et al. 2020; v2 head: Chen et al. 2020b).

`simclr` (pretraining, Sec. 2.1 / Alg. 1): each image of the global batch becomes two independently
augmented views *on device* (`make_batch_transform`: `augment.simclr_augment` vmapped over
per-example keys of the "augment" stream), so the model sees [2N, H, W, 3]; the ResNet's BatchNorm
normalises over all 2N views of the global batch (global BN, Sec. 3 "Global BN", automatic under jit
over a sharded batch); NT-Xent (`losses.contrastive.ntxent_loss`) contrasts z over the global batch
with any gather mode. Views are interleaved (row 2i + v is view v of example i), so each device's
rows hold both views of its own examples and splitting them is local. Two options use localisation
annotations of the data (never labels): `augment.object_crop` (crops placed around the object's box,
Mishra et al. 2022) and `augment.background_swap` (each view's foreground, from a per-pixel instance map,
on another image's background, Ryali et al. 2021); the digit_scenes preset uses both.

NT-Xent normalisation (`config.loss.normalization`):
  "reference"  the reference's `mean_i CE_a(i) + mean_i CE_b(i)`: the two directions *summed*
               (google-research/simclr `add_contrastive_loss`), the loss the paper's learning rates
               were tuned with;
  "mean_2n"    the mean over the 2N anchors that most ports (e.g. PyTorch SimCLR repositories)
               use: exactly half of "reference", so equivalent to halving the learning rate under
               SGD (not under LARS, whose trust ratio cancels the gradient's scale).

`simclr_finetune` (Sec. 4.2 / App. B.5): the same network plus a zero-initialised linear classifier
on the head stage `config.model.ft_proj_selector` picks, trained with softmax cross-entropy on the
dataset's labels (a `config.data.train_fraction` of them: 1% / 10%), with crop + flip views;
pretrained weights come in through `config.train.init_from` (+ `init_from_map="encoder,head"`).

Evaluators (colearn_jax/evals/simclr_eval.py): pretraining reports linear evaluation (frozen
encoder, features extracted once on the mesh, a linear classifier trained with optax) and k-NN
(Wu et al. 2018) top-1 on the eval split; fine-tuning reports the classifier's top-1.
Config layout: colearn_jax/configs/simclr.py.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from colearn_jax import sharding
from colearn_jax.data import augment
from colearn_jax.losses import contrastive
from colearn_jax.models import DataContext, System, register
from colearn_jax.models.simclr import SimCLR, to_unit_float
from colearn_jax.train import rng as rng_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMALIZATIONS = {"reference": 1.0, "mean_2n": 0.5}


def get_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype={name!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[name]


# ----------------------------------------------------------------------------- model
def build_encoder(config):
    """`model.encoder.kind`: "resnet" (the paper's ResNet v1.5) or "vit" (a VisionTransformer, as the
    contrastive ViTs of MoCo v3, Chen, Xie & He 2021; `model.encoder.vit.stem="conv"` is Xiao et al. 2021's
    convolutional stem)."""
    from colearn_jax.nn.resnet_v1 import ResNetV1  # noqa: PLC0415
    from colearn_jax.nn.vit import VisionTransformer  # noqa: PLC0415

    e = config.model.encoder
    if e.get("kind", "resnet") == "vit":
        v = e.vit
        return ViTEncoder(VisionTransformer(
            image_size=config.data.image_size, patch_size=v.patch_size, width=v.width, num_layers=v.layers,
            num_heads=v.heads, mlp_ratio=v.mlp_ratio, pool=v.pool, stem=v.stem, dtype=get_dtype(config.model.dtype)))
    return ResNetV1(depth=e.depth, width_multiplier=e.width_multiplier, cifar_stem=e.cifar_stem,
                    stage_sizes=tuple(e.stage_sizes) if e.get("stage_sizes") else None, block=e.get("block"),
                    zero_init_residual=e.zero_init_residual, dtype=get_dtype(config.model.dtype))


class ViTEncoder(nn.Module):
    """A VisionTransformer as SimCLR's encoder: `{"features": its pooled, LayerNorm'd representation}`."""

    vit: nn.Module

    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        return {"features": self.vit(images, train=train)["embedding"].astype(jnp.float32)}


def build_model(config, num_classes: int | None = None) -> SimCLR:
    from colearn_jax.nn.projection_head import ProjectionHead  # noqa: PLC0415

    m = config.model
    head = ProjectionHead(num_layers=m.head.num_layers, out_dim=m.head.out_dim, hidden_dim=m.head.get("hidden_dim"),
                          dtype=get_dtype(m.dtype))
    return SimCLR(encoder=build_encoder(config), head=head, ft_proj_selector=m.ft_proj_selector,
                  num_classes=num_classes, dtype=get_dtype(m.dtype))


def build_finetune_model(config) -> SimCLR:
    return build_model(config, num_classes=config.eval.num_classes)


def example_batch(config, batch_size: int) -> dict:
    s = config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.uint8)}
    if box_key := object_box_key(config):  # one box per image here; the data may hold more (the first is used)
        batch[box_key] = jax.ShapeDtypeStruct((batch_size, 1, 4), jnp.float32)
    if seg_key := segmentation_key(config):  # resized with the image by the pipeline
        batch[seg_key] = jax.ShapeDtypeStruct((batch_size, s, s, 1), jnp.uint8)
    return batch


def finetune_example_batch(config, batch_size: int) -> dict:
    return {**example_batch(config, batch_size), "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


# ----------------------------------------------------------------------------- augmentation
def view_augmenter(config):
    """`simclr_augment` with the switches of `config.augment` (the paper's ablations are config changes)."""
    a = config.augment
    return functools.partial(augment.simclr_augment, crop=a.crop, color=a.color, strength=a.strength, blur=a.blur,
                             flip=a.flip, crop_scale=tuple(a.crop_scale))


def object_box_key(config) -> str | None:
    """The data key of the boxes object-aware crops are placed around, or None (plain random crops)."""
    a = config.augment
    return a.get("object_box_key") if a.get("object_crop") else None


def segmentation_key(config) -> str | None:
    """The data key of the per-pixel instance map (0 = background) background swaps take the foreground
    from, or None (no background swaps)."""
    a = config.augment
    return a.get("segmentation_key") if a.get("background_swap") else None


def swapped_backgrounds(images, foreground, key):
    """[N, ...] images -> [2N, ...] interleaved pairs, each image's foreground on two other images'
    backgrounds (`augment.background_swap`; partners i + s_v mod N, with two distinct shifts s_0 != s_1
    drawn once per batch, so each row's partners do not depend on the mesh)."""
    n = images.shape[0]
    if n < 3:  # too few images for two distinct partners
        return jnp.repeat(images, 2, axis=0)
    shifts = 1 + jax.random.choice(key, n - 1, (2,), replace=False)
    plates = jax.vmap(augment.erase)(images, foreground)  # erased once, shared by both views' swaps
    views = [augment.background_swap(images, foreground, shifts[v], plates) for v in range(2)]
    return jnp.stack(views, axis=1).reshape((2 * n,) + images.shape[1:])


def make_batch_transform(config):
    """N images -> 2N views, interleaved: row 2i + v is view v of example i, key fold_in(key, 2i + v)."""
    aug = view_augmenter(config)
    box_key, seg_key = object_box_key(config), segmentation_key(config)

    def transform(batch, rngs, step):
        images = to_unit_float(batch["image"])
        n = images.shape[0]
        keys = rng_lib.per_example_keys(rngs["augment"], 2 * n)
        # object-aware crops around each image's first box; None (no leaves for vmap): plain crops
        boxes = jnp.repeat(batch[box_key][:, 0].astype(jnp.float32), 2, axis=0) if box_key else None
        if seg_key:  # the batch-level key is one past the per-example ones
            sources = swapped_backgrounds(images, batch[seg_key][..., 0] > 0, jax.random.fold_in(rngs["augment"], 2 * n))
        else:
            sources = jnp.repeat(images, 2, axis=0)
        views = jax.vmap(lambda im, k, b: aug(im, k, box=b))(sources, keys, boxes)
        return {**batch, "image": views}

    return transform


def make_finetune_batch_transform(config):
    """One augmented view per labelled image (the reference fine-tunes with crop + flip only)."""
    aug = view_augmenter(config)

    def transform(batch, rngs, step):
        images = to_unit_float(batch["image"])
        keys = rng_lib.per_example_keys(rngs["augment"], images.shape[0])
        return {**batch, "image": jax.vmap(aug)(images, keys)}

    return transform


# ----------------------------------------------------------------------------- objectives
def split_views(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2N, D] interleaved views -> ([N, D], [N, D]); local to each device's rows."""
    pairs = z.reshape(z.shape[0] // 2, 2, *z.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def make_objective(config, mesh=None, rules=None):
    lc = config.loss
    axes = sharding.batch_axes(rules) if rules is not None else sharding.DATA_AXES
    scale = NORMALIZATIONS[lc.normalization]

    def objective(outputs, batch, rngs, step):
        z1, z2 = split_views(outputs["proj"])
        loss, metrics = contrastive.ntxent_loss(z1, z2, lc.temperature, gather=lc.gather, mesh=mesh, batch_axes=axes)
        return scale * loss, metrics

    return objective


def make_finetune_objective(config, mesh=None, rules=None):
    def objective(outputs, batch, rngs, step):
        logits, labels = outputs["logits"], batch["label"]
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
        return loss, {"top1": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}

    return objective


# ----------------------------------------------------------------------------- data
def make_train_data(config, ctx: DataContext):
    from colearn_jax.data import make_train_iterator  # noqa: PLC0415 (imports TFDS and grain)

    extra = tuple(k for k in (object_box_key(config), segmentation_key(config)) if k)
    return make_train_iterator(config.data, None, seed=ctx.seed, process_index=ctx.process_index,
                               process_count=ctx.process_count, with_label=False, extra_keys=extra)


def make_finetune_train_data(config, ctx: DataContext):
    from colearn_jax.data import make_train_iterator  # noqa: PLC0415

    return make_train_iterator(config.data, None, seed=ctx.seed, process_index=ctx.process_index,
                               process_count=ctx.process_count, with_label=True)


def make_eval_data(config, ctx: DataContext, split=None):
    from colearn_jax.data import iterate_eval  # noqa: PLC0415

    return iterate_eval(config.data, None, split=split, process_index=ctx.process_index,
                        process_count=ctx.process_count)


# ----------------------------------------------------------------------------- evaluators
def describe_metrics(config):
    from colearn_jax.evals.simclr_eval import metric_specs  # noqa: PLC0415

    return metric_specs(config)


def describe_finetune_metrics(config):
    from colearn_jax.evals.simclr_eval import finetune_metric_specs  # noqa: PLC0415

    return finetune_metric_specs(config)


def _eval_data(config):
    ctx = DataContext(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    return lambda split=None: make_eval_data(config, ctx, split)


def make_evaluator(config, mesh, rules):
    from colearn_jax.evals.simclr_eval import make_representation_evaluator  # noqa: PLC0415

    return make_representation_evaluator(config, mesh, rules, _eval_data(config))


def make_finetune_evaluator(config, mesh, rules):
    from colearn_jax.evals.simclr_eval import make_classifier_evaluator  # noqa: PLC0415

    return make_classifier_evaluator(config, mesh, rules, _eval_data(config))


# ----------------------------------------------------------------------------- config checks
def _need(ok: bool, key: str, value, rule: str):
    if not ok:
        raise ValueError(f"config.{key}={value!r} {rule}.")


def validate_config(config) -> None:
    """SimCLR's own fields: encoder, head, loss, augmentation, data size and evaluation."""
    from colearn_jax.nn.resnet_v1 import DEPTHS, EXPANSION  # noqa: PLC0415

    m, e, lc, a, d = config.model, config.model.encoder, config.loss, config.augment, config.data
    get_dtype(m.dtype)
    kind = e.get("kind", "resnet")
    _need(kind in ("resnet", "vit"), "model.encoder.kind", kind, "must be 'resnet' or 'vit'")
    if kind == "vit":
        _need(e.vit.pool in ("cls", "gap"), "model.encoder.vit.pool", e.vit.pool, "must be 'cls' or 'gap'")
        _need(d.image_size % e.vit.patch_size == 0, "model.encoder.vit.patch_size", e.vit.patch_size,
              f"must divide data.image_size={d.image_size}")
    elif e.get("stage_sizes"):
        _need(all(int(s) >= 1 for s in e.stage_sizes), "model.encoder.stage_sizes", list(e.stage_sizes),
              "must be positive block counts")
        _need(e.get("block") in EXPANSION, "model.encoder.block", e.get("block"), f"must be one of {sorted(EXPANSION)}")
    else:
        _need(e.depth in DEPTHS, "model.encoder.depth", e.depth, f"must be one of {sorted(DEPTHS)} (or set stage_sizes)")
    _need(e.width_multiplier > 0 and round(64 * e.width_multiplier) >= 1, "model.encoder.width_multiplier",
          e.width_multiplier, "must leave at least one channel (64 x multiplier >= 1)")
    _need(m.head.num_layers >= 0, "model.head.num_layers", m.head.num_layers, "must be >= 0 (0: no head)")
    _need(m.head.out_dim >= 1, "model.head.out_dim", m.head.out_dim, "must be >= 1")
    _need(0 <= m.ft_proj_selector <= m.head.num_layers, "model.ft_proj_selector", m.ft_proj_selector,
          f"must be in [0, model.head.num_layers={m.head.num_layers}] (0: the representation h)")
    _need(lc.name == "ntxent", "loss.name", lc.name, "must be 'ntxent'")
    _need(lc.gather in contrastive.GATHER_MODES, "loss.gather", lc.gather, f"must be one of {contrastive.GATHER_MODES}")
    _need(lc.temperature > 0, "loss.temperature", lc.temperature, "must be > 0")
    _need(lc.normalization in NORMALIZATIONS, "loss.normalization", lc.normalization,
          f"must be one of {sorted(NORMALIZATIONS)}")
    _need(a.strength >= 0, "augment.strength", a.strength, "must be >= 0")
    lo, hi = tuple(a.crop_scale)
    _need(0 < lo <= hi <= 1, "augment.crop_scale", list(a.crop_scale), "must be (min, max) area fractions in (0, 1]")
    _need(not a.get("object_crop") or bool(a.get("object_box_key")), "augment.object_box_key",
          a.get("object_box_key"), "must name the data's box key when augment.object_crop is on")
    _need(not a.get("background_swap") or bool(a.get("segmentation_key")), "augment.segmentation_key",
          a.get("segmentation_key"), "must name the data's per-pixel instance map when augment.background_swap is on")
    _need(d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8")
    ev = config.eval
    if ev.linear_probe or ev.knn or config.model.name == "simclr_finetune":
        _need(ev.num_classes >= 2, "eval.num_classes", ev.num_classes, "must be >= 2")
    _need(ev.knn_k >= 1, "eval.knn_k", ev.knn_k, "must be >= 1")
    _need(ev.knn_temperature > 0, "eval.knn_temperature", ev.knn_temperature, "must be > 0")
    _need(ev.probe.epochs >= 1, "eval.probe.epochs", ev.probe.epochs, "must be >= 1")
    _need(len(ev.probe.weight_decays) >= 1 and min(ev.probe.weight_decays) >= 0, "eval.probe.weight_decays",
          list(ev.probe.weight_decays), "must be a non-empty list of values >= 0")


@register("simclr")
def simclr_system() -> System:
    return System(
        name="simclr",
        build_model=build_model,
        make_objective=make_objective,
        example_batch=example_batch,
        make_train_data=make_train_data,
        make_eval_data=make_eval_data,
        make_evaluator=make_evaluator,
        describe_metrics=describe_metrics,
        validate_config=validate_config,
        rng_streams=("augment",),
        make_batch_transform=make_batch_transform,
    )


@register("simclr_finetune")
def simclr_finetune_system() -> System:
    return System(
        name="simclr_finetune",
        build_model=build_finetune_model,
        make_objective=make_finetune_objective,
        example_batch=finetune_example_batch,
        make_train_data=make_finetune_train_data,
        make_eval_data=make_eval_data,
        make_evaluator=make_finetune_evaluator,
        describe_metrics=describe_finetune_metrics,
        validate_config=validate_config,
        rng_streams=("augment",),
        make_batch_transform=make_finetune_batch_transform,
    )
