"""Turns the cells of one `experiments/gpu_suite.sh` run into a Markdown section for RESULTS.md.

  python experiments/gpu_table.py /tmp/gpu_suite.XXXX --md=gpu_table.md --json=gpu_results.json

The directory holds what the suite wrote: `cells.tsv` (one line per cell: its name, side, model,
attention, remat, batch, dtype, exit code, seconds and status ok | failed | timeout | skipped),
`meta.json` (date, commit, smoke mode, GPU name, cell set), and per cell `<name>.json` (the JSON of
`experiments/benchmark.py` for colearn_jax, of `experiments/compare_open_clip.py --sides=open_clip`
for open_clip, of `experiments/coca_decoding.py` for decoding) and `logs/<name>.log`. Every cell gets
a row: a cell without a result reads "n/a (reason)", the reason taken from the end of its log (or the
budget note of a skipped cell).

The CLIP set (the default): median step time, examples/s, the ratio to open_clip's examples/s for the
same model and batch, MFU from the analytic model FLOPs (`perf.clip_train_flops`: 3 × forward; remat
recompute not counted), XLA's TFLOP/s (its global count, recompute included), the device allocator's
peak memory and colearn_jax's compile time.
The systems set (meta "set": "systems"): the train-step table of CoCa / SimCLR / ImageBind presets
(dtype, step time, examples/s, MFU where `perf.analytic_train_flops` has a formula, else n/a, peak
memory, compile time) and the CoCa decoding table (tokens/s with and without the key/value cache and
open_clip's, and the speed-ups). Nothing here imports JAX or torch.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from colearn_jax import perf  # noqa: E402  (no JAX import at module level)

CELL_FIELDS = ("cell", "side", "model", "attention", "remat", "batch", "rc", "seconds", "status")  # + dtype (newer)
MODEL_NAMES = {"vit_b16": "ViT-B/16", "vit_b32": "ViT-B/32", "tiny": "tiny"}
SYSTEM_NAMES = {"clip": "CLIP", "coca": "CoCa", "simclr": "SimCLR", "imagebind": "ImageBind"}
# Where a failed cell's log says why, best first: a Python exception line ("XlaRuntimeError:
# RESOURCE_EXHAUSTED: Out of memory ...", "torch.OutOfMemoryError: CUDA out of memory ..."), then
# any line that sounds like an error.
_REASON_PATTERNS = (
    re.compile(r"^[\w.]*(Error|Exception|Exit)\b:?"),
    re.compile(r"error|exhausted|out of memory|killed|not found|unsupported", re.IGNORECASE),
)


# ----------------------------------------------------------------------------- reading a run
def read_cells(run_dir: str) -> list[dict]:
    """The rows of `cells.tsv`, in the order the cells ran."""
    path = os.path.join(run_dir, "cells.tsv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: is {run_dir!r} the work directory of experiments/gpu_suite.sh?")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        missing = [k for k in CELL_FIELDS if row.get(k) is None]
        if missing:
            raise ValueError(f"{path}: line for cell {row.get('cell')!r} lacks {missing}.")
    return rows


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def failure_reason(log_path: str, status: str, seconds: str) -> str:
    """A one-line reason for a cell without a result: the last error-looking line of its log."""
    if status == "timeout":
        return f"timed out after {seconds} s"
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return f"{status}, no log"
    if not lines:
        return f"{status}, empty log"
    for pattern in _REASON_PATTERNS:
        line = next((ln for ln in reversed(lines) if pattern.search(ln)), None)
        if line:
            return line[:160]
    return lines[-1][:160]


# ----------------------------------------------------------------------------- one row per cell
def cell_metrics(cell: dict, payload: dict | None) -> dict | None:
    """Step time, examples/s, MFU, TFLOP/s, peak memory and compile time of one cell's JSON; None
    if the JSON is missing or not a result of the cell's side."""
    if not payload:
        return None
    if cell["side"] == "colearn_jax" and payload.get("mode") == "train_step":
        r = payload["result"]
        return {
            "step_s": r["step_time_s"], "examples_per_s": r["examples_per_s"], "mfu": r.get("mfu_analytic"),
            "xla_tflops_per_s": r.get("model_tflops_per_s"),
            "peak_memory_bytes": (r.get("device_memory") or {}).get("peak_bytes_in_use"),
            "planned_bytes": (r.get("memory") or {}).get("peak_estimate_bytes"),
            "compile_s": (r.get("lower_s") or 0) + (r.get("compile_s") or 0),
            "device_kind": payload.get("env", {}).get("device_kind"),
            "dtype": r.get("dtype"), "peak_tflops": r.get("peak_tflops_per_device"),
        }
    if cell["side"] == "open_clip" and payload.get("mode") == "compare_open_clip":
        s = payload["summary"].get("open_clip")
        if not s:
            return None
        return {
            "step_s": s["median_step_s"], "examples_per_s": s["examples_per_s"], "mfu": s.get("mfu_analytic"),
            "xla_tflops_per_s": None, "peak_memory_bytes": s.get("peak_memory_bytes"), "planned_bytes": None,
            "compile_s": None, "device_kind": s.get("device_kind"),
        }
    if cell["side"] == "decoding" and payload.get("benchmark") == "coca_decoding":
        return {k: payload[k] for k in ("results", "speedup", "checks", "new_tokens", "repeats")} | {
            "device_kind": payload["env"].get("device_kind"), "torch_device": payload["env"].get("torch_device")}
    return None


def collect(run_dir: str) -> list[dict]:
    """Every cell of the run with its metrics (or None) and, where it has none, the reason."""
    out = []
    for cell in read_cells(run_dir):
        payload = read_json(os.path.join(run_dir, f"{cell['cell']}.json"))
        metrics = cell_metrics(cell, payload) if cell["status"] == "ok" else None
        reason = None
        if metrics is None:
            reason = (cell.get("note") or "skipped") if cell["status"] == "skipped" else failure_reason(
                os.path.join(run_dir, "logs", f"{cell['cell']}.log"), cell["status"], cell["seconds"])
        out.append({**cell, "metrics": metrics, "reason": reason})
    return out


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds `vs_open_clip`: a colearn_jax cell's examples/s over open_clip's for the same model and batch."""
    ref = {(r["model"], r["batch"]): r["metrics"]["examples_per_s"]
           for r in rows if r["side"] == "open_clip" and r["metrics"]}
    for r in rows:
        base = ref.get((r["model"], r["batch"]))
        r["vs_open_clip"] = (r["metrics"]["examples_per_s"] / base
                             if r["side"] == "colearn_jax" and r["metrics"] and base else None)
    return rows


# ----------------------------------------------------------------------------- Markdown
HEADER = ("model", "side", "attention", "remat", "batch", "step ms", "examples/s", "vs open_clip",
          "MFU (model FLOPs)", "XLA TFLOP/s", "peak memory", "compile s")


def na_row(head: tuple, r: dict, width: int) -> tuple:
    """The row of a cell without a result: its head, then "n/a (status: reason)", then blanks."""
    reason = r["reason"].replace("|", "/")
    return head + (f"n/a ({r['status']}: {reason})",) + ("",) * (width - len(head) - 1)


def table_rows(rows: list[dict]) -> list[tuple]:
    body = []
    for r in rows:
        head = (MODEL_NAMES.get(r["model"], r["model"]), r["side"], r["attention"], r["remat"], r["batch"])
        m = r["metrics"]
        if m is None:
            body.append(na_row(head, r, len(HEADER)))
            continue
        ratio = f"{r['vs_open_clip']:.2f}x" if r["vs_open_clip"] else ("1.00x" if r["side"] == "open_clip" else "n/a")
        body.append(head + (
            f"{1e3 * m['step_s']:.1f}", f"{m['examples_per_s']:.1f}", ratio, perf.fmt_pct(m["mfu"]),
            perf.fmt_num(m["xla_tflops_per_s"], 1), perf.fmt_bytes(m["peak_memory_bytes"] or m["planned_bytes"]),
            perf.fmt_num(m["compile_s"], 1)))
    return body


SYSTEMS_HEADER = ("system / preset", "side", "dtype", "attention", "remat", "batch", "step ms", "examples/s",
                  "MFU (model FLOPs)", "peak memory", "compile s")
DECODING_HEADER = ("model", "batch", "new tokens", "tokens/s cached", "tokens/s uncached", "tokens/s open_clip",
                   "ms/step marginal: cached / uncached", "per token: uncached / cached",
                   "end to end: uncached / cached, open_clip / cached", "cached == uncached tokens")


def system_name(model: str) -> str:
    """"coca:base" -> "CoCa base"; a bare CLIP preset as in the CLIP table."""
    system, _, preset = model.rpartition(":")
    return f"{SYSTEM_NAMES.get(system, system)} {preset}" if system else MODEL_NAMES.get(model, model)


def systems_rows(rows: list[dict]) -> list[tuple]:
    """The train-step cells of the systems set (decoding cells: `decoding_rows`)."""
    body = []
    for r in rows:
        if r["side"] == "decoding":
            continue
        m = r["metrics"]
        head = (system_name(r["model"]), r["side"], (m or {}).get("dtype") or r.get("dtype") or "?",
                r["attention"], r["remat"], r["batch"])
        if m is None:
            body.append(na_row(head, r, len(SYSTEMS_HEADER)))
            continue
        body.append(head + (
            f"{1e3 * m['step_s']:.1f}", f"{m['examples_per_s']:.1f}", perf.fmt_pct(m["mfu"]),
            perf.fmt_bytes(m["peak_memory_bytes"] or m["planned_bytes"]), perf.fmt_num(m["compile_s"], 1)))
    return body


def decoding_rows(rows: list[dict]) -> list[tuple]:
    body = []
    for r in rows:
        if r["side"] != "decoding":
            continue
        m = r["metrics"]
        head = (f"CoCa {r['model']}", r["batch"])
        if m is None:
            body.append(na_row(head, r, len(DECODING_HEADER)))
            continue
        res, up = m["results"], m["speedup"]
        oc = res.get("open_clip", {})
        ratio = lambda x: f"{x:.2f}x" if x is not None else "n/a"  # noqa: E731
        body.append(head + (
            m["new_tokens"], f"{res['cached']['tokens_per_s']:.1f}", f"{res['uncached']['tokens_per_s']:.1f}",
            perf.fmt_num(oc.get("tokens_per_s"), 1),
            f"{res['cached']['marginal_ms_per_step']:.1f} / {res['uncached']['marginal_ms_per_step']:.1f}",
            ratio(up["uncached_over_cached_per_step"]),
            f"{ratio(up['uncached_over_cached'])}, {ratio(up.get('open_clip_over_cached'))}",
            m["checks"]["cached_equals_uncached"]))
    return body


def systems_notes(rows: list[dict]) -> str:
    peaks = sorted({(r["metrics"]["dtype"], r["metrics"]["peak_tflops"]) for r in rows
                    if r["metrics"] and r["metrics"].get("peak_tflops")})
    rate = {"float32": "float32 (the TF32 rate)"}
    peak = "; ".join(f"{p:.1f} TFLOP/s for {rate.get(d, d)}" for d, p in peaks) or "the chip's peak; n/a where unknown"
    dec = next((r["metrics"] for r in rows if r["side"] == "decoding" and r["metrics"]), None)
    torch_device = dec["torch_device"] if dec else "the same device"
    return (
        "Each cell is its own process. Train steps: `experiments/benchmark.py` (the jitted, donated train step "
        "on synthetic batches of the config's shapes, no input pipeline; the system's on-device batch "
        "transform, e.g. SimCLR's augmentations and ImageBind's audio fbank, is part of the step; median of the "
        "timed steps). float32 rows are the CPU demos' presets as they train. MFU = analytic model FLOPs "
        "(3 × forward, `perf.coca_train_flops` / `perf.simclr_train_flops`; ImageBind has no formula: n/a; "
        "remat recompute not counted) "
        f"/ (step time × peak: {peak}). Peak memory: the device allocator's peak bytes in use (compile-time plan "
        "where the runtime has no stats). Decoding: `experiments/coca_decoding.py` (greedy, exactly the new "
        "tokens, EOS banned until the last; median of the rounds; compile excluded): colearn_jax with and without "
        f"the key/value cache on JAX's device, open_clip's `generate` (eager float32) on {torch_device}; "
        "marginal = (time(N tokens) − time(1 token)) / (N − 1), the per-token cost once the image is encoded.")


def markdown(rows: list[dict], meta: dict) -> str:
    """The section to append to experiments/RESULTS.md: heading, provenance, table, notes."""
    kinds = sorted({r["metrics"]["device_kind"] for r in rows if r["metrics"] and r["metrics"].get("device_kind")})
    device = ", ".join(kinds) or meta.get("gpu") or "unknown device"
    smoke = bool(int(meta.get("smoke", 0) or 0))
    ok = sum(r["metrics"] is not None for r in rows)
    suffix = "   # GPU_SUITE_SMOKE=1" if smoke else ""
    provenance = (f"{meta.get('date', '?')}, commit {meta.get('commit', '?')}, device {device}; "
                  f"{ok} of {len(rows)} cells measured. Versions: {meta.get('versions', '?')}.")
    if meta.get("set") == "systems":
        title = ("## GPU suite (systems): SMOKE RUN on a CPU (tiny presets; not GPU figures)" if smoke else
                 f"## GPU: CoCa, SimCLR and ImageBind train steps and CoCa decoding, one {device}")
        tables = [perf.format_table(systems_rows(rows), SYSTEMS_HEADER)]
        if any(r["side"] == "decoding" for r in rows):
            tables.append(perf.format_table(decoding_rows(rows), DECODING_HEADER))
        lines = [title, "", "```", "GPU_SUITE_SET=systems bash experiments/gpu_suite.sh" + suffix, "```", "",
                 provenance, ""] + [x for t in tables for x in (t, "")] + [systems_notes(rows)]
        return "\n".join(lines) + "\n"
    title = ("## GPU suite: SMOKE RUN on a CPU (tiny config; not GPU figures)" if smoke else
             f"## GPU: CLIP train step, colearn_jax vs open_clip, bf16, one {device}")
    peak = next((perf.peak_flops(k, "bfloat16") for k in kinds if perf.peak_flops(k, "bfloat16")), None)
    lines = [
        title, "",
        "```", "bash experiments/gpu_suite.sh" + suffix, "```", "",
        provenance, "",
        perf.format_table(table_rows(rows), HEADER), "",
        "Each cell is its own process. colearn_jax: `experiments/benchmark.py` (jitted, donated train step on "
        "synthetic batches, median of the timed steps; `model.scan=True` for the paper presets). open_clip: "
        "`experiments/compare_open_clip.py --sides=open_clip` (open_clip's model, `ClipLoss` and AdamW, eager, "
        "torch autocast bf16 = `--precision amp_bf16`). MFU = analytic model FLOPs (3 × forward, "
        "`perf.clip_train_flops`, recompute not counted) / (step time × "
        + (f"{peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "the chip's bf16 peak; n/a where unknown") + "). "
        "XLA TFLOP/s counts XLA's global FLOPs (remat recompute included). Peak memory: the device allocator's "
        "peak bytes in use (compile-time plan where the runtime has no stats). vs open_clip: examples/s ratio "
        "to the open_clip row of the same model and batch.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the suite's work directory (holds cells.tsv)")
    parser.add_argument("--md", default="", help="write the Markdown section here")
    parser.add_argument("--json", default="", help="write every cell (metrics or reason) as JSON here")
    args = parser.parse_args(argv)
    meta = read_json(os.path.join(args.run_dir, "meta.json")) or {}
    rows = with_ratios(collect(args.run_dir))
    text = markdown(rows, meta)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cells": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
