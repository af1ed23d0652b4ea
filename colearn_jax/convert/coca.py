"""open_clip CoCa checkpoints -> colearn_jax's CoCa (colearn_jax/models/coca.py, pooler="open_clip").

    arch = coca_architecture(state_dict, open_clip_json)   # shapes + the model config's head counts
    variables = coca_variables(state_dict, arch)           # the parameter tree
    config = coca_config(arch, scan=False)                 # configs/coca.py layout

Recognised by the `text_decoder.` keys (`is_coca`). open_clip's CoCa: a ViT whose tokens go through
one attentional pooler (`visual.attn_pool`, n queries, LayerNorm'd queries and keys) and `ln_post`;
query 0 through `visual.proj` is the image embedding, queries 1.. the decoder's memory; the text
tower (under `text.`) appends `cls_emb` and pools it after `ln_final` (its key-padding mask one
position late unless `text_cfg.correct_cls_mask`); the `text_decoder` has per layer a causal
`resblocks.i` and a `cross_attn.i` block (LayerNorm on the memory: `ln_1_kv`), then `ln_final` and a
bias-free `text_projection` to the vocabulary. Features colearn_jax's CoCa lacks are refused.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections
import numpy as np

from colearn_jax.convert.clip_architecture import LN_EPS, check_heads, mlp_ratio
from colearn_jax.convert.clip_weights import _dense, _ln, stack_layers
from colearn_jax.convert.reading import ConversionError, StateDict, count_layers


def is_coca(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("text_decoder.") for k in sd)


_UNSUPPORTED = ("timm_model_name", "hf_model_name", "ls_init_value", "no_ln_pre", "act_kwargs", "qk_norm",
                "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "proj_bias",
                "no_causal_mask", "patch_dropout")


def coca_architecture(sd: Mapping[str, Any], cfg: Mapping[str, Any] | None) -> dict:
    """The architecture dict from the state dict's shapes and open_clip's model config (heads)."""
    cfg = dict(cfg or {})
    v, t, mm = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {}), dict(cfg.get("multimodal_cfg") or {})
    bad = [f"{part}.{k}={c[k]!r}" for part, c in (("vision_cfg", v), ("text_cfg", t), ("multimodal_cfg", mm))
           for k in _UNSUPPORTED if c.get(k)]
    bad += [f"{part}.block_type={c['block_type']!r}" for part, c in (("vision_cfg", v), ("text_cfg", t))
            if c.get("block_type") not in (None, "default")]
    if v.get("attentional_pool") not in (None, True):
        bad.append(f"vision_cfg.attentional_pool={v['attentional_pool']!r} (only open_clip's single pooler, True)")
    if v.get("pos_embed_type", "learnable") != "learnable":
        bad.append(f"vision_cfg.pos_embed_type={v['pos_embed_type']!r}")
    for part, c in (("vision_cfg", v), ("text_cfg", t), ("multimodal_cfg", mm)):
        if abs((c.get("norm_kwargs") or {}).get("eps", LN_EPS) - LN_EPS) > 1e-12:
            bad.append(f"{part}.norm_kwargs.eps")
    if bad:
        raise ConversionError("open_clip CoCa config uses features colearn_jax's CoCa does not have: " + ", ".join(bad))
    keys = StateDict(sd)
    if "visual.attn_pool.query" not in sd:
        raise ConversionError("a CoCa state dict needs visual.attn_pool.* (open_clip's attentional pooler).")
    width, in_ch, ph, pw = keys.shape("visual.conv1.weight")
    n_pos = keys.shape("visual.positional_embedding")[0]
    grid = math.isqrt(n_pos - 1)
    if ph != pw or in_ch != 3 or grid * grid != n_pos - 1:
        raise ConversionError("visual.conv1 / positional_embedding: need square RGB patches on a square grid.")
    num_queries, embed = keys.shape("visual.attn_pool.query")
    vision = dict(image_size=ph * grid, patch_size=ph, width=width,
                  layers=count_layers(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
                  heads=width // int(v.get("head_width", 64)),
                  mlp_ratio=mlp_ratio(keys.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0], width))
    vocab, twidth = keys.shape("text.token_embedding.weight")
    text = dict(vocab_size=vocab, context_length=keys.shape("text.positional_embedding")[0] - 1, width=twidth,
                layers=count_layers(sd, r"text\.transformer\.resblocks\.(\d+)\."), heads=int(t.get("heads", 8)),
                mlp_ratio=mlp_ratio(keys.shape("text.transformer.resblocks.0.mlp.c_fc.weight")[0], twidth))
    dwidth, dvocab = keys.shape("text_decoder.text_projection")
    if dwidth != twidth or dvocab != vocab:
        raise ConversionError(f"text_decoder.text_projection {(dwidth, dvocab)}: colearn_jax's CoCa needs the "
                              f"decoder at the text width {twidth} and the text vocabulary {vocab}.")
    decoder = dict(layers=count_layers(sd, r"text_decoder\.resblocks\.(\d+)\."), heads=int(mm.get("heads", 8)),
                   mlp_ratio=mlp_ratio(keys.shape("text_decoder.resblocks.0.mlp.c_fc.weight")[0], dwidth))
    if count_layers(sd, r"text_decoder\.cross_attn\.(\d+)\.") != decoder["layers"]:
        raise ConversionError("text_decoder: as many cross_attn blocks as resblocks expected.")
    arch = dict(embed_dim=embed, num_queries=num_queries, pooler_heads=int(v.get("attn_pooler_heads", 8)),
                activation="quick_gelu" if cfg.get("quick_gelu") else "gelu",
                legacy_cls_mask=not t.get("correct_cls_mask", False), vision=vision, text=text, decoder=decoder)
    if keys.shape("visual.proj") != (embed, embed) or keys.shape("text.text_projection") != (twidth, embed):
        raise ConversionError("visual.proj / text.text_projection do not map to the pooler width "
                              f"(embed_dim {embed}).")
    check_heads(width, vision["heads"], "vision")
    check_heads(twidth, text["heads"], "text")
    check_heads(dwidth, decoder["heads"], "multimodal decoder")
    check_heads(embed, arch["pooler_heads"], "attentional pooler")
    return arch


def coca_variables(sd: Mapping[str, Any], arch: dict) -> dict:
    take = StateDict(sd)

    def mha(prefix: str, heads: int) -> dict:
        if f"{prefix}.in_proj_weight" in take:
            qw, kw, vw = np.split(take(f"{prefix}.in_proj_weight"), 3, axis=0)
        else:  # key / value width differs from the query's
            qw, kw, vw = (take(f"{prefix}.{n}_proj_weight") for n in "qkv")
        qb, kb, vb = np.split(take(f"{prefix}.in_proj_bias"), 3, axis=0)
        head_dim = qw.shape[0] // heads

        def per_head(w, b):  # torch Linear [out, in] -> [in, heads, head_dim]; k / v may read another width
            return {"kernel": w.T.reshape(w.shape[1], heads, head_dim), "bias": b.reshape(heads, head_dim)}

        ow = take(f"{prefix}.out_proj.weight")
        return {"query": per_head(qw, qb), "key": per_head(kw, kb), "value": per_head(vw, vb),
                "out": {"kernel": ow.T.reshape(heads, head_dim, ow.shape[0]), "bias": take(f"{prefix}.out_proj.bias")}}

    def ln(prefix):
        return _ln(take(f"{prefix}.weight"), take(f"{prefix}.bias"))

    def mlp(prefix):
        return {"fc": _dense(take(f"{prefix}.c_fc.weight"), take(f"{prefix}.c_fc.bias")),
                "proj": _dense(take(f"{prefix}.c_proj.weight"), take(f"{prefix}.c_proj.bias"))}

    def self_block(prefix, heads):
        return {"ln_1": ln(f"{prefix}.ln_1"), "attn": mha(f"{prefix}.attn", heads), "ln_2": ln(f"{prefix}.ln_2"),
                "mlp": mlp(f"{prefix}.mlp")}

    av, at, ad = arch["vision"], arch["text"], arch["decoder"]
    vision = {
        "patch_embed": {"kernel": take("visual.conv1.weight").transpose(2, 3, 1, 0)},
        "class_embedding": take("visual.class_embedding"),
        "positional_embedding": take("visual.positional_embedding"),
        "ln_pre": ln("visual.ln_pre"),
        "transformer": {f"layer_{i}": {"block": self_block(f"visual.transformer.resblocks.{i}", av["heads"])}
                        for i in range(av["layers"])},
    }
    text = {
        "token_embedding": {"embedding": take("text.token_embedding.weight")},
        "positional_embedding": take("text.positional_embedding"),
        "cls_embedding": take("text.cls_emb"),
        "transformer": {f"layer_{i}": {"block": self_block(f"text.transformer.resblocks.{i}", at["heads"])}
                        for i in range(at["layers"])},
        "ln_final": ln("text.ln_final"),
        "text_projection": take("text.text_projection"),
    }
    decoder = {
        "transformer": {f"layer_{i}": {"block": {
            "self": self_block(f"text_decoder.resblocks.{i}", ad["heads"]),
            "cross": {"ln_1": ln(f"text_decoder.cross_attn.{i}.ln_1"),
                      "ln_memory": ln(f"text_decoder.cross_attn.{i}.ln_1_kv"),
                      "cross_attn": mha(f"text_decoder.cross_attn.{i}.attn", ad["heads"]),
                      "ln_2": ln(f"text_decoder.cross_attn.{i}.ln_2"),
                      "mlp": mlp(f"text_decoder.cross_attn.{i}.mlp")},
        }} for i in range(ad["layers"])},
        "ln_final": ln("text_decoder.ln_final"),
        "text_projection": take("text_decoder.text_projection"),
    }
    pool = {"query": take("visual.attn_pool.query"), "ln_q": ln("visual.attn_pool.ln_q"),
            "ln_k": ln("visual.attn_pool.ln_k"), "attn": mha("visual.attn_pool.attn", arch["pooler_heads"])}
    params = {"vision": vision, "text": text, "decoder": decoder, "attn_pool": pool, "ln_post": ln("visual.ln_post"),
              "proj": take("visual.proj"), "logit_scale": take("logit_scale").reshape(())}
    if "logit_bias" in take:
        raise ConversionError("logit_bias (a SigLIP-style CoCa) is not supported by colearn_jax's CoCa.")
    take.check_all_used("open_clip CoCa")
    return {"params": params}


def scan_layout(variables: dict, arch: dict) -> dict:
    p = variables["params"]
    for tower, part in (("vision", "vision"), ("text", "text"), ("decoder", "decoder")):
        p[tower]["transformer"] = stack_layers(p[tower]["transformer"], int(arch[part]["layers"]))
    return variables


def coca_config(arch: dict, *, scan: bool = False) -> ml_collections.ConfigDict:
    """configs/coca.py's `scenes` preset with the converted sizes (CLIP BPE tokenizer for vocab 49408)."""
    from colearn_jax.configs.coca import get_config  # noqa: PLC0415

    config = get_config("scenes")
    config.unlock()
    m = config.model
    m.update(embed_dim=int(arch["embed_dim"]), activation=arch["activation"], scan=bool(scan), pooler="open_clip",
             num_queries=int(arch["num_queries"]), pooler_heads=int(arch["pooler_heads"]), tie_embeddings=False,
             legacy_cls_mask=bool(arch["legacy_cls_mask"]))
    m.vision = ml_collections.ConfigDict({k: (float(x) if k == "mlp_ratio" else int(x)) for k, x in arch["vision"].items()})
    m.text = ml_collections.ConfigDict({k: (float(x) if k == "mlp_ratio" else int(x)) for k, x in arch["text"].items()})
    m.decoder = ml_collections.ConfigDict({k: (float(x) if k == "mlp_ratio" else int(x))
                                           for k, x in arch["decoder"].items()})
    config.data.image_size = m.vision.image_size
    config.data.context_length = m.text.context_length
    config.eval.caption_max_new_tokens = min(int(config.eval.caption_max_new_tokens), m.text.context_length - 1)
    if m.text.vocab_size == 49408:
        config.data.tokenizer = "clip_bpe"
    return config
