"""GPU check: cuDNN fused attention (through `nn.attention.padded_attention`) equals XLA's attention.

Forward output and the gradients of q/k/v, bf16, at the sequence shapes the CLIP presets use (ViT-B/16's
197 image tokens, ViT-B/32's 50, the 77-token causal text tower, with and without a key-padding mask).
Needs an NVIDIA GPU; prints one line per shape and writes JSON:

  python experiments/cudnn_attention_check.py --out=$OUT/cudnn_attention_check.json
"""
import argparse
import json
import os
import sys

import jax  # noqa: E402
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from colearn_jax.nn.attention import padded_attention

SHAPES = [  # (name, length, causal, key padding mask)
    ("vit_b16_image", 197, False, False),
    ("vit_b32_image", 50, False, False),
    ("clip_text", 77, True, False),
    ("clip_text_padded", 77, True, True),
]


def check(length, causal, use_mask, batch=8, heads=12, head_dim=64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, d_out = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16) for key in keys)
    mask = None
    if use_mask:
        valid = jnp.arange(length)[None, :] < jnp.arange(length - batch, length)[:, None]
        mask = valid[:, None, None, :]

    def run(impl):
        def f(q, k, v):
            return padded_attention(q, k, v, mask=mask, causal=causal, implementation=impl)
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(d_out))

    ref = jax.jit(lambda: run("xla"))()
    got = jax.jit(lambda: run("cudnn"))()
    names = ("out", "dq", "dk", "dv")
    return {n: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for n, a, b in zip(names, ref, got)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    results = {"device": str(jax.devices()[0].device_kind)}
    for name, length, causal, use_mask in SHAPES:
        try:
            results[name] = check(length, causal, use_mask)
        except Exception as e:  # noqa: BLE001 - every shape reports, whatever fails
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, results[name], flush=True)
    ok = all("error" not in r and max(r.values()) < 0.1 for k, r in results.items() if k != "device")
    results["all_within_0.1"] = ok
    print("cuDNN == XLA (max |diff| < 0.1 in bf16):", ok)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
