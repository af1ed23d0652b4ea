"""Import OpenAI CLIP / open_clip `ModifiedResNet` weights into `colearn_jax.nn.resnet.ModifiedResNet`.

Layouts: torch Conv2d weight [out, in, kh, kw] -> flax [kh, kw, in, out]; Linear [out, in] -> [in, out],
then split per head: q/k/v -> [embed, heads, head_dim], c_proj -> [heads, head_dim, output_dim].
BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var
(`num_batches_tracked` is dropped).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor slipped in
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def modified_resnet_config_from_torch(
    state_dict: Mapping[str, Any], prefix: str = "visual.", num_heads: int | None = None
) -> dict[str, Any]:
    """ModifiedResNet constructor arguments read from the state dict's shapes.

    The head count is not visible in the shapes; CLIP uses `width * 32 // 64` (head_dim 64), which is
    the default when `num_heads` is None.
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "conv3.weight" not in sd or "attnpool.positional_embedding" not in sd:
        raise KeyError(f"no ModifiedResNet under prefix {prefix!r} (missing conv3 / attnpool weights).")
    width = int(np.shape(sd["conv3.weight"])[0])
    depths = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
    n_pos, embed_dim = np.shape(sd["attnpool.positional_embedding"])
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"attnpool.positional_embedding has {n_pos} rows, not a square grid + 1.")
    if embed_dim != width * 32:
        raise ValueError(f"attnpool width {embed_dim} != 32 * stem width {width}.")
    return {
        "layers": tuple(depths),
        "output_dim": int(np.shape(sd["attnpool.c_proj.weight"])[0]),
        "num_heads": int(num_heads) if num_heads is not None else embed_dim // 64,
        "image_size": 32 * grid,
        "width": width,
    }


def modified_resnet_from_torch(
    state_dict: Mapping[str, Any], prefix: str = "visual.", *, num_heads: int | None = None
) -> dict[str, dict]:
    """Flax `{"params": ..., "batch_stats": ...}` for `ModifiedResNet` from a torch state dict.

    Args:
      state_dict: numpy arrays keyed as in open_clip / OpenAI CLIP (`visual.conv1.weight`,
        `visual.layer1.0.bn1.running_mean`, `visual.attnpool.q_proj.weight`, ...).
      prefix: key prefix of the image tower ("visual." in a full CLIP state dict, "" for a bare tower).
      num_heads: attention-pool heads; None -> CLIP's convention `embed_dim // 64`. It must equal the
        `num_heads` of the flax module (see `modified_resnet_config_from_torch`).
    Raises:
      KeyError if an expected key is missing, ValueError if keys under `prefix` are left unused.
    """
    cfg = modified_resnet_config_from_torch(state_dict, prefix, num_heads)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise KeyError(f"missing {prefix}{key} in the state dict")
        used.add(key)
        return _np(sd[key])

    def conv(key: str) -> dict:
        return {"kernel": take(f"{key}.weight").transpose(2, 3, 1, 0)}

    def bn(key: str) -> tuple[dict, dict]:
        used.add(f"{key}.num_batches_tracked")
        params = {"scale": take(f"{key}.weight"), "bias": take(f"{key}.bias")}
        stats = {"mean": take(f"{key}.running_mean"), "var": take(f"{key}.running_var")}
        return params, stats

    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for i in (1, 2, 3):
        params[f"conv{i}"] = conv(f"conv{i}")
        params[f"bn{i}"], stats[f"bn{i}"] = bn(f"bn{i}")

    for stage, depth in enumerate(cfg["layers"], start=1):
        for j in range(depth):
            src, dst = f"layer{stage}.{j}", f"layer{stage}_{j}"
            p: dict[str, Any] = {}
            s: dict[str, Any] = {}
            for i in (1, 2, 3):
                p[f"conv{i}"] = conv(f"{src}.conv{i}")
                p[f"bn{i}"], s[f"bn{i}"] = bn(f"{src}.bn{i}")
            if f"{src}.downsample.0.weight" in sd:
                p["downsample_conv"] = conv(f"{src}.downsample.0")
                p["downsample_bn"], s["downsample_bn"] = bn(f"{src}.downsample.1")
            params[dst], stats[dst] = p, s

    heads = cfg["num_heads"]
    embed_dim = cfg["width"] * 32
    if embed_dim % heads:
        raise ValueError(f"num_heads={heads} does not divide the attention-pool width {embed_dim}.")
    head_dim = embed_dim // heads

    def in_proj(name: str) -> dict:
        w = take(f"attnpool.{name}.weight")  # [embed_out, embed_in]
        b = take(f"attnpool.{name}.bias")
        return {"kernel": w.T.reshape(embed_dim, heads, head_dim), "bias": b.reshape(heads, head_dim)}

    c_w = take("attnpool.c_proj.weight")  # [output_dim, embed]
    params["attnpool"] = {
        "positional_embedding": take("attnpool.positional_embedding"),
        "attn": {
            "query": in_proj("q_proj"),
            "key": in_proj("k_proj"),
            "value": in_proj("v_proj"),
            "out": {
                "kernel": c_w.T.reshape(heads, head_dim, c_w.shape[0]),
                "bias": take("attnpool.c_proj.bias"),
            },
        },
    }

    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"state dict keys not converted: {[prefix + k for k in unused][:10]}")
    return {"params": params, "batch_stats": stats}
