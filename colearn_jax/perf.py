"""Performance helpers shared by the benchmarks: peak FLOP/s table, MFU, XLA cost/memory readers, timing.

Nothing here imports JAX at module level, so `experiments/benchmark.py` can set `XLA_FLAGS`
(simulated CPU devices) after importing this module and before JAX starts.

FLOP accounting (verified on an 8-device simulated CPU mesh, jax 0.10.2; tests/test_perf.py):
- `Compiled.cost_analysis()["flops"]` describes the SPMD-partitioned module that *one* device runs,
  i.e. it is **per device** (a [1024, 512] @ [512, 256] matmul sharded 8 ways over the rows reports
  2·1024·512·256 / 8). Replicated work (e.g. every `model`-axis replica repeating the same math) is
  counted once per device, so per-device × devices over-counts the model's FLOPs.
- `Lowered.cost_analysis()["flops"]` describes the un-partitioned global program: the **global**
  FLOPs of one step, the "model FLOPs" MFU wants. Rematerialised computation is part of that program
  (remat is applied when tracing), so with a remat policy it counts the recompute as well
  (closer to hardware FLOPs); `clip_train_flops` gives the analytic model FLOPs as a cross-check.
- `step_flops` puts these together for a train step; for scanned layers (and cuDNN attention) it
  counts an unrolled, XLA-attention twin (`flops_twin_config`), since XLA counts a loop body once.
- MFU = global model FLOPs per step / (step time · devices · peak FLOP/s per device).
"""
from __future__ import annotations

import math
import re
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

# ----------------------------------------------------------------------------- peak FLOP/s table
# Dense (no 2:4 sparsity) peak FLOP/s per chip, from the vendors' data sheets. "float32" on NVIDIA
# is the TF32 tensor-core rate (what XLA uses for f32 matmuls at the default precision);
# "float32_strict" is the CUDA-core FP32 rate (precision=HIGHEST). TPUs run f32 matmuls at the
# default precision as a single bf16 pass, so their "float32" entry is the bf16 rate (HIGHEST
# precision takes ~6 passes). Order matters: the first pattern that matches the device kind wins.
PEAK_FLOPS: list[tuple[str, str, dict[str, float]]] = [
    # (regex on jax.Device.device_kind, chip name, {dtype: FLOP/s})
    (r"H100.*PCIe", "H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12, "float32_strict": 51e12}),
    (r"H100.*NVL", "H100 NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 417.5e12, "float32_strict": 60e12}),
    (r"H100", "H100 SXM", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12, "float32_strict": 67e12}),
    (r"H200", "H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12, "float32_strict": 67e12}),
    (r"A100", "A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12, "float32_strict": 19.5e12}),
    (r"TPU v4", "TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    (r"TPU v5 ?lite|TPU v5e", "TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    (r"TPU v5p|TPU v5$", "TPU v5p", {"bfloat16": 459e12, "float32": 459e12}),
    (r"TPU v6 ?lite|TPU v6e|TPU v6$", "TPU v6e", {"bfloat16": 918e12, "float32": 918e12}),
]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "f32": "float32",
                  "tf32": "float32", "float": "float32"}


def lookup_chip(device_kind: str) -> str | None:
    """The chip name of the first table entry whose pattern matches `device_kind`, else None (e.g. CPU)."""
    for pattern, name, _ in PEAK_FLOPS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return name
    return None


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak dense FLOP/s of one device of `device_kind` at compute `dtype`; None if unknown (CPU)."""
    dtype = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    for pattern, _, table in PEAK_FLOPS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            if dtype not in table:
                raise ValueError(f"No peak FLOP/s for dtype {dtype!r} on {device_kind!r}; known: {sorted(table)}.")
            return table[dtype]
    return None


# ----------------------------------------------------------------------------- throughput arithmetic
def tflops_per_s(flops_per_step: float | None, step_time_s: float) -> float | None:
    if flops_per_step is None or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / 1e12


def mfu(flops_per_step: float | None, step_time_s: float, num_devices: int, peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]: global FLOPs per step / (time · devices · per-device peak).

    Returns None when the peak (or the FLOP count) is unknown — report it as "n/a".
    """
    if flops_per_step is None or peak_per_device is None or not peak_per_device or step_time_s <= 0:
        return None
    if num_devices <= 0:
        raise ValueError(f"num_devices={num_devices} must be positive.")
    return flops_per_step / (step_time_s * num_devices * peak_per_device)


# ----------------------------------------------------------------------------- XLA analysis readers
def _first(cost):
    if isinstance(cost, (list, tuple)):
        return cost[0] if cost else None
    return cost


def cost_flops(stage) -> float | None:
    """`flops` from a Lowered/Compiled stage's `cost_analysis()` (a dict, or a one-element list in
    older JAX); None when the backend provides no analysis or it fails."""
    try:
        cost = _first(stage.cost_analysis())
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops >= 0 else None


MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def memory_analysis(compiled) -> dict[str, int | None]:
    """Per-device byte sizes from `compiled.memory_analysis()` plus `peak_estimate`.

    peak_estimate = argument + output − alias (donated buffers reused for outputs) + temp + generated code:
    what one device needs for the program, before allocator fragmentation.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        stats = None
    out: dict[str, int | None] = {}
    for field in MEMORY_FIELDS:
        value = getattr(stats, f"{field}_size_in_bytes", None) if stats is not None else None
        out[f"{field}_bytes"] = int(value) if value is not None else None
    parts = [out[f"{f}_bytes"] for f in ("argument", "output", "temp", "generated_code")]
    if all(p is not None for p in parts):
        out["peak_estimate_bytes"] = sum(parts) - (out["alias_bytes"] or 0)
    else:
        out["peak_estimate_bytes"] = None
    return out


def device_memory_stats(devices: Sequence[Any]) -> dict[str, int | None]:
    """Max over `devices` of the runtime allocator's stats (GPU/TPU); all None on CPU (no stats)."""
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    result: dict[str, int | None] = {k: None for k in keys}
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001
            stats = None
        if not stats:
            continue
        for k in keys:
            if k in stats:
                result[k] = max(result[k] or 0, int(stats[k]))
    return result


# ----------------------------------------------------------------------------- FLOPs of a train step
def flops_twin_config(config):
    """The twin of `config` whose lowering XLA's cost analysis counts in full, or None if `config` is one.

    Same model, same math, so the same FLOPs, but with the layers unrolled (`model.scan=False`: XLA
    counts a while-loop body once, not once per trip, so a scanned stack of L layers reports about
    1/L of its FLOPs) and XLA's own attention (`model.attention_impl=None`: a cuDNN fused-attention
    custom call carries no FLOP count).
    """
    model = config.model
    if not model.get("scan", False) and model.get("attention_impl") in (None, "xla"):
        return None
    twin = config.copy_and_resolve_references()
    twin.model.scan = False
    if "attention_impl" in twin.model:
        twin.model.attention_impl = None
    return twin


def step_flops(config, lowered, compiled=None, *, lower: Callable[[Any], Any] | None = None) -> dict[str, float | None]:
    """FLOPs of one train step of `config` (its `data.batch_size` is the global batch), in four counts:

    - `flops_per_step`: global FLOPs, the one MFU uses: `Lowered.cost_analysis()` of the un-partitioned
      step, or of its `flops_twin_config` lowered by `lower(twin_config) -> Lowered` (lowering only,
      a few seconds; pass `lower=None` to skip the twin and report the raw count; skipped as well where
      the backend reports no count, as the GPU runtime did: its twin would have none either);
    - `flops_per_step_xla_raw`: what `lowered` itself reports (scanned layers counted once);
    - `flops_per_step_per_device_xla`: what the compiled SPMD program of one device reports;
    - `flops_per_step_analytic`: 3 × forward for ViT CLIP (`clip_train_flops`), CoCa
      (`coca_train_flops`) and SimCLR (`simclr_train_flops`) configs, else None.
    """
    raw = cost_flops(lowered)
    twin = flops_twin_config(config) if lower is not None and raw is not None else None
    return {
        "flops_per_step": cost_flops(lower(twin)) if twin is not None else raw,
        "flops_per_step_xla_raw": raw,
        "flops_per_step_per_device_xla": cost_flops(compiled) if compiled is not None else None,
        "flops_per_step_analytic": analytic_train_flops(config, config.data.batch_size),
    }


def analytic_train_flops(config, global_batch: int) -> float | None:
    """The analytic model FLOPs of one step for the systems that have a formula, else None."""
    name = config.model.get("name")
    if name == "clip":
        return clip_train_flops(config, global_batch)
    if name == "coca":
        return coca_train_flops(config, global_batch)
    if name == "simclr":
        return simclr_train_flops(config, global_batch)
    return None


# ----------------------------------------------------------------------------- analytic FLOPs
def transformer_forward_flops(tokens: int, width: int, layers: int, mlp_dim: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one sequence through a pre-LN transformer stack.

    Per layer: q/k/v/out projections 4·w², MLP 2·w·mlp, attention scores and values 2·n·w
    (the causal mask is applied to full n×n scores, so no halving).
    """
    n, w = tokens, width
    return layers * (2.0 * n * (4 * w * w + 2 * w * mlp_dim) + 4.0 * n * n * w)


def vit_forward_flops(image_size: int, patch_size: int, width: int, layers: int, mlp_ratio: float = 4.0,
                      stem: str = "patch", channels: int = 3) -> float:
    """Matmul and convolution FLOPs of one image through `nn.vit.VisionTransformer` (class token included,
    no output projection): the stem (one patch convolution, or Xiao et al. 2021's stride-2 3x3 convolutions
    whose channels double up to width / 2, then a 1x1 projection) and the transformer stack."""
    grid = image_size // patch_size
    if stem == "patch":
        flops = 2.0 * grid * grid * (patch_size**2 * channels) * width
    else:
        depth = patch_size.bit_length() - 1
        flops, c_in, side = 0.0, channels, image_size
        for i in range(depth):
            c_out, side = max(width >> (depth - i), 8), side // 2
            flops += 2.0 * side * side * 9 * c_in * c_out
            c_in = c_out
        flops += 2.0 * grid * grid * c_in * width
    return flops + transformer_forward_flops(grid * grid + 1, width, layers, int(width * mlp_ratio))


def clip_forward_flops(config) -> float | None:
    """Analytic forward FLOPs of one image-text pair for a ViT CLIP config; None for other towers.

    ViT-B/16 at 224 px with the 12-layer 512-wide text tower gives 41.1 GFLOPs, matching open_clip's
    model profile (41.09).
    """
    m = config.model
    v, t = m.vision, m.text
    if v.get("type", "vit") != "vit":
        return None
    vis = vit_forward_flops(v.image_size, v.patch_size, v.width, v.layers, v.get("mlp_ratio", 4.0))
    vis += 2.0 * v.width * m.embed_dim
    txt = transformer_forward_flops(t.context_length, t.width, t.layers, int(t.width * t.get("mlp_ratio", 4.0)))
    txt += 2.0 * t.width * m.embed_dim
    return vis + txt


def clip_train_flops(config, global_batch: int) -> float | None:
    """Analytic model FLOPs of one training step: 3 × forward (backward ≈ 2 × forward) + the B×B logits."""
    fwd = clip_forward_flops(config)
    if fwd is None:
        return None
    logits = 2 * 2.0 * global_batch * global_batch * config.model.embed_dim  # both directions
    return 3.0 * (fwd * global_batch + logits)


def coca_forward_flops(config) -> float:
    """Matmul and convolution FLOPs of one image-caption pair through `models.coca.CoCa` (teacher forcing):
    the ViT (all tokens), the attentional pooler(s) (queries of width embed_dim attend to the ViT tokens)
    and the image projection, the unimodal text tower (the context plus its CLS token) and its projection,
    and the multimodal decoder on all text positions but the last (per layer a causal self-attention block
    and a cross-attention block to the image memory, each with its MLP) with its vocabulary head. The
    auxiliary tagging head (`model.num_tags`, not CoCa's) is left out. `configs/coca.py:base` (open_clip's
    coca_ViT-B-32 sizes): 33.1 GFLOPs, of which the 49408-word head 3.8."""
    m = config.model
    v, t, d = m.vision, m.text, m.decoder
    e, w = m.embed_dim, t.width
    n_img = (v.image_size // v.patch_size) ** 2 + 1
    vision = vit_forward_flops(v.image_size, v.patch_size, v.width, v.layers, v.get("mlp_ratio", 4.0),
                               v.get("stem", "patch"))

    def pool(queries: int) -> float:  # q/out projections, k/v projections of the tokens, scores and values
        return 4.0 * queries * e * e + 4.0 * n_img * v.width * e + 4.0 * queries * n_img * e

    if m.pooler == "open_clip":  # query 0 is the contrastive one, the rest the decoder's memory
        pooled, memory = pool(m.num_queries), m.num_queries - 1
    else:
        pooled, memory = pool(1) + pool(m.num_queries), m.num_queries
    text = transformer_forward_flops(t.context_length + 1, w, t.layers, int(w * t.get("mlp_ratio", 4.0)))
    n, mlp = t.context_length - 1, int(w * d.get("mlp_ratio", 4.0))
    cross = 2.0 * n * (2 * w * w + 2 * w * mlp) + 4.0 * memory * e * w + 4.0 * n * memory * w
    decoder = transformer_forward_flops(n, w, d.layers, mlp) + d.layers * cross + 2.0 * n * w * t.vocab_size
    return vision + pooled + 2.0 * e * e + text + 2.0 * w * e + decoder


def coca_train_flops(config, global_batch: int) -> float:
    """3 × (forward of every pair + the B×B contrastive logits, both directions)."""
    logits = 2 * 2.0 * global_batch * global_batch * config.model.embed_dim
    return 3.0 * (coca_forward_flops(config) * global_batch + logits)


def resnet_v1_forward_flops(encoder, image_size: int) -> float:
    """Convolution FLOPs (2 per multiply-add) of one image through `ResNetV1` as configured by
    `config.model.encoder`; ResNet-50 at 224 px: 8.18 GFLOPs (4.09 GMACs, the usual count)."""
    from colearn_jax.nn.resnet_v1 import DEPTHS  # noqa: PLC0415

    if encoder.get("stage_sizes"):
        block, stages = encoder.block, tuple(encoder.stage_sizes)
    else:
        block, stages = DEPTHS[encoder.depth]
    width = int(round(64 * encoder.width_multiplier))
    conv = lambda k, cin, cout, hw: 2.0 * k * k * cin * cout * hw * hw  # noqa: E731
    side = image_size if encoder.cifar_stem else -(-image_size // 2)
    flops = conv(3 if encoder.cifar_stem else 7, 3, width, side)
    if not encoder.cifar_stem:
        side = -(-side // 2)  # the 3x3 stride-2 max pool
    cin, expansion = width, 4 if block == "bottleneck" else 1
    for i, n in enumerate(stages):
        planes = width * 2**i
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            out_side = -(-side // stride)
            if block == "bottleneck":
                flops += conv(1, cin, planes, side) + conv(3, planes, planes, out_side)
                flops += conv(1, planes, planes * 4, out_side)
            else:
                flops += conv(3, cin, planes, out_side) + conv(3, planes, planes, out_side)
            if stride != 1 or cin != planes * expansion:
                flops += conv(1, cin, planes * expansion, out_side)
            cin, side = planes * expansion, out_side
    return flops


def simclr_train_flops(config, global_batch: int) -> float:
    """3 × forward of the 2N views through encoder and projection head, plus NT-Xent's four N×N blocks."""
    from colearn_jax.models.simclr_system import build_encoder  # noqa: PLC0415

    m, e = config.model, config.model.encoder
    if e.get("kind", "resnet") == "vit":
        v = e.vit
        enc = vit_forward_flops(config.data.image_size, v.patch_size, v.width, v.layers, v.mlp_ratio, v.stem)
        d = v.width
    else:
        enc, d = resnet_v1_forward_flops(e, config.data.image_size), build_encoder(config).num_features
    head = 0.0
    for j in range(m.head.num_layers):
        out = m.head.out_dim if j == m.head.num_layers - 1 else (m.head.get("hidden_dim") or d)
        head += 2.0 * d * out
        d = out
    views = 2 * global_batch
    loss = 4 * 2.0 * global_batch * global_batch * d
    return 3.0 * ((enc + head) * views + loss)


# ----------------------------------------------------------------------------- timing
def block(tree):
    """jax.block_until_ready without importing JAX at module level."""
    import jax  # noqa: PLC0415

    return jax.block_until_ready(tree)


def time_steps(step: Callable, carry, batches: Sequence[Any], *, warmup: int, steps: int) -> tuple[Any, list[float]]:
    """Runs `carry, aux = step(carry, batch)` `warmup` + `steps` times (cycling through `batches`),
    blocking on the results after every call. Returns the final carry and the steady-state step times."""
    if steps <= 0:
        raise ValueError(f"steps={steps} must be positive.")
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        carry, aux = step(carry, batch)
        block((carry, aux))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return carry, times


def summarize_times(times: Iterable[float]) -> dict[str, float]:
    times = sorted(times)
    return {
        "median_s": statistics.median(times),
        "min_s": times[0],
        "max_s": times[-1],
        "mean_s": statistics.fmean(times),
        "n": len(times),
    }


class Timer:
    """`with Timer() as t: ...; t.seconds` (None until the block has run)."""

    def __init__(self):
        self.seconds: float | None = None

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False


# ----------------------------------------------------------------------------- formatting
def fmt_bytes(n: float | int | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
