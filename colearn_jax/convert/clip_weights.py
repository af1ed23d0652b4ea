"""Weight mapping: a CLIP state dict (OpenAI / open_clip or Hugging Face key names) -> colearn_jax's
parameter tree, given the architecture dict from `clip_architecture.py`.

    variables = openai_layout_variables(state_dict, arch)   # OpenAI and open_clip (same key names)
    variables = hf_variables(state_dict, arch)               # Hugging Face CLIPModel

Layouts: torch Linear [out, in] -> kernel [in, out]; Conv2d [out, in, kh, kw] -> [kh, kw, in, out];
attention in_proj (q, k, v stacked) -> per-head kernels [embed, heads, head_dim] and biases
[heads, head_dim]; out_proj -> [heads, head_dim, embed]. ModifiedResNet image towers go through
`colearn_jax.convert.resnet`. Layers are `transformer/layer_<i>/block/...`; `stack_layers` gives
the `scan=True` layout (one `transformer/layers/block/...` subtree with a leading layers axis).
Every state-dict entry must find a place (`reading.StateDict.check_all_used`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from colearn_jax.convert import resnet as resnet_convert
from colearn_jax.convert.reading import StateDict


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


def openai_layout_variables(sd: Mapping[str, Any], arch: dict) -> dict:
    """Flax variables from OpenAI / open_clip key names."""
    take = StateDict(sd)

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


def hf_variables(sd: Mapping[str, Any], arch: dict) -> dict:
    """Flax variables from Hugging Face `CLIPModel` key names."""
    take = StateDict(sd)

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



def scan_layout(variables: dict, arch: dict) -> dict:
    """`variables` with each transformer tower's layers stacked, for `config.model.scan=True`."""
    for tower in ("vision", "text"):
        p = variables["params"][tower]
        if "transformer" in p:
            p["transformer"] = stack_layers(p["transformer"], int(arch[tower]["layers"]))
    return variables
