"""CLIP as a trainable system: tower construction from config, the contrastive objective, and eval.

The config layout (configs/clip.py): `config.model` {embed_dim, activation, dtype, scan, remat_policy,
attention_impl, vision{type, ...}, text{...}, init_logit_scale, init_logit_bias}, `config.loss`
{name: clip|siglip, gather}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from colearn_jax import sharding
from colearn_jax.losses import contrastive
from colearn_jax.models import System, register
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
            activation=m.activation, pool=v.get("pool", "cls"), scan=m.scan, remat_policy=m.remat_policy,
            attention_impl=m.attention_impl, **common,
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
        scan=m.scan, remat_policy=m.remat_policy, attention_impl=m.attention_impl, dtype=get_dtype(m.dtype),
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
        def objective(outputs, batch):
            return contrastive.clip_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], **kw)
    elif loss_cfg.name == "siglip":
        if config.model.get("init_logit_bias") is None:
            raise ValueError("config.loss.name='siglip' needs config.model.init_logit_bias (e.g. -10.0).")

        def objective(outputs, batch):
            return contrastive.siglip_loss(
                outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], outputs["logit_bias"], **kw
            )
    else:
        raise ValueError(f"config.loss.name={loss_cfg.name!r}; choose 'clip' or 'siglip'.")
    return objective


def example_batch(config, batch_size: int) -> dict:
    v, t = config.model.vision, config.model.text
    return {
        "image": jax.ShapeDtypeStruct((batch_size, v.image_size, v.image_size, 3), jnp.float32),
        "text": jax.ShapeDtypeStruct((batch_size, t.context_length), jnp.int32),
    }


def make_evaluator(config, mesh, rules):
    from colearn_jax.evals.clip_eval import make_clip_evaluator  # noqa: PLC0415

    return make_clip_evaluator(config, mesh, rules)


@register("clip")
def clip_system() -> System:
    return System(
        name="clip",
        build_model=build_model,
        make_objective=make_objective,
        example_batch=example_batch,
        constrain_params=clamp_logit_scale,
        make_evaluator=make_evaluator,
    )
