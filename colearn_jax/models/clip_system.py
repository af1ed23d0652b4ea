"""CLIP as a trainable system (Radford et al. 2021): towers from config, the contrastive objective,
its image+caption data, its config checks and its evaluator — the worked example of `System`.

The config layout (colearn_jax/configs/clip.py): `config.model` {embed_dim, activation, dtype, scan,
remat_policy, attention_impl, dropout, vision{type, ...}, text{...}, init_logit_scale, init_logit_bias},
`config.loss` {name: clip|siglip, gather}, `config.data` {name, image/text/label keys, image_size,
context_length, tokenizer, ...}, `config.eval` {zeroshot, class_names, templates, retrieval}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from colearn_jax import sharding
from colearn_jax.losses import contrastive
from colearn_jax.models import DataContext, System, register
from colearn_jax.models.clip import CLIP, clamp_logit_scale

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype={name!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[name]


def build_vision_tower(m, embed_dim: int):
    from colearn_jax.nn.vit import VisionTransformer  # noqa: PLC0415

    v = m.vision
    common = dict(dtype=get_dtype(m.dtype))
    if v.type == "vit":
        return VisionTransformer(
            image_size=v.image_size, patch_size=v.patch_size, width=v.width, num_layers=v.layers,
            num_heads=v.heads, mlp_ratio=v.get("mlp_ratio", 4.0), output_dim=embed_dim,
            activation=m.activation, pool=v.get("pool", "cls"), stem=v.get("stem", "patch"), scan=m.scan, remat_policy=m.remat_policy,
            attention_impl=m.attention_impl, dropout=m.get("dropout", 0.0), **common,
        )
    if v.type == "resnet":
        from colearn_jax.nn.resnet import ModifiedResNet  # noqa: PLC0415

        return ModifiedResNet(
            layers=tuple(v.layers), output_dim=embed_dim, num_heads=v.heads, image_size=v.image_size,
            width=v.width, **common,
        )
    raise ValueError(f"config.model.vision.type={v.type!r}; choose 'vit' or 'resnet'.")


def build_text_tower(m, embed_dim: int):
    from colearn_jax.nn.text import TextTransformer  # noqa: PLC0415

    t = m.text
    return TextTransformer(
        vocab_size=t.vocab_size, context_length=t.context_length, width=t.width, num_layers=t.layers,
        num_heads=t.heads, mlp_ratio=t.get("mlp_ratio", 4.0), output_dim=embed_dim, activation=m.activation,
        scan=m.scan, remat_policy=m.remat_policy, attention_impl=m.attention_impl, dropout=m.get("dropout", 0.0),
        dtype=get_dtype(m.dtype),
    )


def build_model(config) -> CLIP:
    m = config.model
    return CLIP(
        vision=build_vision_tower(m, m.embed_dim),
        text=build_text_tower(m, m.embed_dim),
        init_logit_scale=m.init_logit_scale,
        init_logit_bias=m.get("init_logit_bias"),
    )


def make_objective(config, mesh=None, rules=None):
    loss_cfg = config.loss
    axes = sharding.batch_axes(rules) if rules is not None else ("data", "fsdp")
    kw = dict(gather=loss_cfg.gather, mesh=mesh, batch_axes=axes)
    if loss_cfg.name == "clip":
        def objective(outputs, batch, rngs, step):
            return contrastive.clip_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], **kw)
    elif loss_cfg.name == "siglip":
        if config.model.get("init_logit_bias") is None:
            raise ValueError("config.loss.name='siglip' needs config.model.init_logit_bias (e.g. -10.0).")

        def objective(outputs, batch, rngs, step):
            return contrastive.siglip_loss(
                outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], outputs["logit_bias"], **kw
            )
    else:
        raise ValueError(f"config.loss.name={loss_cfg.name!r}; choose 'clip' or 'siglip'.")
    return objective


def example_batch(config, batch_size: int) -> dict:
    v, t = config.model.vision, config.model.text
    image_dtype = jnp.uint8 if config.data.get("normalize_on_device", False) else jnp.float32
    return {
        "image": jax.ShapeDtypeStruct((batch_size, v.image_size, v.image_size, 3), image_dtype),
        "text": jax.ShapeDtypeStruct((batch_size, t.context_length), jnp.int32),
    }


def make_batch_transform(config):
    """With `data.normalize_on_device`, uint8 images cross to the device (4x fewer bytes) and are
    normalised first thing in the step; otherwise the host pipeline normalised them."""
    if not config.data.get("normalize_on_device", False):
        return None
    from colearn_jax.data.image_ops import device_normalize  # noqa: PLC0415

    return lambda batch, rngs, step: {**batch, "image": device_normalize(batch["image"])}


def tokenizer(config):
    from colearn_jax.data import get_tokenizer  # noqa: PLC0415

    return get_tokenizer(config.data.tokenizer, config.data.get("vocab_path"))


def make_train_data(config, ctx: DataContext):
    from colearn_jax.data import make_train_iterator  # noqa: PLC0415 (imports TFDS and grain)

    return make_train_iterator(config.data, tokenizer(config), seed=ctx.seed, process_index=ctx.process_index,
                               process_count=ctx.process_count)


def make_eval_data(config, ctx: DataContext, split=None):
    from colearn_jax.data import iterate_eval  # noqa: PLC0415

    return iterate_eval(config.data, tokenizer(config), split=split, process_index=ctx.process_index,
                        process_count=ctx.process_count)


def validate_config(config) -> None:
    """CLIP's own fields: loss name and gather mode, every tower/data size and ratio, tokenizer
    vocabulary, dropout, activation, remat policy, attention implementation, eval prompts."""
    from colearn_jax.config_checks import check_divisible, check_ranges, positive_ints  # noqa: PLC0415
    from colearn_jax.nn.layers import ACTIVATIONS  # noqa: PLC0415
    from colearn_jax.nn.transformer import REMAT_POLICIES  # noqa: PLC0415

    m, d = config.model, config.data
    if config.loss.name not in ("clip", "siglip"):
        raise ValueError(f"config.loss.name={config.loss.name!r}; choose 'clip' or 'siglip'.")
    if config.loss.gather not in contrastive.GATHER_MODES:
        raise ValueError(f"config.loss.gather={config.loss.gather!r}; choose one of {contrastive.GATHER_MODES}.")
    get_dtype(m.dtype)
    check_ranges(config, {"model.dropout": (0.0, 1.0, False)})
    if m.activation not in ACTIVATIONS:
        raise ValueError(f"config.model.activation={m.activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    if m.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat_policy={m.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}.")
    if m.get("attention_impl") not in (None, "cudnn"):
        raise ValueError(f"config.model.attention_impl={m.attention_impl!r}; choose None (XLA) or 'cudnn'.")
    positive_ints(config, ("model.embed_dim", "data.image_size", "data.context_length", "model.vision.image_size",
                           "model.vision.width", "model.vision.heads", "model.text.vocab_size",
                           "model.text.context_length", "model.text.width", "model.text.layers",
                           "model.text.heads"))
    check_divisible(config, "model.text.width", "model.text.heads")
    check_ranges(config, {"model.text.mlp_ratio": (1e-6, float("inf"), False)})
    if m.vision.type == "vit":
        positive_ints(config, ("model.vision.patch_size", "model.vision.layers"))
        check_divisible(config, "model.vision.width", "model.vision.heads")
        check_ranges(config, {"model.vision.mlp_ratio": (1e-6, float("inf"), False)})
        if m.vision.get("pool", "cls") not in ("cls", "gap"):
            raise ValueError(f"config.model.vision.pool={m.vision.pool!r}; choose 'cls' or 'gap'.")
    elif m.vision.type == "resnet":
        layers = list(m.vision.layers)
        if not layers or not all(isinstance(n, int) and n > 0 for n in layers):
            raise ValueError(f"config.model.vision.layers={layers!r} must be a non-empty list of positive integers.")
        if m.vision.width % 2 or (m.vision.width * 32) % m.vision.heads:
            raise ValueError(f"config.model.vision.width={m.vision.width} must be even and width*32 divisible by "
                             f"config.model.vision.heads={m.vision.heads}.")
    else:
        raise ValueError(f"config.model.vision.type={m.vision.type!r}; choose 'vit' or 'resnet'.")
    if config.eval.get("zeroshot"):
        for key in ("class_names", "templates"):
            if not config.eval.get(key):
                raise ValueError(f"config.eval.{key} is empty; zero-shot eval needs it (or set "
                                 "config.eval.zeroshot=False).")
        if not all("{}" in t for t in config.eval.templates):
            raise ValueError("config.eval.templates: every template needs a '{}' for the class name.")
    if m.vision.image_size != d.image_size:
        raise ValueError(
            f"config.model.vision.image_size={m.vision.image_size} differs from config.data.image_size={d.image_size}."
        )
    if m.vision.type == "vit" and m.vision.image_size % m.vision.patch_size:
        raise ValueError(
            f"config.model.vision.image_size={m.vision.image_size} is not a multiple of "
            f"config.model.vision.patch_size={m.vision.patch_size}."
        )
    if m.text.context_length < d.context_length:
        raise ValueError(
            f"config.data.context_length={d.context_length} exceeds config.model.text.context_length="
            f"{m.text.context_length}."
        )
    from colearn_jax.data.tokenizers import ByteTokenizer, ClipBpeTokenizer  # noqa: PLC0415

    vocab = {"byte": ByteTokenizer.vocab_size, "clip_bpe": ClipBpeTokenizer.vocab_size}.get(d.tokenizer)
    if d.tokenizer == "words":
        vocab = tokenizer(config).vocab_size  # a word list: its size is known once it is read
    if vocab is None:
        raise ValueError(f"config.data.tokenizer={d.tokenizer!r}; choose 'byte', 'words' or 'clip_bpe'.")
    if vocab > m.text.vocab_size:
        raise ValueError(
            f"config.model.text.vocab_size={m.text.vocab_size} is smaller than the {d.tokenizer!r} "
            f"tokenizer's vocabulary ({vocab})."
        )


def describe_metrics(config):
    from colearn_jax.evals.clip_eval import metric_specs  # noqa: PLC0415

    return metric_specs(config)


def make_evaluator(config, mesh, rules):
    from colearn_jax.evals.clip_eval import make_clip_evaluator  # noqa: PLC0415

    ctx = DataContext(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    return make_clip_evaluator(config, mesh, rules, eval_data=lambda split=None: make_eval_data(config, ctx, split))


@register("clip")
def clip_system() -> System:
    return System(
        name="clip",
        build_model=build_model,
        make_objective=make_objective,
        example_batch=example_batch,
        make_train_data=make_train_data,
        make_eval_data=make_eval_data,
        make_evaluator=make_evaluator,
        describe_metrics=describe_metrics,
        validate_config=validate_config,
        rng_streams=("dropout",),
        make_batch_transform=make_batch_transform,
        constrain_params=clamp_logit_scale,
        # paths, the eval split and how the forward is computed (same parameters, same results)
        resume_free_keys=("data.data_dir", "data.vocab_path", "data.eval_split", "model.remat_policy",
                          "model.attention_impl"),
    )
