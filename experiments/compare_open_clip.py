"""One CLIP training step, colearn_jax vs open_clip (PyTorch), same architecture, same process.

  python experiments/compare_open_clip.py                       # CPU: small ViT, batch 64, fp32
  python experiments/compare_open_clip.py --rounds=10 --steps_per_round=5 --out=/tmp/vs_open_clip.json
  python experiments/compare_open_clip.py --device=cuda --arch=vit_b16 --batch_size=256 \
      --dtype=bfloat16 --attention_impl=cudnn                     # on a GPU host (see below)
  python experiments/compare_open_clip.py --sides=open_clip --device=cuda --arch=vit_b16 \
      --batch_size=256 --dtype=bfloat16                           # open_clip alone (experiments/gpu_suite.sh)

Both sides build the same model from scratch (random init). `--arch=small` (default): a ViT image
tower (64 px, patch 8, width 256, 6 layers, 4 heads, MLP 4×, class token, ln_pre/ln_post, bias-free
projection) and a causal text tower (vocab 49408, context 77, width 256, 6 layers, 4 heads,
argmax/EOT pooling), embed 256; `--arch=vit_b32` / `vit_b16`: open_clip's ViT-B-32 / ViT-B-16 at
224 px with the 12-layer 512-wide text tower; `--arch=tiny`: configs/clip.py:tiny (for smoke runs;
pass --context_length=24). Exact GELU, CLIP's symmetric InfoNCE with a learnable temperature clamped to [0, ln 100],
AdamW (lr 5e-4, β=(0.9, 0.98), eps 1e-6, weight decay 0.2 on ≥2-D weights only), no grad clipping.
open_clip's model comes from `open_clip.create_model` with that config registered via
`open_clip.add_model_config`; its step is open_clip's own (`ClipLoss`, `torch.optim.AdamW` defaults,
eager mode, no AMP, no torch.compile). colearn_jax's is the jitted, donated train step of
`experiments/benchmark.py`. The two alternate in rounds (`--steps_per_round` timed steps of one side,
then of the other, after `--warmup` steps each) so background load hits both alike; the median step
time per side gives examples/s and the ratio colearn_jax / open_clip.

Host allocator: before either runtime starts, `colearn_jax.host_memory.configure_allocator()` makes
glibc serve the whole process from one heap that keeps freed memory (both sides get it; it speeds up
both; `--nohost_malloc` turns it off). Without it XLA:CPU maps and page-faults its 1.7 GiB scratch
buffer afresh every step (the table's "page faults/step" column shows it).

Threads: XLA's CPU backend runs on all host cores; torch gets `torch.set_num_threads(os.cpu_count())`
(override with --threads). Parameter counts of both models are printed as an architecture check.
On a GPU host pass --device=cuda (torch) — JAX picks the GPU by itself; compare at bf16 with
--dtype=bfloat16 (colearn compute dtype; torch autocast bf16, i.e. open_clip's `--precision amp_bf16`).

`--sides=open_clip` (or `colearn_jax`) times one side alone, with no alternation: on a GPU the two
runtimes' caching allocators would otherwise hold both peaks at once (JAX preallocates 75 % of the
GPU), and JAX is never started in an open_clip-only run. The JSON then has that side's summary only
(`ratio` is null); each side's summary carries its device, peak device memory (CUDA) and MFU from
the analytic model FLOPs (`perf.clip_train_flops`) where the chip's peak is known.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


_TEXT_B = dict(text_width=512, text_layers=12, text_heads=8, vocab_size=49408, embed_dim=512)
ARCHS = {
    # The CPU comparison: a small ViT CLIP.
    "small": dict(image_size=64, patch_size=8, vision_width=256, vision_layers=6, vision_heads=4,
                  text_width=256, text_layers=6, text_heads=4, vocab_size=49408, embed_dim=256),
    # = configs/clip.py:tiny (context 24), for smoke runs of experiments/gpu_suite.sh.
    "tiny": dict(image_size=16, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                 text_width=32, text_layers=2, text_heads=2, vocab_size=384, embed_dim=16),
    # The paper sizes (open_clip's ViT-B-32 / ViT-B-16 configs), for GPU hosts.
    "vit_b32": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12, **_TEXT_B),
    "vit_b16": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12, **_TEXT_B),
}

if __name__ == "__main__":  # flags only when run as a script (tests import the functions)
    flags.DEFINE_integer("batch_size", 64, "Global batch size (both sides).")
    flags.DEFINE_integer("rounds", 8, "Alternation rounds.")
    flags.DEFINE_integer("steps_per_round", 4, "Timed steps per side per round.")
    flags.DEFINE_integer("warmup", 5, "Untimed alternating steps per side before the first round.")
    flags.DEFINE_integer("threads", 0, "torch threads; 0 = os.cpu_count().")
    flags.DEFINE_string("device", "cpu", "torch device (cpu | cuda).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both sides.")
    flags.DEFINE_integer("context_length", 77, "Text context length (both sides).")
    flags.DEFINE_string("out", "", "Write the results as JSON here.")
    flags.DEFINE_enum("attention_impl", None, ["xla", "cudnn"], "colearn_jax attention kernel (cudnn: GPU).")
    flags.DEFINE_enum("arch", "small", list(ARCHS), "Architecture (both sides).")
    flags.DEFINE_bool("host_malloc", True, "Apply colearn_jax.host_memory.configure_allocator() (both sides).")
    flags.DEFINE_list("sides", ["colearn_jax", "open_clip"], "Sides to time: both alternate; one runs alone.")
FLAGS = flags.FLAGS


def open_clip_model_cfg(a: dict, context_length: int) -> dict:
    return {
        "embed_dim": a["embed_dim"],
        "vision_cfg": {"image_size": a["image_size"], "layers": a["vision_layers"], "width": a["vision_width"],
                       "patch_size": a["patch_size"], "head_width": a["vision_width"] // a["vision_heads"],
                       "mlp_ratio": 4.0},
        "text_cfg": {"context_length": context_length, "vocab_size": a["vocab_size"], "width": a["text_width"],
                     "heads": a["text_heads"], "layers": a["text_layers"]},
    }


def synthetic_data(a: dict, batch_size: int, context_length: int, seed: int = 0):
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    s, eot_id = a["image_size"], a["vocab_size"] - 1
    images = rng.standard_normal((batch_size, s, s, 3)).astype(np.float32)
    ids = rng.integers(1, eot_id - 2, size=(batch_size, context_length)).astype(np.int32)
    eot = rng.integers(1, context_length, size=batch_size)
    ids[np.arange(batch_size), eot] = eot_id
    ids[np.arange(context_length)[None, :] > eot[:, None]] = 0
    return images, ids


# ----------------------------------------------------------------------------- open_clip side
class OpenClipSide:
    name = "open_clip"

    def __init__(self, arch, batch_size, context_length, dtype, device, threads):
        import open_clip  # noqa: PLC0415
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch, self.device = torch, torch.device(device)
        cfg_dir = tempfile.mkdtemp(prefix="colearn_open_clip_cfg_")
        name = f"colearn-bench-{arch['image_size']}px-p{arch['patch_size']}-w{arch['vision_width']}"
        with open(os.path.join(cfg_dir, f"{name}.json"), "w") as f:
            json.dump(open_clip_model_cfg(arch, context_length), f)
        open_clip.add_model_config(cfg_dir)
        self.model = open_clip.create_model(name, pretrained=None, precision="fp32", device=self.device,
                                            output_dict=True)
        self.model.train()
        self.loss = open_clip.ClipLoss()
        # open_clip's main.py: no weight decay on 1-D params, biases, norms, logit_scale.
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(self.model.named_parameters())
        self.opt = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
        self.autocast = dtype == "bfloat16"
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.device_kind = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.batches = []
        for seed in range(2):
            images, ids = synthetic_data(arch, batch_size, context_length, seed)
            self.batches.append((torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device),
                                 torch.from_numpy(ids).long().to(self.device)))
        self.i = 0

    def step(self):
        torch = self.torch
        images, texts = self.batches[self.i % 2]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(images, texts)
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    def peak_memory_bytes(self) -> int | None:
        """The CUDA caching allocator's peak of allocated bytes; None on the CPU."""
        return int(self.torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None


# ----------------------------------------------------------------------------- colearn_jax side
def make_colearn_config(a: dict, batch_size: int, context_length: int, dtype: str, attention_impl: str | None = None):
    import importlib.util  # noqa: PLC0415

    import ml_collections  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("colearn_clip_config", os.path.join(ROOT, "configs", "clip.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("digits")
    c.unlock()
    c.model.embed_dim = a["embed_dim"]
    c.model.activation = "gelu"
    c.model.dtype = dtype
    c.model.scan = False
    c.model.attention_impl = attention_impl
    c.model.vision = ml_collections.ConfigDict(dict(
        type="vit", image_size=a["image_size"], patch_size=a["patch_size"], width=a["vision_width"],
        layers=a["vision_layers"], heads=a["vision_heads"], mlp_ratio=4.0, pool="cls"))
    c.model.text = ml_collections.ConfigDict(dict(
        vocab_size=a["vocab_size"], context_length=context_length, width=a["text_width"], layers=a["text_layers"],
        heads=a["text_heads"], mlp_ratio=4.0))
    c.data.image_size, c.data.context_length = a["image_size"], context_length
    c.data.batch_size = c.data.eval_batch_size = batch_size
    c.loss.name, c.loss.gather = "clip", "auto"
    c.optim.update(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=None,
                   schedule="constant", warmup_steps=0)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1))
    c.sharding = "dp"
    c.lock()
    return c


class ColearnSide:
    name = "colearn_jax"

    def __init__(self, arch, batch_size, context_length, dtype, attention_impl=None):
        import jax  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

        import benchmark  # noqa: PLC0415  (experiments/benchmark.py)
        from colearn_jax import sharding  # noqa: PLC0415

        self.jax = jax
        self.device_kind = jax.devices()[0].device_kind
        config = make_colearn_config(arch, batch_size, context_length, dtype, attention_impl)
        parts = benchmark.lower_train_step(config, devices=jax.devices()[:1])
        self.compile_s = parts["lower_s"] + parts["compile_s"]
        self.flops_per_step = benchmark.analyze_step(parts)["flops_per_step"]
        mesh, rules = parts["mesh"], parts["rules"]
        self.state = parts["program"].init_state(seed=0)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
        self.compiled = parts["compiled"]
        self.batches = []
        for seed in range(2):
            images, ids = synthetic_data(arch, batch_size, context_length, seed)
            self.batches.append(sharding.shard_batch({"image": images, "text": ids}, mesh, rules))
        self.i = 0

    def step(self):
        batch = self.batches[self.i % 2]
        self.i += 1
        self.state, metrics = self.compiled(self.state, batch)
        return float(self.jax.block_until_ready(metrics)["loss"])

    def peak_memory_bytes(self) -> int | None:
        """The device allocator's peak bytes in use (GPU/TPU); None on the CPU."""
        from colearn_jax import perf  # noqa: PLC0415

        return perf.device_memory_stats(self.jax.devices()[:1])["peak_bytes_in_use"]


# ----------------------------------------------------------------------------- the race
def race(sides, *, rounds: int, steps_per_round: int, warmup: int, pause_s: float = 0.2):
    """Alternates the sides; returns every timed step's seconds per side, and each side's minor page
    faults per step (the process's count while that side ran)."""
    import resource  # noqa: PLC0415

    times = {s.name: [] for s in sides}
    faults = {s.name: 0 for s in sides}
    for _ in range(warmup):  # alternating warm-up: both runtimes' heaps reach their steady layout
        for s in sides:
            s.step()
    for r in range(rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))  # neither side always goes first
        for s in order:
            time.sleep(pause_s)  # let the other runtime's spinning worker threads go idle
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(steps_per_round):
                t0 = time.perf_counter()
                s.step()
                times[s.name].append(time.perf_counter() - t0)
            faults[s.name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return times, {name: faults[name] / max(len(ts), 1) for name, ts in times.items()}


def make_sides(names, arch, batch_size, context_length, dtype, *, device, threads, attention_impl=None):
    """The sides named in `names` (colearn_jax, open_clip), in that order."""
    makers = {
        "colearn_jax": lambda: ColearnSide(arch, batch_size, context_length, dtype, attention_impl),
        "open_clip": lambda: OpenClipSide(arch, batch_size, context_length, dtype, device, threads),
    }
    unknown = [n for n in names if n not in makers]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--sides={','.join(names)}: name each of {sorted(makers)} at most once.")
    return [makers[n]() for n in names]


def summarize(sides, times, faults, batch_size: int, train_flops: float | None, dtype: str) -> dict:
    """Per side: step-time stats, examples/s, page faults/step, device, peak device memory and MFU
    from the analytic model FLOPs (None where the chip's peak FLOP/s is unknown, e.g. a CPU)."""
    from colearn_jax import perf  # noqa: PLC0415

    summary = {}
    for side in sides:
        ts = times[side.name]
        med = statistics.median(ts)
        summary[side.name] = {
            "median_step_s": med, "min_step_s": min(ts), "max_step_s": max(ts), "n": len(ts),
            "examples_per_s": batch_size / med, "page_faults_per_step": faults[side.name],
            "device_kind": side.device_kind, "num_params": side.num_params,
            "peak_memory_bytes": side.peak_memory_bytes(),
            "mfu_analytic": perf.mfu(train_flops, med, 1, perf.peak_flops(side.device_kind, dtype)),
        }
    return summary


def main(argv):
    del argv
    from colearn_jax import host_memory, perf  # noqa: PLC0415

    # Before JAX (or torch) starts: glibc serves both sides from one heap that keeps freed memory, so
    # XLA's per-step scratch buffer is not page-faulted in again every step (host_memory docstring).
    malloc = host_memory.configure_allocator(only_if_cpu=FLAGS.device == "cpu") if FLAGS.host_malloc else None
    threads = FLAGS.threads or os.cpu_count()
    b, ctx = FLAGS.batch_size, FLAGS.context_length
    load_before = os.getloadavg()[0]
    arch = ARCHS[FLAGS.arch]
    sides = make_sides(FLAGS.sides, arch, b, ctx, FLAGS.dtype, device=FLAGS.device, threads=threads,
                       attention_impl=FLAGS.attention_impl)
    by_name = {s.name: s for s in sides}
    colearn = by_name.get("colearn_jax")
    print("parameters: " + "  ".join(f"{s.name} {s.num_params:,}" for s in sides)
          + (f"  (colearn compile {colearn.compile_s:.1f} s)" if colearn else ""))
    if len({s.num_params for s in sides}) > 1:
        print("WARNING: parameter counts differ; the architectures are not identical.")
    times, faults = race(sides, rounds=FLAGS.rounds, steps_per_round=FLAGS.steps_per_round, warmup=FLAGS.warmup)
    load_after = os.getloadavg()[0]
    train_flops = perf.clip_train_flops(make_colearn_config(arch, b, ctx, FLAGS.dtype), b)
    summary = summarize(sides, times, faults, b, train_flops, FLAGS.dtype)
    rows = [(n, f"{1e3 * s['median_step_s']:.1f}", f"{1e3 * s['min_step_s']:.1f}..{1e3 * s['max_step_s']:.1f}",
             f"{s['examples_per_s']:.1f}", f"{s['page_faults_per_step']:,.0f}", perf.fmt_pct(s["mfu_analytic"]),
             perf.fmt_bytes(s["peak_memory_bytes"]), s["n"]) for n, s in summary.items()]
    print(perf.format_table(rows, ("side", "median step ms", "min..max ms", "examples/s", "page faults/step",
                                   "MFU (analytic)", "peak device memory", "timed steps")))
    ratio = None
    if len(summary) == 2:
        ratio = summary["colearn_jax"]["examples_per_s"] / summary["open_clip"]["examples_per_s"]
        print(f"ratio colearn_jax / open_clip examples/s: {ratio:.2f}x")
    versions = {}
    if colearn:
        import jax  # noqa: PLC0415  (only when the colearn side ran: an open_clip-only run never starts JAX)

        versions["jax"] = jax.__version__
    if "open_clip" in by_name:
        import open_clip  # noqa: PLC0415
        import torch  # noqa: PLC0415

        versions.update(torch=torch.__version__, open_clip=open_clip.__version__)
    flops = colearn.flops_per_step if colearn else None
    print(f"(step = {perf.fmt_num(flops / 1e9 if flops else None, 1)} GFLOPs by XLA, "
          f"{perf.fmt_num(train_flops / 1e9 if train_flops else None, 1)} analytic; batch {b}, {FLAGS.dtype}, "
          f"torch threads {threads}, {versions} on {sorted({s.device_kind for s in sides})}; "
          f"load avg {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs; host malloc {malloc})")
    payload = {"mode": "compare_open_clip", "sides": list(FLAGS.sides), "batch_size": b, "context_length": ctx,
               "dtype": FLAGS.dtype, "threads": threads, "device": FLAGS.device,
               "attention_impl": FLAGS.attention_impl, "arch": {"name": FLAGS.arch, **arch},
               "params": {n: s.num_params for n, s in by_name.items()},
               "summary": summary, "ratio": ratio, "flops_per_step": flops, "flops_per_step_analytic": train_flops,
               "host_malloc": malloc, "times": times, "loadavg": [load_before, load_after], **versions}
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
