"""Benchmarks of the jitted train step, of the global contrastive losses' memory, and of compile time.

Train-step throughput (default mode): compiles the donated, sharded train step of any config and
times it on synthetic batches (random images / token ids of the config's shapes, placed with
`sharding.shard_batch`, so no input pipeline is measured):

  python experiments/benchmark.py --config=configs/clip.py:digits
  python experiments/benchmark.py --config=configs/clip.py:vit_b16 --config.sharding=fsdp \
      --config.model.dtype=bfloat16 --config.model.remat_policy=dots --steps=20 --out=/tmp/b16.json
  python experiments/benchmark.py --config=configs/clip.py:tiny --num_cpu_devices=8   # simulated mesh
  python experiments/benchmark.py --config=configs/clip.py:vit_b16 --num_cpu_devices=8 --compile_only \
      --config.sharding=fsdp --config.model.remat_policy=full   # memory plan only, nothing runs
  python experiments/benchmark.py --config=configs/simclr.py:resnet50_imagenet --num_cpu_devices=8 \
      --compile_only --config.loss.gather=ring   # SimCLR ResNet-50, batch 4096 (RESULTS.md §8)
  python experiments/benchmark.py --config=configs/simclr.py:digit_scenes   # SimCLR's CPU demo step
  python experiments/benchmark.py --config=configs/imagebind.py:digits   # six towers (RESULTS.md §10)

Reports lower/compile time, the median step time over `--steps` steps after `--warmup` steps
(each blocked with block_until_ready), examples/s (global and per device), model TFLOP/s and MFU,
and per-device memory (`compiled.memory_analysis()`; `device.memory_stats()` where the backend has it).
FLOPs: `Lowered.cost_analysis()` of the un-partitioned step gives the *global* FLOPs per step (used
for TFLOP/s and MFU); `Compiled.cost_analysis()` of the SPMD program is *per device* (see
colearn_jax/perf.py). The analytic model FLOPs (3 × forward; CLIP ViT, CoCa and SimCLR configs) are
printed beside them. MFU needs
the chip's peak: looked up from `device_kind` (H100/H200/A100/TPU v4/v5e/v5p/v6e, bf16 or f32 by
`config.model.dtype`), else `--peak_tflops`; CPU has none, so MFU is "n/a" there.

Loss memory (`--loss_memory`): compiles only value+grad of `clip_loss` / `siglip_loss` /
`ntxent_loss` for every gather mode (auto / all_gather / ring) at global batches 1k…512k on a
simulated 8-device mesh, D=512, and tabulates the per-device temp bytes XLA plans. Nothing is
allocated; each cell compiles in a subprocess with `--cell_timeout`, so a cell that is too slow or
fails reads "n/a (reason)":

  python experiments/benchmark.py --loss_memory --num_cpu_devices=8 --out=/tmp/loss_memory.json

Compile time (`--compile_time`): lower + compile of the train step of `--config` (default
vit_b16) from abstract shapes with `config.model.scan` True and False, each in a fresh process:

  python experiments/benchmark.py --compile_time --config=configs/clip.py:vit_b16 --repeats=3 --out=/tmp/compile.json

Input pipeline (`--pipeline`; default config configs/clip.py:digits): side by side, on the real
training data of the config,
  pipeline alone  host iterator (`data.make_train_iterator`), then + placement (`sharding.shard_batch`,
                  blocked), no step;
  step alone      the compiled step on two fixed device batches (as the default mode);
  loop            iterator -> `data.device_prefetch(place, --prefetch)` -> step, as the trainer runs it
                  (async dispatch, one block at the end; `--prefetch=0` places inline in the loop);
and the ratio loop / step alone (its mean step time, i.e. the same total-time accounting). The three
alternate for `--rounds` rounds on one compiled step; the table shows medians over rounds:

  python experiments/benchmark.py --pipeline --steps=40 --rounds=3 --out=/tmp/pipeline.json
  python experiments/benchmark.py --pipeline --config.data.num_workers=2 --prefetch=0   # variants

On GPU/TPU the same commands run unchanged (drop --num_cpu_devices); pass --multihost on a TPU pod
slice or multi-GPU hosts to call jax.distributed.initialize() (every process runs the same command;
each feeds its slice of the global batch).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from colearn_jax import perf  # noqa: E402  (no JAX import at module level)

LOSS_NAMES = ("clip", "siglip", "ntxent")
GATHER_MODES = ("auto", "all_gather", "ring")
DEFAULT_LOSS_BATCHES = (1024, 8192, 65536, 524288)


def default_pipeline_config(argv: list[str]) -> list[str]:
    """`--pipeline` without `--config=...` means configs/clip.py:digits (the other modes: vit_b16).
    Inserted into argv before flags are parsed, so `--config.x=y` overrides still apply."""
    if "--pipeline" in argv and not any(a.startswith(("--config=", "-config=")) for a in argv):
        return [argv[0], f"--config={os.path.join(ROOT, 'configs/clip.py')}:digits", *argv[1:]]
    return argv


if __name__ == "__main__":  # flags only when run as a script (tests import the functions)
    sys.argv[:] = default_pipeline_config(sys.argv)  # before DEFINE_config_file, which reads sys.argv
    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(ROOT, "configs/clip.py:vit_b16"), "Config file with preset, e.g. configs/clip.py:digits.",
        lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed steady-state steps.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
    flags.DEFINE_integer("batch_size", 0, "Global batch size; 0 = config.data.batch_size.")
    flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU when the chip is not in the table.")
    flags.DEFINE_integer("num_cpu_devices", 0, "Simulate this many CPU devices (sets XLA_FLAGS and JAX_PLATFORMS=cpu "
                         "before JAX starts).")
    flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pod slices, multi-GPU hosts).")
    flags.DEFINE_string("out", "", "Write the results as JSON here.")
    flags.DEFINE_bool("loss_memory", False, "Tabulate per-device temp memory of the contrastive losses (compile only).")
    flags.DEFINE_list("loss_names", list(LOSS_NAMES), "Losses for --loss_memory.")
    flags.DEFINE_list("gathers", list(GATHER_MODES), "Gather modes for --loss_memory.")
    flags.DEFINE_list("loss_batches", [str(b) for b in DEFAULT_LOSS_BATCHES], "Global batches for --loss_memory.")
    flags.DEFINE_integer("loss_dim", 512, "Embedding width for --loss_memory.")
    flags.DEFINE_bool("compile_only", False, "Train-step mode: lower and compile only; report FLOPs and the per-device "
                      "memory plan (no step runs, nothing is allocated).")
    flags.DEFINE_bool("compile_time", False, "Compile time of the train step with model.scan True vs False.")
    flags.DEFINE_integer("repeats", 1, "--compile_time: fresh-process compiles per variant, alternating; the "
                         "table shows the medians (the host may be shared).")
    flags.DEFINE_integer("cell_timeout", 900, "Seconds per subprocess cell (--loss_memory, --compile_time); "
                         "0 runs every cell in this process without a limit.")
    flags.DEFINE_string("cell", "", "Internal: run one cell given as JSON and print its result as JSON.")
    flags.DEFINE_bool("pipeline", False, "Input pipeline alone vs step alone vs the loop (default config: digits).")
    flags.DEFINE_integer("prefetch", 2, "--pipeline: device_prefetch buffer size in the loop; 0 places inline.")
    flags.DEFINE_integer("rounds", 3, "--pipeline: alternating step-alone / loop rounds (medians are reported).")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- device set-up
def setup_devices(num_cpu_devices: int = 0, multihost: bool = False):
    """Sets XLA_FLAGS for simulated CPU devices and, on a CPU host, glibc's allocator
    (`colearn_jax.host_memory`); both must happen before JAX starts."""
    from colearn_jax import host_memory  # noqa: PLC0415

    if num_cpu_devices:
        from colearn_jax import cpu_devices  # noqa: PLC0415

        cpu_devices.simulate(num_cpu_devices)
        os.environ["JAX_PLATFORMS"] = "cpu"
    host_memory.configure_allocator()
    import jax  # noqa: PLC0415

    if multihost:
        jax.distributed.initialize()
    return jax


def environment() -> dict:
    import jax  # noqa: PLC0415

    d = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "host_cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------- synthetic data
def synthetic_batch(example: dict, config, seed: int = 0, process_rows: int | None = None) -> dict:
    """Random host arrays shaped like `example` (a dict of ShapeDtypeStructs): normal floats, and
    token ids in [1, vocab) with the end-of-text id (vocab − 1, the largest) at a random position."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    vocab = int(config.model.text.vocab_size) if "text" in config.model else 256
    out = {}
    for key, s in example.items():
        shape = ((process_rows,) + tuple(s.shape[1:])) if process_rows else tuple(s.shape)
        if np.issubdtype(s.dtype, np.integer):
            ids = rng.integers(1, max(vocab - 1, 2), size=shape).astype(s.dtype)
            if ids.ndim == 2:
                eot = rng.integers(1, shape[1], size=shape[0])
                ids[np.arange(shape[0]), eot] = vocab - 1
                ids[np.arange(shape[1])[None, :] > eot[:, None]] = 0
            out[key] = ids
        else:
            out[key] = rng.standard_normal(shape).astype(s.dtype)
    return out


# ----------------------------------------------------------------------------- the train step
def _prepare(config, batch_size: int | None):
    config = config.copy_and_resolve_references()
    if batch_size:
        config.data.batch_size = int(batch_size)
    config.data.eval_batch_size = config.data.batch_size  # validation checks it; no eval here
    return config


def lower_train_step(config, *, devices=None, batch_size: int | None = None, compile: bool = True) -> dict:
    """Lowers (and compiles) the donated, sharded train step from abstract shapes through
    `TrainProgram` (as training does), timing lowering and compilation separately.
    Returns a dict with the pieces a run needs."""
    from colearn_jax.train.program import TrainProgram  # noqa: PLC0415

    config = _prepare(config, batch_size)
    with perf.Timer() as t_lower:
        program = TrainProgram.build(config, devices=devices)
        lowered = program.lower()
    compiled, t_compile = None, perf.Timer()
    if compile:
        with t_compile:
            compiled = lowered.compile()
    return dict(config=config, program=program, system=program.system, model=program.model, mesh=program.mesh,
                rules=program.rules, tx=program.tx, shardings=program.state_shardings,
                example=program.system.example_batch(config, config.data.batch_size), lowered=lowered,
                compiled=compiled, lower_s=t_lower.seconds, compile_s=t_compile.seconds, dp=program.dp)


def analyze_step(parts: dict, peak_per_device: float | None = None, *, count_unscanned: bool = True) -> dict:
    """FLOPs and memory of a lowered+compiled step (no execution).

    FLOPs from `perf.step_flops`: flops_per_step is the global XLA count of the un-partitioned step,
    taken from its unrolled twin (lowered, not compiled) when model.scan is on or attention is
    cuDNN's: XLA counts a scanned stack of L layers about 1/L times (vit_b16 at batch 256: 2.76 vs
    31.7 TFLOPs per step). `count_unscanned=False` skips the twin and reports the raw count.
    flops_per_step_xla_raw: what the lowered program itself reports; flops_per_step_per_device_xla:
    what the compiled SPMD program of one device reports.
    """
    config, mesh = parts["config"], parts["mesh"]
    devices = list(mesh.devices.flat)
    lower = (lambda c: lower_train_step(c, devices=devices, compile=False)["lowered"]) if count_unscanned else None
    return {
        "global_batch": config.data.batch_size,
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "sharding": config.sharding if isinstance(config.sharding, str) else "custom",
        "dtype": config.model.dtype,
        "scan": bool(config.model.get("scan", False)),
        "remat_policy": config.model.get("remat_policy", "none"),
        "attention_impl": config.model.get("attention_impl") or "xla",
        "lower_s": parts["lower_s"],
        "compile_s": parts["compile_s"],
        **perf.step_flops(config, parts["lowered"], parts["compiled"], lower=lower),
        "peak_tflops_per_device": peak_per_device / 1e12 if peak_per_device else None,
        "memory": perf.memory_analysis(parts["compiled"]),
    }


def compile_only_report(config, *, batch_size: int | None = None, peak_tflops: float | None = None) -> dict:
    """`--compile_only` of this script and of experiments/train.py: lowers and compiles the train step
    (nothing is allocated) and returns {"mode": "compile_only", "env": ..., "result": analyze_step(...)}:
    global FLOPs per step and the per-device memory plan."""
    parts = lower_train_step(config, batch_size=batch_size)
    kind = next(iter(parts["mesh"].devices.flat)).device_kind
    result = analyze_step(parts, resolve_peak(kind, parts["config"].model.dtype, peak_tflops))
    return {"mode": "compile_only", "env": environment(), "result": result}


def resolve_peak(device_kind: str, dtype: str, peak_tflops: float | None) -> float | None:
    if peak_tflops:
        return float(peak_tflops) * 1e12
    return perf.peak_flops(device_kind, dtype)


def benchmark_train_step(config, *, devices=None, steps: int = 10, warmup: int = 3, batch_size: int | None = None,
                         peak_tflops: float | None = None, seed: int = 0) -> dict:
    """Compiles and times the train step on synthetic batches; returns a flat dict of results.

    Keys: compile/lower time, step_time_s (median), examples_per_s (+ _per_device), flops_per_step
    (global, XLA), model_tflops_per_s, mfu (None without a known peak), memory (per device), …
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from colearn_jax import sharding  # noqa: PLC0415

    parts = lower_train_step(config, devices=devices, batch_size=batch_size)
    config, mesh, rules, system = parts["config"], parts["mesh"], parts["rules"], parts["system"]
    devs = list(mesh.devices.flat)
    peak = resolve_peak(devs[0].device_kind, config.model.dtype, peak_tflops)
    result = analyze_step(parts, peak)

    state = parts["program"].init_state()
    rows = config.data.batch_size // jax.process_count()
    batches = [
        sharding.shard_batch(synthetic_batch(parts["example"], config, seed + i + 1000 * jax.process_index(),
                                             process_rows=rows), mesh, rules)
        for i in range(2)
    ]
    with jax.set_mesh(mesh):
        state, times = perf.time_steps(parts["compiled"], state, batches, warmup=warmup, steps=steps)
    del state
    t = perf.summarize_times(times)
    n = mesh.size
    step_s = t["median_s"]
    result.update(
        step_time_s=step_s,
        step_time_min_s=t["min_s"],
        step_time_max_s=t["max_s"],
        steps=steps,
        warmup=warmup,
        examples_per_s=config.data.batch_size / step_s,
        examples_per_s_per_device=config.data.batch_size / step_s / n,
        model_tflops_per_s=perf.tflops_per_s(result["flops_per_step"], step_s),
        model_tflops_per_s_per_device=(perf.tflops_per_s(result["flops_per_step"], step_s) or 0) / n
        if result["flops_per_step"] else None,
        mfu=perf.mfu(result["flops_per_step"], step_s, n, peak),
        mfu_analytic=perf.mfu(result["flops_per_step_analytic"], step_s, n, peak),
        device_memory=perf.device_memory_stats(devs),
    )
    return result


def format_result(r: dict) -> str:
    """The result of `benchmark_train_step` (or, without the timing rows, of `analyze_step`) as a table."""
    m, timed = r["memory"], "step_time_s" in r
    rows = [
        ("devices / mesh", f"{r['devices']} {r['mesh']}"),
        ("sharding / dtype / scan / remat", f"{r['sharding']} / {r['dtype']} / {r['scan']} / {r['remat_policy']}"),
        ("global batch", r["global_batch"]),
        ("lower / compile (s)", f"{r['lower_s']:.2f} / {r['compile_s']:.2f}"),
    ]
    if timed:
        rows += [
            ("step time median (min..max) ms",
             f"{1e3 * r['step_time_s']:.1f} ({1e3 * r['step_time_min_s']:.1f}..{1e3 * r['step_time_max_s']:.1f})"),
            ("examples/s (global / per device)",
             f"{r['examples_per_s']:.1f} / {r['examples_per_s_per_device']:.1f}"),
        ]
    rows += [
        ("GFLOPs/step XLA global (per device)",
         f"{perf.fmt_num(_g(r['flops_per_step']), 1)} ({perf.fmt_num(_g(r['flops_per_step_per_device_xla']), 1)}"
         f"{', scanned: loop body counted once' if r['scan'] else ''})"),
        ("GFLOPs/step analytic (3x fwd)", perf.fmt_num(_g(r["flops_per_step_analytic"]), 1)),
    ]
    if timed:
        rows += [
            ("model TFLOP/s (global / per device)",
             f"{perf.fmt_num(r['model_tflops_per_s'], 3)} / {perf.fmt_num(r['model_tflops_per_s_per_device'], 3)}"),
            ("peak TFLOP/s per device", perf.fmt_num(r["peak_tflops_per_device"], 1)),
            ("MFU (XLA flops / analytic)", f"{perf.fmt_pct(r['mfu'])} / {perf.fmt_pct(r['mfu_analytic'])}"),
        ]
    rows += [
        ("memory/device: args / out / alias / temp",
         " / ".join(perf.fmt_bytes(m[f"{k}_bytes"]) for k in ("argument", "output", "alias", "temp"))),
        ("memory/device: peak estimate", perf.fmt_bytes(m["peak_estimate_bytes"])),
    ]
    if timed:
        rows.append(("runtime peak bytes in use (max dev)", perf.fmt_bytes(r["device_memory"]["peak_bytes_in_use"])))
    return perf.format_table(rows, ("metric", "value"))


def _g(x):
    return None if x is None else x / 1e9


# ----------------------------------------------------------------------------- input pipeline
def time_pipeline(iterator, place=None, *, warmup: int, batches: int) -> dict:
    """Wall and process-CPU time of `batches` batches from `iterator` (each placed with `place` and
    blocked on when given) after `warmup` untimed ones; no step runs."""
    for _ in range(warmup):
        batch = next(iterator)
        if place is not None:
            perf.block(place(batch))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(iterator)
        if place is not None:
            perf.block(place(batch))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"batch_s": wall / batches, "host_cpu_s_per_batch": cpu / batches}


def time_loop(step, state, batches, *, warmup: int, steps: int):
    """The trainer's loop: `state, metrics = step(state, next(batches))` under a transfer guard,
    dispatched asynchronously and blocked on once at the end.

    Returns (state, wall seconds per step, process CPU seconds per step)."""
    import jax  # noqa: PLC0415

    metrics = None
    for _ in range(warmup):
        state, metrics = step(state, next(batches))
    perf.block((state, metrics))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        batch = next(batches)
        with jax.transfer_guard("disallow"):
            state, metrics = step(state, batch)
    perf.block((state, metrics))
    return state, (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def _data_settings(config, prefetch: int) -> dict:
    """The data settings that decide the pipeline's speed, as the pipeline resolves them."""
    from colearn_jax.data import pipeline  # noqa: PLC0415

    keys = ("num_threads", "prefetch_buffer_size", "num_workers", "cache_decoded", "normalize_on_device")
    return {**{k: pipeline._opt(config.data, k) for k in keys}, "device_prefetch": prefetch}  # noqa: SLF001


def benchmark_pipeline(config, *, devices=None, steps: int = 40, warmup: int = 5, rounds: int = 3,
                       prefetch: int = 2, batch_size: int | None = None, seed: int = 0) -> dict:
    """Input pipeline alone, step alone and the prefetched loop on one compiled step (see the module doc).

    Each round times the pipeline alone, then the step alone, then the loop. Returns examples/s of
    each (medians over the rounds), the process CPU milliseconds per batch of the pipeline alone and
    per step of step alone and loop (their difference is what the pipeline adds to a step, a figure
    that a busy shared host disturbs less than wall time), and `loop_over_step` = loop examples/s /
    step-alone examples/s.
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from colearn_jax import sharding  # noqa: PLC0415
    from colearn_jax.data import get_tokenizer, make_train_iterator  # noqa: PLC0415

    if rounds < 1:
        raise ValueError(f"--rounds={rounds} must be >= 1.")
    parts = lower_train_step(config, devices=devices, batch_size=batch_size)
    config, mesh, rules, system = parts["config"], parts["mesh"], parts["rules"], parts["system"]
    batch = config.data.batch_size
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.get("vocab_path"))
    settings = _data_settings(config, prefetch)
    loop_step = parts["program"].step  # the trainer's step (with the system's on-device batch transform)

    def place(host_batch):
        return sharding.shard_batch(host_batch, mesh, rules)

    def train_iterator():
        return make_train_iterator(config.data, tokenizer, seed=config.seed, process_index=jax.process_index(),
                                   process_count=jax.process_count())

    def pipeline_alone():
        it = train_iterator()
        host = time_pipeline(it, warmup=warmup, batches=steps)
        placed = time_pipeline(it, place, warmup=1, batches=steps)
        it.close()
        return host, placed

    state = parts["program"].init_state()
    rows = batch // jax.process_count()
    fixed = [place(synthetic_batch(parts["example"], config, seed + i + 1000 * jax.process_index(), process_rows=rows))
             for i in range(2)]
    host_s, host_cpu_s, placed_s, step_s, step_cpu_s, loop_s, loop_cpu_s = [], [], [], [], [], [], []
    with jax.set_mesh(mesh):
        for _ in range(rounds):
            host, placed = pipeline_alone()
            host_s.append(host["batch_s"])
            host_cpu_s.append(host["host_cpu_s_per_batch"])
            placed_s.append(placed["batch_s"])
            c0 = time.process_time()
            state, times = perf.time_steps(parts["compiled"], state, fixed, warmup=warmup, steps=steps)
            step_cpu_s.append((time.process_time() - c0) / (warmup + steps))
            step_s.append(statistics.fmean(times))
            if prefetch:
                from colearn_jax.data import device_prefetch  # noqa: PLC0415

                with device_prefetch(train_iterator(), place, buffer_size=prefetch) as batches:
                    state, seconds, cpu = time_loop(loop_step, state, batches, warmup=warmup, steps=steps)
            else:  # as the trainer did before device_prefetch: place inline
                it = train_iterator()
                state, seconds, cpu = time_loop(loop_step, state, (place(b) for b in it), warmup=warmup, steps=steps)
                it.close()
            loop_s.append(seconds)
            loop_cpu_s.append(cpu)
    del state
    med = statistics.median
    step_med, loop_med = med(step_s), med(loop_s)
    return {
        "config": {"model": config.model.name, "global_batch": batch, "devices": mesh.size, "mesh": dict(mesh.shape),
                   "data": settings},
        "steps": steps, "warmup": warmup, "rounds": rounds,
        "pipeline_host_examples_per_s": batch / med(host_s),
        "pipeline_examples_per_s": batch / med(placed_s),
        "pipeline_host_cpu_ms_per_batch": 1e3 * med(host_cpu_s),
        "pipeline_place_ms_per_batch": 1e3 * (med(placed_s) - med(host_s)),
        "step_examples_per_s": batch / step_med,
        "step_ms_rounds": [1e3 * t for t in step_s],
        "step_cpu_ms_per_step": 1e3 * med(step_cpu_s),
        "loop_examples_per_s": batch / loop_med,
        "loop_ms_rounds": [1e3 * t for t in loop_s],
        "loop_cpu_ms_per_step": 1e3 * med(loop_cpu_s),
        "loop_over_step": step_med / loop_med,
    }


def format_pipeline(r: dict) -> str:
    step = r["step_examples_per_s"]
    ms = lambda xs: " ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    rows = [
        ("pipeline alone: host iterator", perf.fmt_num(r["pipeline_host_examples_per_s"], 0),
         f"{r['pipeline_host_cpu_ms_per_batch']:.1f} ms host CPU / batch"),
        ("pipeline alone: + placement", perf.fmt_num(r["pipeline_examples_per_s"], 0),
         f"placement {r['pipeline_place_ms_per_batch']:+.1f} ms / batch"),
        ("step alone (fixed device batch)", perf.fmt_num(step, 0),
         f"ms/step per round: {ms(r['step_ms_rounds'])}; CPU {r['step_cpu_ms_per_step']:.0f} ms/step"),
        (f"loop (prefetch {r['config']['data']['device_prefetch']})", perf.fmt_num(r["loop_examples_per_s"], 0),
         f"ms/step per round: {ms(r['loop_ms_rounds'])}; CPU {r['loop_cpu_ms_per_step']:.0f} ms/step"),
        ("loop / step alone", perf.fmt_pct(r["loop_over_step"]), ""),
    ]
    return perf.format_table(rows, ("measurement", "examples/s", "notes"))


# ----------------------------------------------------------------------------- loss memory
def loss_memory(loss_name: str, gather: str, global_batch: int, dim: int = 512, *, devices=None) -> dict:
    """Compiles value+grad of one contrastive loss over a (data,) mesh of `devices`; returns per-device
    bytes from memory_analysis (nothing is allocated)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    from colearn_jax import sharding  # noqa: PLC0415
    from colearn_jax.losses import contrastive  # noqa: PLC0415

    devices = list(devices) if devices is not None else jax.devices()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}, devices)
    axes = sharding.DATA_AXES
    if global_batch % mesh.size:
        raise ValueError(f"global batch {global_batch} is not divisible by the {mesh.size} devices.")
    bsh, rep = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
    emb = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=bsh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    kw = dict(gather=gather, mesh=mesh, batch_axes=axes)
    if loss_name == "clip":
        fn, args = (lambda a, b, s: contrastive.clip_loss(a, b, s, **kw)[0]), (emb, emb, scalar)
    elif loss_name == "siglip":
        fn, args = (lambda a, b, s, c: contrastive.siglip_loss(a, b, s, c, **kw)[0]), (emb, emb, scalar, scalar)
    elif loss_name == "ntxent":
        fn, args = (lambda a, b, t: contrastive.ntxent_loss(a, b, t, **kw)[0]), (emb, emb, scalar)
    else:
        raise ValueError(f"Unknown loss {loss_name!r}; choose one of {LOSS_NAMES}.")
    argnums = tuple(range(len(args)))
    out_shardings = (rep, tuple(a.sharding for a in args))
    jitted = jax.jit(jax.value_and_grad(fn, argnums=argnums), out_shardings=out_shardings)
    with perf.Timer() as t:
        with jax.set_mesh(mesh):
            lowered = jitted.lower(*args)
        compiled = lowered.compile()
    mem = perf.memory_analysis(compiled)
    return {
        "loss": loss_name, "gather": gather, "global_batch": global_batch, "dim": dim, "devices": mesh.size,
        "local_batch": global_batch // mesh.size, "compile_s": t.seconds,
        "temp_bytes": mem["temp_bytes"], "argument_bytes": mem["argument_bytes"], "output_bytes": mem["output_bytes"],
        "peak_estimate_bytes": mem["peak_estimate_bytes"],
        "flops_per_device_xla": perf.cost_flops(compiled),
    }


# ----------------------------------------------------------------------------- compile time
def compile_time(config, *, scan: bool, devices=None, batch_size: int | None = None) -> dict:
    """Lower + compile time of the train step with `config.model.scan = scan` (abstract shapes)."""
    config = config.copy_and_resolve_references()
    config.model.scan = bool(scan)
    parts = lower_train_step(config, devices=devices, batch_size=batch_size)
    r = analyze_step(parts, count_unscanned=False)
    return {k: r[k] for k in ("scan", "devices", "global_batch", "lower_s", "compile_s", "flops_per_step_xla_raw",
                              "flops_per_step_per_device_xla", "flops_per_step_analytic", "memory")}


# ----------------------------------------------------------------------------- subprocess cells
def run_cell(cell: dict, *, timeout: int, num_cpu_devices: int = 0, config_args: list[str] = ()) -> dict:
    """Runs one compile-only measurement in a fresh Python process; failures become {"error": reason}."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--cell={json.dumps(cell)}", *config_args]
    if num_cpu_devices:
        cmd.append(f"--num_cpu_devices={num_cpu_devices}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or None, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    marker = "CELL_RESULT "
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    reason = next((ln for ln in reversed(tail) if ln.strip()), f"exit code {proc.returncode}")
    return {"error": f"failed (rc {proc.returncode}, {time.perf_counter() - t0:.0f} s): {reason[-200:]}"}


def _cell_main(cell: dict, config) -> dict:
    if cell["kind"] == "loss_memory":
        return loss_memory(cell["loss"], cell["gather"], cell["batch"], cell["dim"])
    if cell["kind"] == "compile_time":
        return compile_time(config, scan=cell["scan"])
    raise ValueError(f"unknown cell {cell}")


def loss_memory_table(loss_names, gathers, batches, dim, *, timeout: int, num_cpu_devices: int) -> list[dict]:
    rows = []
    for loss_name in loss_names:
        for batch in batches:
            for gather in gathers:
                cell = dict(kind="loss_memory", loss=loss_name, gather=gather, batch=int(batch), dim=dim)
                if timeout:
                    r = run_cell(cell, timeout=timeout, num_cpu_devices=num_cpu_devices)
                else:
                    try:
                        r = _cell_main(cell, None)
                    except Exception as e:  # noqa: BLE001
                        r = {"error": f"{type(e).__name__}: {e}"[:200]}
                r = {"loss": loss_name, "gather": gather, "global_batch": int(batch), **r}
                print(f"  {loss_name:7s} B={batch:>7} {gather:10s} temp={perf.fmt_bytes(r.get('temp_bytes'))}"
                      f"{'  ' + r['error'] if 'error' in r else ''}", flush=True)
                rows.append(r)
    return rows


def format_loss_memory(rows: list[dict], gathers) -> str:
    table = {}
    for r in rows:
        key = (r["loss"], r["global_batch"])
        cell = perf.fmt_bytes(r["temp_bytes"]) if r.get("temp_bytes") is not None else f"n/a ({r.get('error', '?')})"
        table.setdefault(key, {})[r["gather"]] = cell
    devices = next((r["devices"] for r in rows if "devices" in r), None)
    body = [(loss, f"{b:,}", f"{b // devices:,}" if devices else "?", *(table[(loss, b)].get(g, "") for g in gathers))
            for (loss, b) in table]
    return perf.format_table(body, ("loss", "global batch", "per device", *[f"{g} temp/device" for g in gathers]))


def plot_loss_memory(rows: list[dict], path: str) -> str:
    """Log-log plot of per-device temp memory vs global batch, one panel per loss, one line per mode."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    losses = list(dict.fromkeys(r["loss"] for r in rows))
    fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.8), squeeze=False)
    for ax, loss in zip(axes[0], losses):
        for gather in dict.fromkeys(r["gather"] for r in rows):
            pts = sorted((r["global_batch"], r["temp_bytes"]) for r in rows
                         if r["loss"] == loss and r["gather"] == gather and r.get("temp_bytes"))
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [y / 2**20 for y in ys], marker="o", label=gather)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch")
        ax.set_ylabel("temp memory per device (MiB)")
        ax.set_title(f"{loss} loss, value+grad")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main
def _write(path: str, payload: dict):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {path}")


def main(argv):
    del argv
    jax = setup_devices(FLAGS.num_cpu_devices, FLAGS.multihost)
    config = _CONFIG.value
    if FLAGS.cell:
        result = _cell_main(json.loads(FLAGS.cell), config)
        print("CELL_RESULT " + json.dumps(result, default=str), flush=True)
        return
    env = environment()
    main_process = jax.process_index() == 0
    if FLAGS.loss_memory:
        if jax.device_count() < 2:
            print("note: --loss_memory is meant for a multi-device mesh (e.g. --num_cpu_devices=8).")
        print(f"Loss memory (value+grad, compile only), {jax.device_count()} devices, D={FLAGS.loss_dim}:")
        rows = loss_memory_table(FLAGS.loss_names, FLAGS.gathers, [int(b) for b in FLAGS.loss_batches],
                                 FLAGS.loss_dim, timeout=FLAGS.cell_timeout, num_cpu_devices=FLAGS.num_cpu_devices)
        print(format_loss_memory(rows, FLAGS.gathers))
        _write(FLAGS.out, {"mode": "loss_memory", "env": env, "rows": rows})
        if FLAGS.out:
            print("wrote", plot_loss_memory(rows, os.path.splitext(FLAGS.out)[0] + ".png"))
        return
    if FLAGS.compile_time:
        config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
        runs = {True: [], False: []}
        for rep in range(FLAGS.repeats):
            for scan in ((True, False) if rep % 2 == 0 else (False, True)):
                cell = dict(kind="compile_time", scan=scan)
                if FLAGS.cell_timeout:
                    r = run_cell(cell, timeout=FLAGS.cell_timeout, num_cpu_devices=FLAGS.num_cpu_devices,
                                 config_args=config_args)
                else:
                    r = compile_time(config, scan=scan)
                runs[scan].append(r)
                print(f"  scan={scan}: " + (r["error"] if "error" in r else
                                            f"lower {r['lower_s']:.2f} s, compile {r['compile_s']:.2f} s"), flush=True)
        rows = []
        for scan, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                rows.append({"scan": scan, **rs[0]})
                continue
            med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
            rows.append({**ok[0], "scan": scan, "lower_s": med("lower_s"), "compile_s": med("compile_s"),
                         "total_s": statistics.median(r["lower_s"] + r["compile_s"] for r in ok),
                         "total_s_all": [r["lower_s"] + r["compile_s"] for r in ok]})
        body = [(r["scan"], r.get("devices", "?"), perf.fmt_num(r.get("lower_s")), perf.fmt_num(r.get("compile_s")),
                 perf.fmt_num(r.get("total_s")) if "error" not in r else r["error"],
                 " ".join(f"{t:.1f}" for t in r.get("total_s_all", [])),
                 perf.fmt_bytes((r.get("memory") or {}).get("temp_bytes")))
                for r in rows]
        print(f"Train-step compile time (median of {FLAGS.repeats} fresh processes):")
        print(perf.format_table(body, ("model.scan", "devices", "lower s", "compile s", "total s", "all totals s",
                                       "temp/device")))
        _write(FLAGS.out, {"mode": "compile_time", "env": env, "rows": rows})
        return

    if FLAGS.pipeline:
        result = benchmark_pipeline(config, steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds,
                                    prefetch=FLAGS.prefetch, batch_size=FLAGS.batch_size or None)
        env["loadavg_1m_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        if main_process:
            print(f"{env['backend']} x{env['device_count']} ({env['device_kind']}), jax {env['jax']}, "
                  f"load avg {env['loadavg_1m']} -> {env['loadavg_1m_after']} on {env['host_cpus']} host CPUs; "
                  f"global batch {result['config']['global_batch']}, data {result['config']['data']}")
            print(format_pipeline(result))
            _write(FLAGS.out, {"mode": "pipeline", "env": env, "result": result})
        return

    if FLAGS.compile_only:
        report = compile_only_report(config, batch_size=FLAGS.batch_size or None, peak_tflops=FLAGS.peak_tflops or None)
        if main_process:
            print(f"{env['backend']} x{env['device_count']} ({env['device_kind']}), jax {env['jax']} — compile only")
            print(format_result(report["result"]))
            _write(FLAGS.out, report)
        return

    result = benchmark_train_step(config, steps=FLAGS.steps, warmup=FLAGS.warmup, batch_size=FLAGS.batch_size or None,
                                  peak_tflops=FLAGS.peak_tflops or None)
    env["loadavg_1m_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if main_process:
        print(f"{env['backend']} x{env['device_count']} ({env['device_kind']}), jax {env['jax']}, "
              f"load avg {env['loadavg_1m']} -> {env['loadavg_1m_after']} on {env['host_cpus']} host CPUs")
        print(format_result(result))
        _write(FLAGS.out, {"mode": "train_step", "env": env, "result": result})


if __name__ == "__main__":
    app.run(main)
