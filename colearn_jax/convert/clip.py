"""Import public CLIP checkpoints (OpenAI, open_clip, Hugging Face) into colearn_jax.

    python -m colearn_jax.convert --source=openai --input=ViT-B-32.pt --output=/tmp/clip_b32
    python -m colearn_jax.convert --source=open_clip --input=open_clip_model.safetensors \
        --model_config=ViT-B-16.json --output=/tmp/clip_b16
    python -m colearn_jax.convert --source=hf --input=/path/to/clip-vit-base-patch32 --output=/tmp/hf_b32

then `model, variables, config = colearn_jax.load("/tmp/clip_b32")`.

Sources:
  openai     OpenAI's released `.pt` files (TorchScript archives) or a plain state dict with OpenAI's key
             names (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`, ...). There is
             no config: the architecture is read from the tensor shapes (as OpenAI's `build_model` does;
             heads = width / 64 for both towers unless given), activation QuickGELU.
  open_clip  open_clip state dicts (`.safetensors`, `.bin`, `.pt`, training checkpoints with
             `state_dict`) - open_clip keeps OpenAI's key names (CustomTextCLIP: the text tower under
             `text.`) - plus the model-config JSON
             (`embed_dim`, `quick_gelu`, `vision_cfg`, `text_cfg`; or a hub `open_clip_config.json`
             with `model_cfg`). Without the JSON the shapes are used as for `openai`, activation GELU.
  hf         a Hugging Face `CLIPModel` directory: `config.json` + `model.safetensors` (or
             `pytorch_model.bin`, or sharded with an index).

Towers: ViT (class token, `ln_pre`, bias-free patch conv, `ln_post` on the class token or on the mean
of the patch tokens) or ModifiedResNet (through `colearn_jax.convert.resnet`); the causal text
transformer pooled at the end-of-text token. Architecture features colearn_jax's CLIP does not have
(layer scale, attentional pooler, timm / HF text towers, a text projection bias, ...) are refused with a
message rather than converted approximately.

Layouts: torch Linear [out, in] -> kernel [in, out]; Conv2d [out, in, kh, kw] -> [kh, kw, in, out];
attention in_proj (q, k, v stacked) -> per-head kernels [embed, heads, head_dim] and biases
[heads, head_dim]; out_proj -> [heads, head_dim, embed]. Layers are `transformer/layer_<i>/block/...`,
or with `scan=True` one `transformer/layers/block/...` subtree with a leading layers axis.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from colearn_jax.convert import resnet as resnet_convert
from colearn_jax.convert.torch_reader import read_state_dict, to_numpy

SOURCES = ("openai", "open_clip", "hf")
# Buffers / metadata that carry no parameters (OpenAI's TorchScript archives store the three ints).
_IGNORED_KEYS = re.compile(
    r"^(input_resolution|context_length|vocab_size|attn_mask|.*\.attn_mask|.*position_ids|"
    r".*num_batches_tracked)$"
)
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_LN_EPS = 1e-5


class ConversionError(ValueError):
    """The checkpoint does not match a CLIP architecture colearn_jax can represent exactly."""


# ------------------------------------------------------------------------------------------------
# Base config


def base_config() -> ml_collections.ConfigDict:
    """The CLIP `digits` preset (colearn_jax/configs/clip.py, part of the package), unlocked: the layout
    converted checkpoints start from."""
    from colearn_jax.configs.clip import get_config  # noqa: PLC0415

    config = get_config("digits")
    config.unlock()
    return config


# ------------------------------------------------------------------------------------------------
# Small helpers


class _Keys:
    """Reads a state dict and remembers which keys were used, so nothing is silently dropped."""

    def __init__(self, sd: Mapping[str, Any]):
        self.sd = sd
        self.used: set[str] = set()

    def __contains__(self, key):
        return key in self.sd

    def shape(self, key) -> tuple[int, ...]:
        if key not in self.sd:
            raise ConversionError(f"missing {key!r} in the state dict")
        return tuple(np.shape(self.sd[key]))

    def __call__(self, key) -> np.ndarray:
        if key not in self.sd:
            raise ConversionError(f"missing {key!r} in the state dict")
        self.used.add(key)
        return to_numpy(self.sd[key]).astype(np.float32)

    def mark_used(self, keys):
        self.used.update(keys)

    def check_all_used(self, what: str):
        unused = sorted(k for k in self.sd if k not in self.used and not _IGNORED_KEYS.match(k))
        if unused:
            raise ConversionError(
                f"{len(unused)} {what} state-dict entries have no place in colearn_jax's CLIP (an "
                f"unsupported architecture feature?): {unused[:12]}{' ...' if len(unused) > 12 else ''}"
            )


def _count_layers(sd: Mapping[str, Any], pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if idx and idx != set(range(len(idx))):
        raise ConversionError(f"layer indices matching {pattern!r} are not contiguous: {sorted(idx)}")
    return len(idx)


def _mlp_ratio(mlp_dim: int, width: int) -> float:
    ratio = mlp_dim / width
    if int(width * ratio) != mlp_dim:  # float rounding: nudge so that int(width * ratio) == mlp_dim
        ratio = (mlp_dim + 0.5) / width
    return ratio


def _check_heads(width: int, heads: int, what: str):
    if heads <= 0 or width % heads:
        raise ConversionError(
            f"{what}: {heads} heads do not divide width {width} (no weight shape reveals the head count; "
            f"pass vision_heads= / text_heads= (--vision_heads / --text_heads) to set it)."
        )


def _ln(w: np.ndarray, b: np.ndarray) -> dict:
    return {"ln": {"scale": w, "bias": b}}


def _dense(w: np.ndarray, b: np.ndarray) -> dict:
    return {"kernel": w.T, "bias": b}


def _attention(q, k, v, out, heads: int) -> dict:
    """q/k/v/out: (weight [out, in], bias [out]) in torch's Linear layout."""
    width = q[0].shape[1]
    head_dim = q[0].shape[0] // heads

    def per_head(wb):
        w, b = wb
        return {"kernel": w.T.reshape(width, heads, head_dim), "bias": b.reshape(heads, head_dim)}

    ow, ob = out
    return {
        "query": per_head(q), "key": per_head(k), "value": per_head(v),
        "out": {"kernel": ow.T.reshape(heads, head_dim, ow.shape[0]), "bias": ob},
    }


def stack_layers(transformer: dict, num_layers: int) -> dict:
    """`{"layer_0": {"block": t0}, ...}` -> `{"layers": {"block": stack(t_i)}}` (nn.scan's layout)."""
    import jax  # noqa: PLC0415

    trees = [transformer[f"layer_{i}"] for i in range(num_layers)]
    return {"layers": jax.tree.map(lambda *xs: np.stack(xs, axis=0), *trees)}


def unstack_layers(transformer: dict) -> dict:
    """Inverse of `stack_layers`."""
    import jax  # noqa: PLC0415

    stacked = transformer["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {f"layer_{i}": jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked) for i in range(n)}


# ------------------------------------------------------------------------------------------------
# Architecture from shapes (OpenAI / open_clip key names)


def infer_openai_architecture(sd: Mapping[str, Any]) -> dict:
    """Architecture read from an OpenAI / open_clip state dict's shapes (heads: width / 64)."""
    keys = _Keys(sd)
    arch: dict[str, Any] = {}
    if "visual.proj" in sd:
        width, in_ch, ph, pw = keys.shape("visual.conv1.weight")
        if ph != pw or in_ch != 3:
            raise ConversionError(f"visual.conv1.weight {keys.shape('visual.conv1.weight')}: need a square RGB patch.")
        n_pos = keys.shape("visual.positional_embedding")[0]
        grid = math.isqrt(n_pos - 1)
        if grid * grid != n_pos - 1:
            raise ConversionError(f"visual.positional_embedding has {n_pos} rows: not 1 + a square grid.")
        layers = _count_layers(sd, r"visual\.transformer\.resblocks\.(\d+)\.")
        mlp_dim = keys.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
        arch["vision"] = dict(type="vit", image_size=ph * grid, patch_size=ph, width=width, layers=layers,
                              heads=width // 64, mlp_ratio=_mlp_ratio(mlp_dim, width), pool="cls")
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
    layers = _count_layers(sd, r"transformer\.resblocks\.(\d+)\.")
    if layers == 0:
        raise ConversionError("no text transformer layers (transformer.resblocks.*) in the state dict.")
    mlp_dim = keys.shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
    arch["text"] = dict(vocab_size=vocab, context_length=context, width=width, layers=layers,
                        heads=max(width // 64, 1), mlp_ratio=_mlp_ratio(mlp_dim, width))
    text_embed = keys.shape("text_projection")[1]
    if text_embed != arch["embed_dim"]:
        raise ConversionError(f"image embedding {arch['embed_dim']} != text embedding {text_embed}.")
    arch["logit_bias"] = "logit_bias" in sd
    arch["activation"] = "quick_gelu"
    return arch


def _normalise_open_clip_layout(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """open_clip's CustomTextCLIP keeps the (standard) text tower under `text.`: move it to the top level."""
    if any(k.startswith("visual.trunk.") for k in sd):
        raise ConversionError("open_clip timm image towers (visual.trunk.*) are not supported.")
    if "text.token_embedding.weight" in sd:
        if any(k.startswith(("transformer.", "token_embedding.")) for k in sd):
            raise ConversionError("state dict has both a top-level and a `text.` text tower.")
        return {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    if any(k.startswith("text.") for k in sd):
        raise ConversionError(
            "open_clip text towers other than the CLIP text transformer (e.g. Hugging Face text models under "
            "text.transformer.*) are not supported."
        )
    return sd


def _open_clip_model_config(model_config: Mapping[str, Any] | str | None) -> dict | None:
    if model_config is None:
        return None
    if isinstance(model_config, str):
        if not os.path.isfile(model_config):
            raise FileNotFoundError(f"No open_clip model config at {model_config}.")
        with open(model_config) as f:
            try:
                model_config = json.load(f)
            except json.JSONDecodeError as e:
                raise ConversionError(f"{model_config} is not valid JSON: {e}") from e
    cfg = dict(model_config)
    if "model_cfg" in cfg:  # hub open_clip_config.json: {"model_cfg": ..., "preprocess_cfg": ...}
        cfg = dict(cfg["model_cfg"])
    if "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise ConversionError("an open_clip model config needs embed_dim, vision_cfg and text_cfg.")
    return cfg


def _apply_open_clip_config(arch: dict, cfg: dict) -> dict:
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
        eps = (c.get("norm_kwargs") or {}).get("eps", _LN_EPS)
        if abs(eps - _LN_EPS) > 1e-12:
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
        _check_heads(av["width"], av["heads"], "vision")
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
    _check_heads(at["width"], at["heads"], "text")
    arch["activation"] = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    return arch


def _openai_layout_params(sd: Mapping[str, Any], arch: dict) -> dict:
    """Flax variables from OpenAI / open_clip key names."""
    take = _Keys(sd)

    def block(prefix: str, heads: int) -> dict:
        # in_proj stacks the q, k and v projections along the output axis.
        qw, kw, vw = np.split(take(f"{prefix}.attn.in_proj_weight"), 3, axis=0)
        qb, kb, vb = np.split(take(f"{prefix}.attn.in_proj_bias"), 3, axis=0)
        return {"block": {
            "ln_1": _ln(take(f"{prefix}.ln_1.weight"), take(f"{prefix}.ln_1.bias")),
            "attn": _attention((qw, qb), (kw, kb), (vw, vb),
                               (take(f"{prefix}.attn.out_proj.weight"), take(f"{prefix}.attn.out_proj.bias")), heads),
            "ln_2": _ln(take(f"{prefix}.ln_2.weight"), take(f"{prefix}.ln_2.bias")),
            "mlp": {"fc": _dense(take(f"{prefix}.mlp.c_fc.weight"), take(f"{prefix}.mlp.c_fc.bias")),
                    "proj": _dense(take(f"{prefix}.mlp.c_proj.weight"), take(f"{prefix}.mlp.c_proj.bias"))},
        }}

    variables: dict[str, Any] = {}
    av, at = arch["vision"], arch["text"]
    if av["type"] == "vit":
        vision = {
            "patch_embed": {"kernel": take("visual.conv1.weight").transpose(2, 3, 1, 0)},
            "class_embedding": take("visual.class_embedding"),
            "positional_embedding": take("visual.positional_embedding"),
            "ln_pre": _ln(take("visual.ln_pre.weight"), take("visual.ln_pre.bias")),
            "transformer": {f"layer_{i}": block(f"visual.transformer.resblocks.{i}", av["heads"])
                            for i in range(av["layers"])},
            "ln_post": _ln(take("visual.ln_post.weight"), take("visual.ln_post.bias")),
            "proj": take("visual.proj"),
        }
    else:
        rn = resnet_convert.modified_resnet_from_torch(sd, "visual.", num_heads=av["heads"])
        vision = rn["params"]
        variables["batch_stats"] = {"vision": rn["batch_stats"]}
        take.mark_used(k for k in sd if k.startswith("visual."))  # modified_resnet_from_torch is strict itself
    text = {
        "token_embedding": {"embedding": take("token_embedding.weight")},
        "positional_embedding": take("positional_embedding"),
        "transformer": {f"layer_{i}": block(f"transformer.resblocks.{i}", at["heads"]) for i in range(at["layers"])},
        "ln_final": _ln(take("ln_final.weight"), take("ln_final.bias")),
        "text_projection": take("text_projection"),
    }
    params = {"vision": vision, "text": text, "logit_scale": take("logit_scale").reshape(())}
    if arch["logit_bias"]:
        params["logit_bias"] = take("logit_bias").reshape(())
    take.check_all_used("OpenAI/open_clip")
    variables["params"] = params
    return variables


# ------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel

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


def _hf_architecture(sd: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    model_type = cfg.get("model_type", "clip")
    if model_type != "clip":
        raise ConversionError(f"config.json has model_type={model_type!r}; only Hugging Face 'clip' (CLIPModel) "
                              "checkpoints are supported.")
    tc = _hf_subconfig(cfg, "text", _HF_TEXT_DEFAULTS)
    vc = _hf_subconfig(cfg, "vision", _HF_VISION_DEFAULTS)
    keys = _Keys(sd)
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
    vlayers = _count_layers(sd, r"vision_model\.encoder\.layers\.(\d+)\.")
    vmlp = keys.shape(v + "encoder.layers.0.mlp.fc1.weight")[0]
    vheads = int(vc["num_attention_heads"])
    _check_heads(width, vheads, "vision")
    embed_dim = keys.shape("visual_projection.weight")[0]

    t = "text_model."
    vocab, twidth = keys.shape(t + "embeddings.token_embedding.weight")
    context = keys.shape(t + "embeddings.position_embedding.weight")[0]
    tlayers = _count_layers(sd, r"text_model\.encoder\.layers\.(\d+)\.")
    tmlp = keys.shape(t + "encoder.layers.0.mlp.fc1.weight")[0]
    theads = int(tc["num_attention_heads"])
    _check_heads(twidth, theads, "text")
    if keys.shape("text_projection.weight")[0] != embed_dim:
        raise ConversionError("text and image projections have different output widths.")

    acts = {tc["hidden_act"], vc["hidden_act"]}
    if len(acts) != 1:
        raise ConversionError(f"text and vision use different activations {sorted(acts)}; colearn_jax's CLIP has one.")
    act = acts.pop()
    if act not in _HF_ACTIVATIONS:
        raise ConversionError(f"hidden_act={act!r} is not supported (known: {sorted(_HF_ACTIVATIONS)}).")
    for name, c in (("text", tc), ("vision", vc)):
        if abs(float(c.get("layer_norm_eps") or _LN_EPS) - _LN_EPS) > 1e-12:
            raise ConversionError(f"{name} layer_norm_eps={c['layer_norm_eps']} (colearn_jax uses {_LN_EPS}).")
    eos = tc.get("eos_token_id")
    if eos != 2 and eos != vocab - 1:
        raise ConversionError(
            f"text eos_token_id={eos!r}: Hugging Face pools at the first eos_token_id, colearn_jax at argmax(ids); "
            f"they agree only for eos_token_id == vocab_size - 1 ({vocab - 1}) or the legacy eos_token_id == 2."
        )
    return dict(
        embed_dim=embed_dim,
        activation=_HF_ACTIVATIONS[act],
        logit_bias=False,
        vision=dict(type="vit", image_size=int(image_size), patch_size=ph, width=width, layers=vlayers,
                    heads=vheads, mlp_ratio=_mlp_ratio(vmlp, width), pool="cls"),
        text=dict(vocab_size=vocab, context_length=context, width=twidth, layers=tlayers, heads=theads,
                  mlp_ratio=_mlp_ratio(tmlp, twidth)),
    )


def _hf_params(sd: Mapping[str, Any], arch: dict) -> dict:
    take = _Keys(sd)

    def linear(prefix):
        return take(f"{prefix}.weight"), take(f"{prefix}.bias")

    def block(prefix: str, heads: int) -> dict:
        a = f"{prefix}.self_attn"
        return {"block": {
            "ln_1": _ln(*linear(f"{prefix}.layer_norm1")),
            "attn": _attention(linear(f"{a}.q_proj"), linear(f"{a}.k_proj"), linear(f"{a}.v_proj"),
                               linear(f"{a}.out_proj"), heads),
            "ln_2": _ln(*linear(f"{prefix}.layer_norm2")),
            "mlp": {"fc": _dense(*linear(f"{prefix}.mlp.fc1")), "proj": _dense(*linear(f"{prefix}.mlp.fc2"))},
        }}

    av, at = arch["vision"], arch["text"]
    v, t = "vision_model.", "text_model."
    vision = {
        "patch_embed": {"kernel": take(v + "embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)},
        "class_embedding": take(v + "embeddings.class_embedding"),
        "positional_embedding": take(v + "embeddings.position_embedding.weight"),
        "ln_pre": _ln(*linear(v + "pre_layrnorm")),
        "transformer": {f"layer_{i}": block(f"{v}encoder.layers.{i}", av["heads"]) for i in range(av["layers"])},
        "ln_post": _ln(*linear(v + "post_layernorm")),
        "proj": take("visual_projection.weight").T,
    }
    text = {
        "token_embedding": {"embedding": take(t + "embeddings.token_embedding.weight")},
        "positional_embedding": take(t + "embeddings.position_embedding.weight"),
        "transformer": {f"layer_{i}": block(f"{t}encoder.layers.{i}", at["heads"]) for i in range(at["layers"])},
        "ln_final": _ln(*linear(t + "final_layer_norm")),
        "text_projection": take("text_projection.weight").T,
    }
    params = {"vision": vision, "text": text, "logit_scale": take("logit_scale").reshape(())}
    take.check_all_used("Hugging Face CLIPModel")
    return {"params": params}


# ------------------------------------------------------------------------------------------------
# Public API


def make_config(arch: dict, *, scan: bool = False, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
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


def check_variables(config: ml_collections.ConfigDict, variables: dict) -> None:
    """Raises ConversionError unless `variables` has exactly the tree and shapes the model initialises."""
    import jax  # noqa: PLC0415
    import flax.linen as nn  # noqa: PLC0415

    from colearn_jax.models import get_system  # noqa: PLC0415

    system = get_system(config.model.name)
    model = system.build_model(config)
    batch = system.example_batch(config, 1)
    expected = nn.unbox(jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b, train=False), batch))
    exp_flat = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got_flat = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
    missing = sorted(set(exp_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(exp_flat))
    wrong = sorted(k for k in set(exp_flat) & set(got_flat) if exp_flat[k] != got_flat[k])
    if missing or extra or wrong:
        raise ConversionError(
            "converted variables do not fit the model built from the config: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shapes {[(k, got_flat[k], exp_flat[k]) for k in wrong[:5]]}"
        )


def convert_state_dict(
    state_dict: Mapping[str, Any],
    source: str,
    *,
    model_config: Mapping[str, Any] | str | None = None,
    scan: bool = False,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    base: ml_collections.ConfigDict | None = None,
    check: bool = True,
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) from an in-memory state dict (numpy arrays or torch tensors).

    `model_config`: open_clip's model JSON (dict or path) for `open_clip`, HF's config.json dict for
    `hf`; optional for `open_clip`, ignored for `openai` unless given (then read as open_clip's).
    `vision_heads` / `text_heads` override the head counts (which no shape reveals).
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; choose one of {SOURCES}.")
    if source == "hf":
        if model_config is None:
            raise ConversionError("source='hf' needs the model's config.json (pass the model directory).")
        if isinstance(model_config, str):
            with open(model_config) as f:
                model_config = json.load(f)
        arch = _hf_architecture(state_dict, model_config)
    else:
        state_dict = _normalise_open_clip_layout(state_dict)
        arch = infer_openai_architecture(state_dict)
        cfg = _open_clip_model_config(model_config)
        if cfg is not None:
            arch = _apply_open_clip_config(arch, cfg)
        elif source == "open_clip":
            arch["activation"] = "gelu"  # open_clip's default; pass the model JSON for -quickgelu models
    if vision_heads is not None:
        arch["vision"]["heads"] = int(vision_heads)
    if text_heads is not None:
        arch["text"]["heads"] = int(text_heads)
    if arch["vision"]["type"] == "vit":
        _check_heads(arch["vision"]["width"], arch["vision"]["heads"], "vision")
    else:
        _check_heads(arch["vision"]["width"] * 32, arch["vision"]["heads"], "vision attention pool")
    _check_heads(arch["text"]["width"], arch["text"]["heads"], "text")

    variables = _hf_params(state_dict, arch) if source == "hf" else _openai_layout_params(state_dict, arch)
    config = make_config(arch, scan=scan, base=base)
    if scan:
        for tower in ("vision", "text"):
            p = variables["params"][tower]
            if "transformer" in p:
                p["transformer"] = stack_layers(p["transformer"], config.model[tower].layers)
    if check:
        check_variables(config, variables)
    return config, variables


def convert(
    source: str,
    input_path: str,
    *,
    model_config: Mapping[str, Any] | str | None = None,
    scan: bool = False,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) from a checkpoint file or (for `hf`) a model directory.

    `variables` is `{"params": ..., ["batch_stats": ...]}` of numpy float32 arrays, ready for
    `colearn_jax.models.clip_system.build_model(config).apply(variables, batch)`.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}; choose one of {SOURCES}.")
    input_path = os.path.abspath(os.path.expanduser(input_path))
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"No checkpoint at {input_path}.")
    if source == "hf":
        directory = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
        cfg_path = os.path.join(directory, "config.json")
        if model_config is None:
            if not os.path.isfile(cfg_path):
                raise FileNotFoundError(f"source='hf' needs a CLIPModel directory with config.json; none in {directory}.")
            model_config = cfg_path
    state_dict = read_state_dict(input_path)
    return convert_state_dict(state_dict, source, model_config=model_config, scan=scan, vision_heads=vision_heads,
                              text_heads=text_heads)


def save_checkpoint(config: ml_collections.ConfigDict, variables: dict, output_dir: str, *, step: int = 0) -> str:
    """Writes what inference and `train.init_from` need: the variables and the config (no optimizer
    state). The result loads with `colearn_jax.load(output_dir)`. Returns the checkpoint directory."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from colearn_jax.train.checkpoint import Checkpointer  # noqa: PLC0415

    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    directory = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} already holds checkpoints; choose an empty --output.")
    check_variables(config, variables)
    cpu = jax.local_devices(backend="cpu")[0] if jax.default_backend() != "cpu" else jax.local_devices()[0]
    with jax.default_device(cpu):
        variables = jax.tree.map(jnp.asarray, variables)
        with Checkpointer(directory, keep=1, async_save=False) as ckpt:
            ckpt.save_variables(step, variables, config)
    return directory


def convert_checkpoint(source: str, input_path: str, output_dir: str, **kw) -> tuple[ml_collections.ConfigDict, str]:
    """`convert` + `save_checkpoint`. Returns (config, checkpoint directory)."""
    config, variables = convert(source, input_path, **kw)
    return config, save_checkpoint(config, variables, output_dir)


def describe(config: ml_collections.ConfigDict) -> str:
    m = config.model
    v, t = m.vision, m.text
    if v.type == "vit":
        vis = f"ViT {v.image_size}px patch {v.patch_size} width {v.width} x{v.layers} ({v.heads} heads)"
    else:
        vis = f"ModifiedResNet {v.image_size}px layers {tuple(v.layers)} width {v.width} ({v.heads} pool heads)"
    txt = f"text width {t.width} x{t.layers} ({t.heads} heads), vocab {t.vocab_size}, context {t.context_length}"
    return f"{vis}; {txt}; embed {m.embed_dim}; {m.activation}; scan={m.scan}"
