"""Turns the cells of one `experiments/gpu_suite.sh` run into a Markdown section for RESULTS.md.

  python experiments/gpu_table.py /tmp/gpu_suite.XXXX --md=gpu_table.md --json=gpu_results.json

The directory holds what the suite wrote: `cells.tsv` (one line per cell: its name, side, model,
attention, remat, batch, exit code, seconds and status ok | failed | timeout | skipped), `meta.json`
(date, commit, smoke mode, GPU name), and per cell `<name>.json` (the JSON of
`experiments/benchmark.py` for colearn_jax, of `experiments/compare_open_clip.py --sides=open_clip`
for open_clip) and `logs/<name>.log`. Every cell gets a row: a cell without a result reads
"n/a (reason)", the reason taken from the end of its log (or the budget note of a skipped cell).

Columns: median step time, examples/s, the ratio to open_clip's examples/s for the same model and
batch, MFU from the analytic model FLOPs (`perf.clip_train_flops`: 3 × forward; remat recompute not
counted), XLA's TFLOP/s (its global count, recompute included), the device allocator's peak memory
and colearn_jax's compile time. Nothing here imports JAX or torch.
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

CELL_FIELDS = ("cell", "side", "model", "attention", "remat", "batch", "rc", "seconds", "status")
MODEL_NAMES = {"vit_b16": "ViT-B/16", "vit_b32": "ViT-B/32", "tiny": "tiny"}
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


def table_rows(rows: list[dict]) -> list[tuple]:
    body = []
    for r in rows:
        head = (MODEL_NAMES.get(r["model"], r["model"]), r["side"], r["attention"], r["remat"], r["batch"])
        m = r["metrics"]
        if m is None:
            reason = r["reason"].replace("|", "/")
            body.append(head + (f"n/a ({r['status']}: {reason})",) + ("",) * (len(HEADER) - len(head) - 1))
            continue
        ratio = f"{r['vs_open_clip']:.2f}x" if r["vs_open_clip"] else ("1.00x" if r["side"] == "open_clip" else "n/a")
        body.append(head + (
            f"{1e3 * m['step_s']:.1f}", f"{m['examples_per_s']:.1f}", ratio, perf.fmt_pct(m["mfu"]),
            perf.fmt_num(m["xla_tflops_per_s"], 1), perf.fmt_bytes(m["peak_memory_bytes"] or m["planned_bytes"]),
            perf.fmt_num(m["compile_s"], 1)))
    return body


def markdown(rows: list[dict], meta: dict) -> str:
    """The section to append to experiments/RESULTS.md: heading, provenance, table, notes."""
    kinds = sorted({r["metrics"]["device_kind"] for r in rows if r["metrics"] and r["metrics"].get("device_kind")})
    device = ", ".join(kinds) or meta.get("gpu") or "unknown device"
    smoke = bool(int(meta.get("smoke", 0) or 0))
    title = ("## GPU suite: SMOKE RUN on a CPU (tiny config; not GPU figures)" if smoke else
             f"## GPU: CLIP train step, colearn_jax vs open_clip, bf16, one {device}")
    ok = sum(r["metrics"] is not None for r in rows)
    peak = next((perf.peak_flops(k, "bfloat16") for k in kinds if perf.peak_flops(k, "bfloat16")), None)
    lines = [
        title, "",
        "```", "bash experiments/gpu_suite.sh" + ("   # GPU_SUITE_SMOKE=1" if smoke else ""), "```", "",
        f"{meta.get('date', '?')}, commit {meta.get('commit', '?')}, device {device}; "
        f"{ok} of {len(rows)} cells measured. Versions: {meta.get('versions', '?')}.", "",
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
