"""Scaling study: sharding presets × mesh shapes × per-device batch, from a sweep config file.

  python experiments/scaling_study.py --sweep=experiments/sweeps/clip_cpu.py --outdir=/tmp/scaling_cpu
  python experiments/scaling_study.py --sweep=experiments/sweeps/clip_cpu.py --compile_only --outdir=/tmp/scaling_mem
  python experiments/scaling_study.py --sweep=experiments/sweeps/clip_cpu.py --sweep.per_device_batch="(16,)" \
      --sweep.shardings="('dp', 'fsdp')" --outdir=/tmp/scaling_small

Every point runs `experiments/benchmark.py`'s train-step benchmark in this process (on the first N
devices, N = the mesh's size) — or, with `--compile_only`, only lowers and compiles it and reports
the per-device memory XLA plans. Results go to `<outdir>/scaling.csv`, `<outdir>/scaling.json`,
`<outdir>/memory_per_device.png` (peak-estimate bytes per device vs devices) and
`<outdir>/examples_per_s.png` (global examples/s vs devices; absent with --compile_only).
Points that fail (e.g. out of memory) are recorded with their error and the sweep goes on.

On a CPU host the devices are simulated (`num_cpu_devices` in the sweep file): memory per device is
what XLA would plan on real devices, but all simulated devices share the host's cores, so examples/s
does not scale with their number there — the throughput plot is only meaningful on real accelerators.

Sweep files (see experiments/sweeps/clip_cpu.py) name the base config, overrides, shardings, mesh
shapes and per-device batches. A mesh is an explicit {data, fsdp, model}; one axis may be -1
(fill all devices). A mesh needing more devices than exist is rejected before anything runs.

Multi-GPU host (one process sees all GPUs): set `num_cpu_devices = 0` in a copy of the sweep file and list
meshes up to the GPU count, then
  python experiments/scaling_study.py --sweep=experiments/sweeps/my_gpu_sweep.py --outdir=/tmp/scaling_gpu
Several GPU hosts or a TPU pod slice: run the *same* command on every host with --multihost, which
calls `jax.distributed.initialize()` (auto-detected on Cloud TPU and SLURM; elsewhere set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), e.g. on a v5p-64 slice:
  gcloud compute tpus tpu-vm ssh my-slice --worker=all --command="cd colearn_jax && \
      python experiments/scaling_study.py --sweep=experiments/sweeps/my_tpu_sweep.py --multihost \
      --outdir=/tmp/scaling_tpu"
In multi-host mode every process runs the points in the same order, each feeding its slice of the
global batch; only meshes over all devices are allowed (a sub-mesh would leave hosts without data),
so sweep the mesh *shape* (data/fsdp/model split) and the batch, and the slice size by re-running on
slices of different sizes. Process 0 writes the CSV and plots.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmark  # noqa: E402  (experiments/benchmark.py; imports no JAX at module level)

MESH_AXES = ("data", "fsdp", "model")

if __name__ == "__main__":
    _SWEEP = config_flags.DEFINE_config_file(
        "sweep", os.path.join(ROOT, "experiments/sweeps/clip_cpu.py"), "Sweep config file.", lock_config=False)
    flags.DEFINE_string("outdir", "/tmp/colearn_scaling", "Where the CSV, JSON and PNG plots go.")
    flags.DEFINE_bool("compile_only", False, "Only compile each point and report its memory (no steps).")
    flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pod slices, multi-GPU hosts).")
    flags.DEFINE_integer("limit", 0, "Run only the first N points (0 = all).")
FLAGS = flags.FLAGS

CSV_FIELDS = (
    "sharding", "mesh_data", "mesh_fsdp", "mesh_model", "devices", "per_device_batch", "global_batch",
    "lower_s", "compile_s", "step_time_s", "examples_per_s", "examples_per_s_per_device", "model_tflops_per_s",
    "mfu", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_estimate_bytes",
    "runtime_peak_bytes", "error",
)


# ----------------------------------------------------------------------------- points
def resolve_mesh(mesh: dict, num_devices: int, *, index: int | None = None, require_all: bool = False) -> dict:
    """Explicit mesh sizes for a sweep entry (`sharding.mesh_shape`); ValueError naming the entry when it
    cannot fit. A mesh over fewer devices than present runs on the first ones, unless `require_all`."""
    from colearn_jax import sharding  # noqa: PLC0415 (no JAX at module level: setup_devices comes first)

    where = f"sweep.meshes[{index}]" if index is not None else "sweep mesh"
    try:
        return sharding.mesh_shape(dict(mesh), num_devices, name=where, use_all=require_all)
    except ValueError as e:
        note = " On multi-host runs every sweep mesh must span all devices." if require_all else ""
        raise ValueError(f"{e}{note} Fix or drop {where} = {dict(mesh)} (more devices: raise the sweep's "
                         "num_cpu_devices, or run on a larger slice).") from None


def enumerate_points(sweep, num_devices: int, *, require_all: bool = False) -> list[dict]:
    """The sweep's points, in run order. Validates every mesh first (nothing runs on a bad sweep)."""
    meshes = [resolve_mesh(m, num_devices, index=i, require_all=require_all) for i, m in enumerate(sweep.meshes)]
    shardings = list(sweep.shardings)
    for s in shardings:
        if s not in ("dp", "fsdp", "tp", "fsdp_tp"):
            raise ValueError(f"sweep.shardings has {s!r}; presets are dp, fsdp, tp, fsdp_tp.")
    batches = [int(b) for b in sweep.per_device_batch]
    if any(b <= 0 for b in batches):
        raise ValueError(f"sweep.per_device_batch={batches} must be positive.")
    points = []
    for sizes in meshes:
        for shard in shardings:
            if sweep.get("tp_needs_model_axis", True) and "tp" in shard and sizes["model"] == 1:
                continue
            for b in batches:
                dp = sizes["data"] * sizes["fsdp"]
                points.append(dict(sharding=shard, mesh=dict(sizes), devices=math.prod(sizes.values()),
                                   per_device_batch=b, global_batch=b * dp))
    return points


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def point_config(base, overrides: dict, point: dict):
    c = base.copy_and_resolve_references()
    c.unlock()
    for key, value in _flatten(overrides).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.sharding = point["sharding"]
    for ax in MESH_AXES:
        c.mesh[ax] = point["mesh"][ax]
    c.data.batch_size = point["global_batch"]
    c.data.eval_batch_size = point["global_batch"]
    c.lock()
    return c


def load_base_config(spec: str):
    """`configs/clip.py:digits`-style spec (path relative to the repository root or absolute)."""
    import importlib.util  # noqa: PLC0415

    path, _, arg = spec.partition(":")
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    module_spec = importlib.util.spec_from_file_location("sweep_base_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# ----------------------------------------------------------------------------- running
def run_point(config, point: dict, *, devices, compile_only: bool, steps: int, warmup: int) -> dict:
    row = {"sharding": point["sharding"], **{f"mesh_{ax}": point["mesh"][ax] for ax in MESH_AXES},
           "devices": point["devices"], "per_device_batch": point["per_device_batch"],
           "global_batch": point["global_batch"]}
    try:
        if compile_only:
            parts = benchmark.lower_train_step(config, devices=devices)
            r = benchmark.analyze_step(parts, count_unscanned=False)
            r["device_memory"] = {"peak_bytes_in_use": None}
        else:
            r = benchmark.benchmark_train_step(config, devices=devices, steps=steps, warmup=warmup)
    except Exception as e:  # noqa: BLE001 - a failed point (OOM, invalid combination) is a result too
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        return row
    mem = r["memory"]
    row.update(
        lower_s=r["lower_s"], compile_s=r["compile_s"], step_time_s=r.get("step_time_s"),
        examples_per_s=r.get("examples_per_s"), examples_per_s_per_device=r.get("examples_per_s_per_device"),
        model_tflops_per_s=r.get("model_tflops_per_s"), mfu=r.get("mfu"),
        runtime_peak_bytes=r["device_memory"].get("peak_bytes_in_use"),
        **{k: mem.get(k) for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                                   "peak_estimate_bytes")},
    )
    return row


def write_csv(rows: list[dict], path: str):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") if r.get(k) is not None else "" for k in CSV_FIELDS})


def _series(rows, y_key):
    """{(sharding, model axis, per-device batch): [(devices, y), ...]} over the rows that have `y_key`."""
    series = {}
    for r in rows:
        if r.get(y_key) in (None, "") or r.get("error"):
            continue
        key = (r["sharding"], int(r["mesh_model"]), int(r["per_device_batch"]))
        series.setdefault(key, []).append((r["devices"], float(r[y_key])))
    return {k: sorted(v) for k, v in sorted(series.items())}


SHARDING_COLORS = {"dp": "tab:blue", "fsdp": "tab:orange", "tp": "tab:green", "fsdp_tp": "tab:red"}
MODEL_AXIS_MARKERS = ("o", "s", "^", "D", "v")
BATCH_LINESTYLES = ("-", "--", ":", "-.")


def plot(rows: list[dict], outdir: str, *, title: str) -> list[str]:
    """memory_per_device.png and examples_per_s.png: colour = sharding preset, marker = model-axis
    size, line style = per-device batch."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    batches = sorted({int(r["per_device_batch"]) for r in rows})
    models = sorted({int(r["mesh_model"]) for r in rows})
    written = []
    specs = [("peak_estimate_bytes", 1 / 2**20, "peak memory per device (MiB, XLA plan)", "memory_per_device.png"),
             ("examples_per_s", 1.0, "examples / s (global)", "examples_per_s.png")]
    for key, scale, ylabel, fname in specs:
        series = _series(rows, key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for (shard, model, batch), pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, [y * scale for y in ys], BATCH_LINESTYLES[batches.index(batch) % len(BATCH_LINESTYLES)],
                    marker=MODEL_AXIS_MARKERS[models.index(model) % len(MODEL_AXIS_MARKERS)],
                    color=SHARDING_COLORS.get(shard, "black"), label=f"{shard} model={model} b/dev={batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv):
    del argv
    sweep = _SWEEP.value
    jax = benchmark.setup_devices(int(sweep.get("num_cpu_devices", 0) or 0), FLAGS.multihost)
    from colearn_jax import perf  # noqa: PLC0415

    devices = jax.devices()
    points = enumerate_points(sweep, len(devices), require_all=FLAGS.multihost)
    if FLAGS.limit:
        points = points[:FLAGS.limit]
    base = load_base_config(sweep.base_config)
    overrides = sweep.get("overrides", None)
    overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides or {})
    main_process = jax.process_index() == 0
    env = benchmark.environment()
    if main_process:
        print(f"{len(points)} points on {env['backend']} x{len(devices)} ({env['device_kind']}), "
              f"load avg {env['loadavg_1m']} on {env['host_cpus']} host CPUs")
    rows = []
    for i, point in enumerate(points):
        config = point_config(base, overrides, point)
        row = run_point(config, point, devices=devices[:point["devices"]], compile_only=FLAGS.compile_only,
                        steps=int(sweep.get("steps", 3)), warmup=int(sweep.get("warmup", 1)))
        rows.append(row)
        if main_process:
            print(f"[{i + 1}/{len(points)}] {row['sharding']:7s} mesh={point['mesh']} b/dev={row['per_device_batch']:<3} "
                  f"mem/dev={perf.fmt_bytes(row.get('peak_estimate_bytes'))} "
                  f"ex/s={perf.fmt_num(row.get('examples_per_s'), 1)} {row.get('error', '')}", flush=True)
    if not main_process:
        return
    os.makedirs(FLAGS.outdir, exist_ok=True)
    write_csv(rows, os.path.join(FLAGS.outdir, "scaling.csv"))
    with open(os.path.join(FLAGS.outdir, "scaling.json"), "w") as f:
        json.dump({"sweep": sweep.to_dict(), "env": env, "compile_only": FLAGS.compile_only, "rows": rows}, f,
                  indent=2, default=str)
    title = (f"{sweep.base_config} on {env['backend']} ({env['device_kind']})"
             f"{' [simulated devices share ' + str(env['host_cpus']) + ' cores]' if env['backend'] == 'cpu' else ''}")
    written = plot(rows, FLAGS.outdir, title=title)
    body = [(r["sharding"], f"{r['mesh_data']}x{r['mesh_fsdp']}x{r['mesh_model']}", r["per_device_batch"],
             r["global_batch"], perf.fmt_bytes(r.get("peak_estimate_bytes")), perf.fmt_bytes(r.get("argument_bytes")),
             perf.fmt_bytes(r.get("temp_bytes")), perf.fmt_num(r.get("examples_per_s"), 1), r.get("error", ""))
            for r in rows]
    print(perf.format_table(body, ("sharding", "data x fsdp x model", "b/dev", "global b", "peak mem/dev",
                                   "args/dev", "temp/dev", "ex/s", "error")))
    print("wrote", ", ".join([os.path.join(FLAGS.outdir, "scaling.csv")] + written))


if __name__ == "__main__":
    app.run(main)
