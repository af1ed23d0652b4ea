"""The colearn_jax config of a converted CLIP: an architecture dict (`clip_architecture.py`) laid
onto the package's CLIP `digits` preset, so a converted checkpoint is ready for inference and
fine-tuning.

    config = make_config(arch, scan=False)     # model sizes, activation, data image size / tokenizer
    print(describe(config))                    # one line: towers, sizes, activation
"""
from __future__ import annotations

import math

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The CLIP `digits` preset (colearn_jax/configs/clip.py, part of the package), unlocked: the layout
    converted checkpoints start from."""
    from colearn_jax.configs.clip import get_config  # noqa: PLC0415

    config = get_config("digits")
    config.unlock()
    return config


def make_config(arch: dict, *, scan: bool = False,
                base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The colearn_jax config (configs/clip.py layout) for an architecture dict."""
    config = base if base is not None else base_config()
    config.unlock()
    m = config.model
    m.embed_dim = int(arch["embed_dim"])
    m.activation = arch["activation"]
    m.dtype = "float32"
    m.scan = bool(scan)
    av, at = arch["vision"], arch["text"]
    if av["type"] == "vit":
        m.vision = ml_collections.ConfigDict(dict(
            type="vit", image_size=int(av["image_size"]), patch_size=int(av["patch_size"]), width=int(av["width"]),
            layers=int(av["layers"]), heads=int(av["heads"]), mlp_ratio=float(av["mlp_ratio"]), pool=av["pool"]))
    else:
        m.vision = ml_collections.ConfigDict(dict(
            type="resnet", image_size=int(av["image_size"]), layers=[int(x) for x in av["layers"]],
            width=int(av["width"]), heads=int(av["heads"])))
        config.optim.b2, config.optim.eps = 0.999, 1e-8  # CLIP's ResNet settings
    m.text = ml_collections.ConfigDict(dict(
        vocab_size=int(at["vocab_size"]), context_length=int(at["context_length"]), width=int(at["width"]),
        layers=int(at["layers"]), heads=int(at["heads"]), mlp_ratio=float(at["mlp_ratio"])))
    if arch.get("logit_bias"):
        m.init_logit_bias = -10.0
        m.init_logit_scale = math.log(10.0)
        config.loss.name = "siglip"
    config.data.image_size = int(av["image_size"])
    config.data.context_length = int(at["context_length"])
    if int(at["vocab_size"]) == 49408:
        config.data.tokenizer = "clip_bpe"
    return config


def describe(config: ml_collections.ConfigDict) -> str:
    """One line describing the converted model (the CLI prints it)."""
    m = config.model
    v, t = m.vision, m.text
    if m.name == "coca":
        d = m.decoder
        return (f"CoCa: ViT {v.image_size}px patch {v.patch_size} width {v.width} x{v.layers} ({v.heads} heads); "
                f"pooler {m.num_queries} queries ({m.pooler_heads} heads); text width {t.width} x{t.layers} "
                f"({t.heads} heads), vocab {t.vocab_size}, context {t.context_length} + CLS; decoder x{d.layers} "
                f"({d.heads} heads); embed {m.embed_dim}; {m.activation}; legacy CLS mask={m.legacy_cls_mask}; "
                f"scan={m.scan}")
    if v.type == "vit":
        vis = f"ViT {v.image_size}px patch {v.patch_size} width {v.width} x{v.layers} ({v.heads} heads)"
    else:
        vis = f"ModifiedResNet {v.image_size}px layers {tuple(v.layers)} width {v.width} ({v.heads} pool heads)"
    txt = f"text width {t.width} x{t.layers} ({t.heads} heads), vocab {t.vocab_size}, context {t.context_length}"
    return f"{vis}; {txt}; embed {m.embed_dim}; {m.activation}; scan={m.scan}"
