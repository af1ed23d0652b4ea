"""CoCa as a trainable system (Yu et al. 2022, Sec. 3): the model from config, the objective
λ_con · contrastive + λ_cap · captioning (Sec. 3.1, Eq. 3), CLIP's image+caption data pipeline, its
config checks and its evaluator (zero-shot classification through the contrastive path, captions
through the decoding engine).

Beyond the paper, both off by default: + λ_tag · an image-tagging loss (Tag2Text-style: the tag head
against the tag ids an example carries in `data.tag_key`), and on-device affine warps of the training
images (`augment.affine`, with an optional elastic distortion: `augment.elastic_alpha`).

Config layout: colearn_jax/configs/coca.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from colearn_jax import sharding
from colearn_jax.losses import contrastive, lm
from colearn_jax.models import DataContext, System, clip_system, register
from colearn_jax.models.coca import POOLERS, CoCa, MultimodalDecoder, clamp_logit_scale, decode_fns

PAD_ID = 0  # both tokenizers pad with 0
TAG_LOSSES = ("softmax", "sigmoid")
TAG_POOLS = ("mean", "max")


def build_model(config) -> CoCa:
    from colearn_jax.nn.text import TextTransformer  # noqa: PLC0415
    from colearn_jax.nn.vit import VisionTransformer  # noqa: PLC0415

    m = config.model
    v, t, d = m.vision, m.text, m.decoder
    dtype = clip_system.get_dtype(m.dtype)
    common = dict(activation=m.activation, scan=m.scan, remat_policy=m.remat_policy, attention_impl=m.attention_impl,
                  dropout=m.get("dropout", 0.0), dtype=dtype)
    vision = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width, num_layers=v.layers,
                               num_heads=v.heads, mlp_ratio=v.get("mlp_ratio", 4.0), pool="none",
                               stem=v.get("stem", "patch"), **common)
    text = TextTransformer(vocab_size=t.vocab_size, context_length=t.context_length, width=t.width,
                           num_layers=t.layers, num_heads=t.heads, mlp_ratio=t.get("mlp_ratio", 4.0),
                           output_dim=m.embed_dim, cls_token=True, pad_id=PAD_ID, legacy_cls_mask=m.legacy_cls_mask,
                           **common)
    decoder = MultimodalDecoder(vocab_size=t.vocab_size, width=t.width, num_layers=d.layers, num_heads=d.heads,
                                mlp_ratio=d.get("mlp_ratio", 4.0), memory_ln=d.get("memory_ln", True), **common)
    return CoCa(vision=vision, text=text, decoder=decoder, embed_dim=m.embed_dim, pooler=m.pooler,
                num_queries=m.num_queries, pooler_heads=m.pooler_heads, tie_embeddings=m.tie_embeddings,
                init_logit_scale=m.init_logit_scale, num_tags=m.get("num_tags", 0),
                tag_pool=m.get("tag_pool", "mean"), dtype=dtype)


def tag_key(config) -> str | None:
    """The example field holding an image's tags (class ids, -1 padded) when the tagging loss is on."""
    return config.data.get("tag_key") if config.loss.get("lambda_tag", 0.0) else None


def tag_targets(ids: jax.Array, num_tags: int) -> jax.Array:
    """ids int [b, slots] (-1 = no tag) -> multi-hot float32 [b, num_tags] (a tag named twice counts once)."""
    return jax.nn.one_hot(ids, num_tags, dtype=jnp.float32).max(axis=1)


def example_batch(config, batch_size: int) -> dict:
    batch = clip_system.example_batch(config, batch_size)
    if key := tag_key(config):
        batch[key] = jax.ShapeDtypeStruct((batch_size, int(config.data.tag_slots)), jnp.int32)
    return batch


def make_batch_transform(config):
    """On device, first thing in the step: CLIP-normalise uint8 images (`data.normalize_on_device`), then,
    with `augment.affine`, warp each image by a small random rotation / scale / shear, and an elastic
    distortion with `augment.elastic_alpha` > 0 (the caption stays true: the layout keeps its
    left-to-right order for small angles and displacements)."""
    normalise = clip_system.make_batch_transform(config)
    aug = config.get("augment")
    if not (aug and aug.get("affine")):
        return normalise
    from colearn_jax.data import augment  # noqa: PLC0415
    from colearn_jax.train.rng import per_example_keys  # noqa: PLC0415

    warp = jax.vmap(lambda image, key: augment.random_affine(
        image, key, aug.rotate, tuple(aug.scale), aug.shear, aug.get("elastic_alpha", 0.0), aug.get("elastic_sigma", 4.0)))

    def transform(batch, rngs, step):
        batch = normalise(batch, rngs, step) if normalise is not None else batch
        images = batch["image"]
        keys = per_example_keys(rngs["augment"], images.shape[0])
        return {**batch, "image": warp(images.astype(jnp.float32), keys).astype(images.dtype)}

    return transform


def make_train_data(config, ctx: DataContext):
    from colearn_jax.data import make_train_iterator  # noqa: PLC0415 (imports TFDS and grain)

    key = tag_key(config)
    return make_train_iterator(config.data, clip_system.tokenizer(config), seed=ctx.seed,
                               process_index=ctx.process_index, process_count=ctx.process_count,
                               extra_keys=(key,) if key else ())


def make_objective(config, mesh=None, rules=None):
    loss_cfg = config.loss
    axes = sharding.batch_axes(rules) if rules is not None else ("data", "fsdp")
    kw = dict(gather=loss_cfg.gather, mesh=mesh, batch_axes=axes)
    lam_con, lam_cap, smoothing = float(loss_cfg.lambda_con), float(loss_cfg.lambda_cap), float(loss_cfg.label_smoothing)
    lam_tag, key = float(loss_cfg.get("lambda_tag", 0.0)), tag_key(config)

    def objective(outputs, batch, rngs, step):
        con, metrics = contrastive.clip_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"],
                                             **kw)
        cap, cap_metrics = lm.caption_loss(outputs["logits"], batch["text"][:, 1:], pad_id=PAD_ID,
                                           label_smoothing=smoothing)
        loss, metrics = lam_con * con + lam_cap * cap, {**metrics, **cap_metrics, "contrastive_loss": con}
        if key:
            logits = outputs["tag_logits"].astype(jnp.float32)
            targets = tag_targets(batch[key], logits.shape[-1])
            if loss_cfg.get("tag_loss", "sigmoid") == "softmax":
                share = targets / jnp.maximum(targets.sum(-1, keepdims=True), 1.0)  # untagged rows: 0
                tag = optax.softmax_cross_entropy(logits, share).mean()
            else:
                tag = optax.sigmoid_binary_cross_entropy(logits, targets).mean()
            hit = jnp.take_along_axis(targets, logits.argmax(-1)[:, None], -1).mean()  # best tag is present
            loss, metrics = loss + lam_tag * tag, {**metrics, "tag_loss": tag, "tag_top1": hit}
        return loss, metrics

    return objective


def validate_config(config) -> None:
    """CoCa's own fields; the image+caption data and tower fields are checked as CLIP checks them."""
    from colearn_jax.config_checks import check_divisible, check_ranges, positive_ints  # noqa: PLC0415

    m = config.model
    if m.pooler not in POOLERS:
        raise ValueError(f"config.model.pooler={m.pooler!r}; choose one of {POOLERS}.")
    positive_ints(config, ("model.num_queries", "model.pooler_heads", "model.decoder.layers", "model.decoder.heads",
                           "model.vision.layers", "model.vision.patch_size"))
    if m.pooler == "open_clip" and m.num_queries < 2:
        raise ValueError("config.model.num_queries must be >= 2 with pooler='open_clip' (query 0 is the "
                         "contrastive one, the rest feed the decoder).")
    check_divisible(config, "model.embed_dim", "model.pooler_heads")
    check_divisible(config, "model.text.width", "model.decoder.heads")
    check_ranges(config, {"loss.lambda_con": (0.0, float("inf"), True), "loss.lambda_cap": (0.0, float("inf"), True),
                          "loss.label_smoothing": (0.0, 1.0, False)})
    if config.loss.gather not in contrastive.GATHER_MODES:
        raise ValueError(f"config.loss.gather={config.loss.gather!r}; choose one of {contrastive.GATHER_MODES}.")
    if config.loss.get("lambda_tag", 0.0):
        check_ranges(config, {"loss.lambda_tag": (0.0, float("inf"), True)})
        if not config.data.get("tag_key"):
            raise ValueError("config.loss.lambda_tag > 0 needs config.data.tag_key (the example field of tag ids).")
        positive_ints(config, ("model.num_tags", "data.tag_slots"))
        if config.loss.get("tag_loss", "sigmoid") not in TAG_LOSSES:
            raise ValueError(f"config.loss.tag_loss={config.loss.tag_loss!r}; choose one of {TAG_LOSSES}.")
    if m.get("tag_pool", "mean") not in TAG_POOLS:
        raise ValueError(f"config.model.tag_pool={m.tag_pool!r}; choose one of {TAG_POOLS}.")
    shim = config.copy_and_resolve_references()
    shim.unlock()
    shim.model.vision.type = "vit"
    shim.loss.name = "clip"
    shim.eval.zeroshot = False  # checked below, on its own data
    clip_system.validate_config(shim)
    if config.eval.get("zeroshot"):
        for key in ("class_names", "templates"):
            if not config.eval.get(key):
                raise ValueError(f"config.eval.{key} is empty; zero-shot eval needs it (or set config.eval.zeroshot=False).")
    if config.eval.get("captions"):
        new = int(config.eval.caption_max_new_tokens)
        if not 1 <= new <= m.text.context_length - 1:
            raise ValueError(f"config.eval.caption_max_new_tokens={new} must be in [1, model.text.context_length - 1 "
                             f"= {m.text.context_length - 1}] (the start token takes one position).")
        if config.eval.get("caption_method", "greedy") not in ("greedy", "beam"):
            raise ValueError(f"config.eval.caption_method={config.eval.caption_method!r}; choose 'greedy' or 'beam'.")


def describe_metrics(config):
    from colearn_jax.evals import caption_eval, clip_eval  # noqa: PLC0415

    specs = clip_eval.metric_specs(config)
    specs.update(caption_eval.metric_specs(config))
    return specs


def zeroshot_config(config):
    """The config the CLIP evaluator (and the notebook) reads for zero-shot: the labelled data named by
    eval.zeroshot_data (its eval.zeroshot_split), or the eval split itself when that is empty."""
    c = config.copy_and_resolve_references()
    c.unlock()
    if c.eval.get("zeroshot_data"):
        c.data.update(name=c.eval.zeroshot_data, label_key="label", text_key="caption", mixture=[])
        c.data.eval_split = c.eval.get("zeroshot_split", "test")
    return c


def make_evaluator(config, mesh, rules):
    from colearn_jax.evals import DescribedEvaluator, caption_eval, clip_eval  # noqa: PLC0415

    ctx = DataContext(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    parts = []
    if config.eval.get("zeroshot") or config.eval.get("retrieval"):
        zs = zeroshot_config(config)
        parts.append(clip_eval.make_clip_evaluator(
            zs, mesh, rules, eval_data=lambda split=None: clip_system.make_eval_data(zs, ctx, split)))
    if config.eval.get("captions"):
        parts.append(caption_eval.make_caption_evaluator(
            config, mesh, rules, lambda: clip_system.make_eval_data(config, ctx, None), decode_fns,
            clip_system.tokenizer(config)))

    def evaluate(model, variables):
        metrics = {}
        for part in parts:
            metrics.update(part(model, variables))
        return metrics

    return DescribedEvaluator(evaluate, describe_metrics(config))


@register("coca")
def coca_system() -> System:
    return System(
        name="coca",
        build_model=build_model,
        make_objective=make_objective,
        example_batch=example_batch,
        make_train_data=make_train_data,
        make_eval_data=clip_system.make_eval_data,
        make_evaluator=make_evaluator,
        describe_metrics=describe_metrics,
        validate_config=validate_config,
        rng_streams=("dropout", "augment"),
        make_batch_transform=make_batch_transform,
        constrain_params=clamp_logit_scale,
        resume_free_keys=("data.data_dir", "data.vocab_path", "data.eval_split", "model.remat_policy",
                          "model.attention_impl", "eval.*"),
    )
