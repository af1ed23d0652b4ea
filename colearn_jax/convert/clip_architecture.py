"""The architecture of a CLIP checkpoint, as a plain dict, from its weights' shapes and model-config JSON.

    arch = infer_openai_architecture(state_dict)          # OpenAI / open_clip key names, shapes only
    arch = apply_open_clip_config(arch, open_clip_json)   # checked against the shapes; heads, activation
    arch = hf_architecture(state_dict, hf_config_json)    # Hugging Face CLIPModel
    set_heads(arch, vision_heads, text_heads)             # explicit head counts; checks every tower

`arch` = {"embed_dim", "activation", "logit_bias", "vision": {...}, "text": {...}} with the fields of
`config.model.vision` / `config.model.text`; `colearn_jax.convert.clip_config.make_config` turns it into a
colearn_jax config. No shape reveals a head count: OpenAI's convention (width / 64) is the default
and the model config, or an explicit override, sets it. Features colearn_jax's CLIP does not have are
refused here with a message naming them.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from colearn_jax.convert import resnet as resnet_convert
from colearn_jax.convert.reading import ConversionError, StateDict, count_layers

HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
LN_EPS = 1e-5


def mlp_ratio(mlp_dim: int, width: int) -> float:
    """The ratio r with int(width * r) == mlp_dim (how colearn_jax sizes the MLP)."""
    ratio = mlp_dim / width
    if int(width * ratio) != mlp_dim:  # float rounding: nudge so that int(width * ratio) == mlp_dim
        ratio = (mlp_dim + 0.5) / width
    return ratio


def check_heads(width: int, heads: int, what: str):
    """Raises ConversionError unless `heads` divides `width`, pointing at the override."""
    if heads <= 0 or width % heads:
        raise ConversionError(
            f"{what}: {heads} heads do not divide width {width} (no weight shape reveals the head count; "
            f"pass vision_heads= / text_heads= (--vision_heads / --text_heads) to set it)."
        )


# ------------------------------------------------------------------------------------------------
# OpenAI / open_clip key names: shapes, then open_clip's model config


def infer_openai_architecture(sd: Mapping[str, Any]) -> dict:
    """Architecture read from an OpenAI / open_clip state dict's shapes (heads: width / 64)."""
    keys = StateDict(sd)
    arch: dict[str, Any] = {}
    if "visual.proj" in sd:
        width, in_ch, ph, pw = keys.shape("visual.conv1.weight")
        if ph != pw or in_ch != 3:
            raise ConversionError(f"visual.conv1.weight {keys.shape('visual.conv1.weight')}: need a square RGB patch.")
        n_pos = keys.shape("visual.positional_embedding")[0]
        grid = math.isqrt(n_pos - 1)
        if grid * grid != n_pos - 1:
            raise ConversionError(f"visual.positional_embedding has {n_pos} rows: not 1 + a square grid.")
        layers = count_layers(sd, r"visual\.transformer\.resblocks\.(\d+)\.")
        mlp_dim = keys.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
        arch["vision"] = dict(type="vit", image_size=ph * grid, patch_size=ph, width=width, layers=layers,
                              heads=width // 64, mlp_ratio=mlp_ratio(mlp_dim, width), pool="cls")
        arch["embed_dim"] = keys.shape("visual.proj")[1]
    elif "visual.attnpool.c_proj.weight" in sd:
        rn = resnet_convert.modified_resnet_config_from_torch(sd, "visual.")
        arch["vision"] = dict(type="resnet", image_size=rn["image_size"], layers=list(rn["layers"]),
                              width=rn["width"], heads=rn["num_heads"])
        arch["embed_dim"] = rn["output_dim"]
    else:
        raise ConversionError(
            "no CLIP image tower found: expected visual.proj (ViT) or visual.attnpool.* (ModifiedResNet); "
            f"keys start with {sorted({k.split('.')[0] for k in sd})[:8]}. (timm / other towers are not supported.)"
        )
    vocab, width = keys.shape("token_embedding.weight")
    context = keys.shape("positional_embedding")[0]
    layers = count_layers(sd, r"transformer\.resblocks\.(\d+)\.")
    if layers == 0:
        raise ConversionError("no text transformer layers (transformer.resblocks.*) in the state dict.")
    mlp_dim = keys.shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
    arch["text"] = dict(vocab_size=vocab, context_length=context, width=width, layers=layers,
                        heads=max(width // 64, 1), mlp_ratio=mlp_ratio(mlp_dim, width))
    text_embed = keys.shape("text_projection")[1]
    if text_embed != arch["embed_dim"]:
        raise ConversionError(f"image embedding {arch['embed_dim']} != text embedding {text_embed}.")
    arch["logit_bias"] = "logit_bias" in sd
    arch["activation"] = "quick_gelu"
    return arch


def apply_open_clip_config(arch: dict, cfg: dict) -> dict:
    """Checks the JSON against the shapes, takes heads / activation / pooling from it."""
    v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    unsupported = []
    for key in ("timm_model_name", "attentional_pool", "ls_init_value", "no_ln_pre", "act_kwargs",
                "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                "scale_attn", "scale_fc"):
        if v.get(key) and not (key == "block_type" and v[key] == "default"):
            unsupported.append(f"vision_cfg.{key}={v[key]!r}")
    for key in ("hf_model_name", "embed_cls", "no_causal_mask", "ls_init_value", "proj_bias", "act_kwargs",
                "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                "scale_attn", "scale_fc"):
        if t.get(key) and not (key == "block_type" and t[key] == "default"):
            unsupported.append(f"text_cfg.{key}={t[key]!r}")
    if t.get("proj_type", "linear") != "linear":
        unsupported.append(f"text_cfg.proj_type={t['proj_type']!r}")
    for part, c in (("vision_cfg", v), ("text_cfg", t)):
        eps = (c.get("norm_kwargs") or {}).get("eps", LN_EPS)
        if abs(eps - LN_EPS) > 1e-12:
            unsupported.append(f"{part}.norm_kwargs.eps={eps}")
    pool = t.get("pool_type", "argmax")
    vocab = arch["text"]["vocab_size"]
    if pool == "eos" and t.get("eos_id", 2) != vocab - 1:
        unsupported.append(f"text_cfg.pool_type='eos' with eos_id={t.get('eos_id', 2)} (only argmax pooling, "
                           f"i.e. eos_id = vocab_size - 1 = {vocab - 1})")
    elif pool not in ("argmax", "eos"):
        unsupported.append(f"text_cfg.pool_type={pool!r} (only argmax)")
    vpool = v.get("pool_type", "tok")
    if arch["vision"]["type"] == "vit":
        if vpool == "avg" and v.get("final_ln_after_pool"):
            arch["vision"]["pool"] = "gap"
        elif vpool != "tok":
            unsupported.append(f"vision_cfg.pool_type={vpool!r}"
                               + (" without final_ln_after_pool" if vpool == "avg" else ""))
    if unsupported:
        raise ConversionError("open_clip config uses features colearn_jax's CLIP does not have: "
                              + ", ".join(unsupported))

    def expect(what, from_cfg, from_weights):
        if from_cfg is not None and int(from_cfg) != int(from_weights):
            raise ConversionError(f"model config says {what}={from_cfg} but the weights have {from_weights}.")

    expect("embed_dim", cfg.get("embed_dim"), arch["embed_dim"])
    av, at = arch["vision"], arch["text"]
    head_width = int(v.get("head_width", 64))
    if av["type"] == "vit":
        if isinstance(v.get("layers"), (list, tuple)):
            raise ConversionError("model config describes a ModifiedResNet but the weights hold a ViT.")
        expect("vision_cfg.width", v.get("width"), av["width"])
        expect("vision_cfg.layers", v.get("layers"), av["layers"])
        expect("vision_cfg.patch_size", v.get("patch_size"), av["patch_size"])
        image_size = v.get("image_size")
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                raise ConversionError(f"non-square vision_cfg.image_size={image_size} is not supported.")
            image_size = image_size[0]
        if image_size is not None:
            if int(image_size) // av["patch_size"] != av["image_size"] // av["patch_size"]:
                raise ConversionError(f"vision_cfg.image_size={image_size} does not match the weights' "
                                      f"{av['image_size'] // av['patch_size']}^2 patch grid.")
            av["image_size"] = int(image_size)
        av["heads"] = av["width"] // head_width
        check_heads(av["width"], av["heads"], "vision")
    else:
        if not isinstance(v.get("layers"), (list, tuple)):
            raise ConversionError("model config describes a ViT but the weights hold a ModifiedResNet.")
        if list(v["layers"]) != list(av["layers"]):
            raise ConversionError(f"vision_cfg.layers={v['layers']} but the weights have {av['layers']}.")
        expect("vision_cfg.width", v.get("width"), av["width"])
        av["heads"] = av["width"] * 32 // head_width
    expect("text_cfg.width", t.get("width"), at["width"])
    expect("text_cfg.layers", t.get("layers"), at["layers"])
    expect("text_cfg.context_length", t.get("context_length"), at["context_length"])
    expect("text_cfg.vocab_size", t.get("vocab_size"), at["vocab_size"])
    if "heads" in t:
        at["heads"] = int(t["heads"])
    check_heads(at["width"], at["heads"], "text")
    arch["activation"] = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    return arch


# ------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel: shapes + config.json

_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, eos_token_id=49407)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _hf_subconfig(cfg: Mapping[str, Any], name: str, defaults: dict) -> dict:
    out = dict(defaults)
    out.update(cfg.get(f"{name}_config") or {})
    out.update(cfg.get(f"{name}_config_dict") or {})  # older configs keep their overrides here
    return out


def hf_architecture(sd: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    """Architecture of a Hugging Face `CLIPModel` from its state dict's shapes and its config.json dict."""
    model_type = cfg.get("model_type", "clip")
    if model_type != "clip":
        raise ConversionError(f"config.json has model_type={model_type!r}; only Hugging Face 'clip' (CLIPModel) "
                              "checkpoints are supported.")
    tc = _hf_subconfig(cfg, "text", _HF_TEXT_DEFAULTS)
    vc = _hf_subconfig(cfg, "vision", _HF_VISION_DEFAULTS)
    keys = StateDict(sd)
    v = "vision_model."
    width, in_ch, ph, pw = keys.shape(v + "embeddings.patch_embedding.weight")
    if ph != pw or in_ch != 3:
        raise ConversionError("need a square RGB patch embedding.")
    n_pos = keys.shape(v + "embeddings.position_embedding.weight")[0]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ConversionError(f"vision position embedding has {n_pos} rows: not 1 + a square grid.")
    image_size = vc.get("image_size", ph * grid)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ConversionError(f"non-square vision image_size={image_size} is not supported.")
        image_size = image_size[0]
    if int(image_size) // ph != grid:
        image_size = ph * grid
    vlayers = count_layers(sd, r"vision_model\.encoder\.layers\.(\d+)\.")
    vmlp = keys.shape(v + "encoder.layers.0.mlp.fc1.weight")[0]
    vheads = int(vc["num_attention_heads"])
    check_heads(width, vheads, "vision")
    embed_dim = keys.shape("visual_projection.weight")[0]

    t = "text_model."
    vocab, twidth = keys.shape(t + "embeddings.token_embedding.weight")
    context = keys.shape(t + "embeddings.position_embedding.weight")[0]
    tlayers = count_layers(sd, r"text_model\.encoder\.layers\.(\d+)\.")
    tmlp = keys.shape(t + "encoder.layers.0.mlp.fc1.weight")[0]
    theads = int(tc["num_attention_heads"])
    check_heads(twidth, theads, "text")
    if keys.shape("text_projection.weight")[0] != embed_dim:
        raise ConversionError("text and image projections have different output widths.")

    acts = {tc["hidden_act"], vc["hidden_act"]}
    if len(acts) != 1:
        raise ConversionError(f"text and vision use different activations {sorted(acts)}; colearn_jax's CLIP has one.")
    act = acts.pop()
    if act not in HF_ACTIVATIONS:
        raise ConversionError(f"hidden_act={act!r} is not supported (known: {sorted(HF_ACTIVATIONS)}).")
    for name, c in (("text", tc), ("vision", vc)):
        if abs(float(c.get("layer_norm_eps") or LN_EPS) - LN_EPS) > 1e-12:
            raise ConversionError(f"{name} layer_norm_eps={c['layer_norm_eps']} (colearn_jax uses {LN_EPS}).")
    eos = tc.get("eos_token_id")
    if eos != 2 and eos != vocab - 1:
        raise ConversionError(
            f"text eos_token_id={eos!r}: Hugging Face pools at the first eos_token_id, colearn_jax at argmax(ids); "
            f"they agree only for eos_token_id == vocab_size - 1 ({vocab - 1}) or the legacy eos_token_id == 2."
        )
    return dict(
        embed_dim=embed_dim,
        activation=HF_ACTIVATIONS[act],
        logit_bias=False,
        vision=dict(type="vit", image_size=int(image_size), patch_size=ph, width=width, layers=vlayers,
                    heads=vheads, mlp_ratio=mlp_ratio(vmlp, width), pool="cls"),
        text=dict(vocab_size=vocab, context_length=context, width=twidth, layers=tlayers, heads=theads,
                  mlp_ratio=mlp_ratio(tmlp, twidth)),
    )


def set_heads(arch: dict, vision_heads: int | None = None, text_heads: int | None = None) -> dict:
    """Applies explicit head counts (which no shape reveals), then checks both towers' head counts."""
    if vision_heads is not None:
        arch["vision"]["heads"] = int(vision_heads)
    if text_heads is not None:
        arch["text"]["heads"] = int(text_heads)
    if arch["vision"]["type"] == "vit":
        check_heads(arch["vision"]["width"], arch["vision"]["heads"], "vision")
    else:
        check_heads(arch["vision"]["width"] * 32, arch["vision"]["heads"], "vision attention pool")
    check_heads(arch["text"]["width"], arch["text"]["heads"], "text")
    return arch
