"""CoCa as a trainable system (Yu et al. 2022, Sec. 3): the model from config, the objective
λ_con · contrastive + λ_cap · captioning (Sec. 3.1, Eq. 3), CLIP's image+caption data pipeline, its
config checks and its evaluator (zero-shot classification through the contrastive path, captions
through the decoding engine).

Beyond the paper, all off by default: + λ_tag · an image-tagging loss (Tag2Text-style: the tag head
against the tag ids an example carries in `data.tag_key`); + λ_token_tag · a per-token tagging loss
(token labelling, Jiang et al. 2021, Sec. 3: every ViT patch token is classified with the same tag head
against the share of each digit's ink in its patch, read from the per-pixel instance map in
`data.segmentation_key` and the instances' classes in `data.tag_key`); and on-device affine warps of the
training images (`augment.affine`, with an optional elastic distortion: `augment.elastic_alpha`), which
warp the token targets' ink maps with the image.

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
    """The example field holding an image's tags (class ids, -1 padded) when either tagging loss is on (the
    per-token one reads instance i's class from tag i)."""
    on = config.loss.get("lambda_tag", 0.0) or config.loss.get("lambda_token_tag", 0.0)
    return config.data.get("tag_key") if on else None


def tag_targets(ids: jax.Array, num_tags: int) -> jax.Array:
    """ids int [b, slots] (-1 = no tag) -> multi-hot float32 [b, num_tags] (a tag named twice counts once)."""
    return jax.nn.one_hot(ids, num_tags, dtype=jnp.float32).max(axis=1)


def segmentation_key(config) -> str | None:
    """The example field holding the per-pixel instance map (0 = background, i + 1 = instance i, whose class
    is tag i of `data.tag_key`) when the per-token tagging loss is on."""
    return config.data.get("segmentation_key") if config.loss.get("lambda_token_tag", 0.0) else None


# A patch token is a tagging target when digit ink covers at least this share of its pixels.
TOKEN_MIN_INK = 0.1


def instance_maps(segmentation: jax.Array, slots: int) -> jax.Array:
    """segmentation int [b, H, W, 1] (0 = background, i + 1 = instance i) -> float32 [b, H, W, slots]: one
    channel per instance, 1 where its ink is on top."""
    return jax.nn.one_hot(segmentation[..., 0].astype(jnp.int32) - 1, slots, dtype=jnp.float32)  # -1: zeros


def patch_shares(maps: jax.Array, patch: int) -> jax.Array:
    """[b, H, W, K] per-pixel maps -> [b, (H/patch)·(W/patch), K] their means over each patch, in the ViT's
    row-major token order."""
    b, h, w, k = maps.shape
    cells = maps.reshape(b, h // patch, patch, w // patch, patch, k).mean(axis=(2, 4))
    return cells.reshape(b, -1, k)


def class_shares(instance_shares: jax.Array, instance_classes: jax.Array, num_tags: int) -> jax.Array:
    """Per-token instance shares [b, n, slots] and the instances' classes int [b, slots] (-1 = none) ->
    per-token class shares [b, n, num_tags] (two instances of one class add up)."""
    return jnp.einsum("bns,bsk->bnk", instance_shares, jax.nn.one_hot(instance_classes, num_tags, dtype=jnp.float32))


def example_batch(config, batch_size: int) -> dict:
    batch = clip_system.example_batch(config, batch_size)
    if key := tag_key(config):
        batch[key] = jax.ShapeDtypeStruct((batch_size, int(config.data.tag_slots)), jnp.int32)
    if key := segmentation_key(config):
        s = config.data.image_size
        batch[key] = jax.ShapeDtypeStruct((batch_size, s, s, 1), jnp.uint8)
    return batch


def make_batch_transform(config):
    """On device, first thing in the step: CLIP-normalise uint8 images (`data.normalize_on_device`), then,
    with `augment.affine`, warp each image by a small random rotation / scale / shear, and an elastic
    distortion with `augment.elastic_alpha` > 0 (the caption stays true: the layout keeps its
    left-to-right order for small angles and displacements). With the per-token tagging loss, the
    batch gains "token_tags" [b, tokens, num_tags]: each patch's share of each class's ink, from the
    instance map warped together with its image (one resampling of the stacked channels)."""
    normalise = clip_system.make_batch_transform(config)
    aug = config.get("augment")
    affine, seg_key = bool(aug and aug.get("affine")), segmentation_key(config)
    if not (affine or seg_key):
        return normalise
    from colearn_jax.data import augment  # noqa: PLC0415
    from colearn_jax.train.rng import per_example_keys  # noqa: PLC0415

    if affine:
        warp = jax.vmap(lambda image, key: augment.random_affine(
            image, key, aug.rotate, tuple(aug.scale), aug.shear, aug.get("elastic_alpha", 0.0),
            aug.get("elastic_sigma", 4.0)))
    num_tags, patch = int(config.model.get("num_tags", 0)), int(config.model.vision.patch_size)
    slots = int(config.data.get("tag_slots", 0))

    def transform(batch, rngs, step):
        batch = normalise(batch, rngs, step) if normalise is not None else batch
        images = batch["image"]
        stack = images.astype(jnp.float32)
        if seg_key:  # the instance channels are warped with the image, then pooled per patch
            stack = jnp.concatenate([stack, instance_maps(batch[seg_key], slots)], axis=-1)
        if affine:
            stack = warp(stack, per_example_keys(rngs["augment"], images.shape[0]))
        out = {**batch, "image": stack[..., :images.shape[-1]].astype(images.dtype)}
        if seg_key:
            shares = patch_shares(stack[..., images.shape[-1]:], patch)
            out["token_tags"] = class_shares(shares, batch[tag_key(config)], num_tags)
        return out

    return transform


def make_train_data(config, ctx: DataContext):
    from colearn_jax.data import make_train_iterator  # noqa: PLC0415 (imports TFDS and grain)

    extra = tuple(k for k in (tag_key(config), segmentation_key(config)) if k)
    return make_train_iterator(config.data, clip_system.tokenizer(config), seed=ctx.seed,
                               process_index=ctx.process_index, process_count=ctx.process_count,
                               extra_keys=extra)


def make_objective(config, mesh=None, rules=None):
    loss_cfg = config.loss
    axes = sharding.batch_axes(rules) if rules is not None else ("data", "fsdp")
    kw = dict(gather=loss_cfg.gather, mesh=mesh, batch_axes=axes)
    lam_con, lam_cap, smoothing = float(loss_cfg.lambda_con), float(loss_cfg.lambda_cap), float(loss_cfg.label_smoothing)
    lam_tag, key = float(loss_cfg.get("lambda_tag", 0.0)), tag_key(config)
    key = key if lam_tag else None
    lam_token = float(loss_cfg.get("lambda_token_tag", 0.0)) if segmentation_key(config) else 0.0

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
        if lam_token:
            token, token_metrics = token_tag_loss(outputs["token_tag_logits"], batch["token_tags"])
            loss, metrics = loss + lam_token * token, {**metrics, **token_metrics}
        return loss, metrics

    return objective


def token_tag_loss(logits: jax.Array, shares: jax.Array) -> tuple[jax.Array, dict]:
    """Per-token tagging (token labelling): logits [b, n, K] of the patch tokens against shares [b, n, K]
    (each class's share of the patch's pixels). Softmax cross-entropy against the shares renormalised
    over the classes, averaged over the tokens with at least TOKEN_MIN_INK ink; tokens without ink carry
    no target."""
    logits = logits.astype(jnp.float32)
    ink = shares.sum(-1)
    target = shares / jnp.maximum(ink, 1e-6)[..., None]
    weight = (ink >= TOKEN_MIN_INK).astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = (optax.softmax_cross_entropy(logits, target) * weight).sum() / count
    hit = (logits.argmax(-1) == target.argmax(-1)).astype(jnp.float32)
    return loss, {"token_tag_loss": loss, "token_tag_top1": (hit * weight).sum() / count}


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
    if config.loss.get("lambda_token_tag", 0.0):
        check_ranges(config, {"loss.lambda_token_tag": (0.0, float("inf"), True)})
        for key, what in (("segmentation_key", "the per-pixel instance map"), ("tag_key", "the instances' classes")):
            if not config.data.get(key):
                raise ValueError(f"config.loss.lambda_token_tag > 0 needs config.data.{key} ({what}).")
        positive_ints(config, ("model.num_tags", "data.tag_slots"))
        check_divisible(config, "data.image_size", "model.vision.patch_size")
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
