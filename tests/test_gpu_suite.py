"""experiments/gpu_suite.sh and what it relies on, checked on the CPU: the benchmark's train-step
path and open_clip's side run without the packages the GPU image lacks (TFDS, grain, tensorflow;
JAX for the open_clip side), gpu_table.py turns cells into a table with reasons for the missing
ones, and the suite's smoke mode runs end to end (a failing cell included) and honours its budget."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

BLOCKER_DIR = os.path.join(ROOT, "tests", "blocked_imports")
NOT_ON_GPU_IMAGE = "tensorflow_datasets,grain,tensorflow,array_record"


def _env(blocked: str = "", **extra) -> dict:
    """The environment of a subprocess: one CPU device, `blocked` packages made unimportable."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **extra}
    if blocked:
        env["COLEARN_BLOCKED_IMPORTS"] = blocked
        env["PYTHONPATH"] = os.pathsep.join([BLOCKER_DIR, ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _python(args, *, blocked="", timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(blocked), capture_output=True, text=True,
                          timeout=timeout)


def _load_gpu_table():
    from tests.helpers import load_experiment

    return load_experiment("gpu_table")


# ----------------------------------------------------------------------------- imports the GPU image lacks
def test_import_blocker_works():
    proc = _python(["-c", "import grain"], blocked=NOT_ON_GPU_IMAGE)
    assert proc.returncode != 0 and "blocked by COLEARN_BLOCKED_IMPORTS" in proc.stderr


def test_benchmark_train_step_needs_no_tfds_or_grain(tmp_path):
    out = tmp_path / "tiny.json"
    proc = _python(["experiments/benchmark.py", "--config=configs/clip.py:tiny", "--steps=1", "--warmup=0",
                    f"--out={out}"], blocked=NOT_ON_GPU_IMAGE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert result["step_time_s"] > 0 and result["flops_per_step"] > 0


@pytest.mark.parametrize("config", ["coca.py:tiny", "simclr.py:tiny", "imagebind.py:tiny"])
def test_systems_train_steps_need_no_tfds_or_grain(tmp_path, config):
    """The systems set's cells (ImageBind's batch spec and config checks once imported TFDS and grain)."""
    out = tmp_path / "step.json"
    proc = _python(["experiments/benchmark.py", f"--config=configs/{config}", "--batch_size=8", "--steps=1",
                    "--warmup=0", f"--out={out}"], blocked=NOT_ON_GPU_IMAGE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert result["step_time_s"] > 0 and result["global_batch"] == 8
    assert (result["flops_per_step_analytic"] is None) == config.startswith("imagebind")  # CoCa, SimCLR: formulas


def test_open_clip_side_alone_never_starts_jax(tmp_path):
    pytest.importorskip("open_clip")
    out = tmp_path / "open_clip.json"
    proc = _python(["experiments/compare_open_clip.py", "--sides=open_clip", "--arch=tiny", "--context_length=24",
                    "--batch_size=4", "--rounds=1", "--steps_per_round=1", "--warmup=0", f"--out={out}"],
                   blocked=f"jax,jaxlib,flax,{NOT_ON_GPU_IMAGE}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert list(payload["summary"]) == ["open_clip"] and payload["ratio"] is None and "jax" not in payload
    s = payload["summary"]["open_clip"]
    assert s["n"] == 1 and s["examples_per_s"] > 0 and s["device_kind"] == "cpu" and s["mfu_analytic"] is None
    assert payload["flops_per_step_analytic"] > 0


# ----------------------------------------------------------------------------- gpu_table.py
CELLS_HEADER = "cell\tside\tmodel\tattention\tremat\tbatch\trc\tseconds\tstatus\tnote\n"


def _write_sample_run(run_dir):
    """A run as gpu_suite.sh leaves it: two measured cells, an OOM, a timeout and a skipped cell."""
    (run_dir / "logs").mkdir(parents=True)
    lines = [
        "b16_cudnn_none\tcolearn_jax\tvit_b16\tcudnn\tnone\t256\t0\t61\tok\t",
        "b16_open_clip\topen_clip\tvit_b16\ttorch\tnone\t256\t0\t30\tok\t",
        "b16_xla_none\tcolearn_jax\tvit_b16\txla\tnone\t256\t1\t40\tfailed\t",
        "b32_cudnn_none\tcolearn_jax\tvit_b32\tcudnn\tnone\t256\t124\t150\ttimeout\t",
        "b32_xla_dots\tcolearn_jax\tvit_b32\txla\tdots\t256\t\t0\tskipped\tsuite budget spent: 12 s of 450 s left",
    ]
    (run_dir / "cells.tsv").write_text(CELLS_HEADER + "\n".join(lines) + "\n")
    (run_dir / "b16_cudnn_none.json").write_text(json.dumps({
        "mode": "train_step", "env": {"device_kind": "NVIDIA H100 80GB HBM3"},
        "result": {"step_time_s": 0.1, "examples_per_s": 2560.0, "mfu_analytic": 0.319, "model_tflops_per_s": 317.0,
                   "device_memory": {"peak_bytes_in_use": 20 * 2**30}, "memory": {"peak_estimate_bytes": 2**30},
                   "lower_s": 2.0, "compile_s": 20.5}}))
    (run_dir / "b16_open_clip.json").write_text(json.dumps({
        "mode": "compare_open_clip", "summary": {"open_clip": {
            "median_step_s": 0.2, "examples_per_s": 1280.0, "mfu_analytic": 0.16, "peak_memory_bytes": 30 * 2**30,
            "device_kind": "NVIDIA H100 80GB HBM3"}}}))
    (run_dir / "logs" / "b16_xla_none.log").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.\n"
        "--------------------\nFor simplicity, JAX has removed its internal frames from the traceback.\n")
    (run_dir / "meta.json").write_text(json.dumps({"date": "2026-01-01", "commit": "abc1234", "smoke": 0,
                                                   "versions": "jax 0.0"}))


def test_gpu_table_rows_ratios_and_reasons(tmp_path):
    gpu_table = _load_gpu_table()
    _write_sample_run(tmp_path)
    md, js = tmp_path / "t.md", tmp_path / "r.json"
    assert gpu_table.main([str(tmp_path), f"--md={md}", f"--json={js}"]) == 0
    text = md.read_text()
    rows = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip() + "/" + line.split("|")[3].strip() + "/"
            + line.split("|")[4].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| ViT")}
    assert len(rows) == 5
    measured = rows["ViT-B/16/colearn_jax/cudnn/none"]
    assert measured[5:] == ["100.0", "2560.0", "2.00x", "31.9%", "317.0", "20.0 GiB", "22.5"]
    assert rows["ViT-B/16/open_clip/torch/none"][5:8] == ["200.0", "1280.0", "1.00x"]
    assert "RESOURCE_EXHAUSTED: Out of memory" in rows["ViT-B/16/colearn_jax/xla/none"][5]
    assert rows["ViT-B/32/colearn_jax/cudnn/none"][5] == "n/a (timeout: timed out after 150 s)"
    assert "suite budget spent" in rows["ViT-B/32/colearn_jax/xla/dots"][5]
    assert "one NVIDIA H100 80GB HBM3" in text and "989 TFLOP/s bf16 peak" in text and "2 of 5 cells" in text
    cells = json.loads(js.read_text())["cells"]
    assert [c["status"] for c in cells] == ["ok", "ok", "failed", "timeout", "skipped"]
    assert cells[0]["vs_open_clip"] == pytest.approx(2.0) and cells[2]["metrics"] is None


def test_gpu_table_systems_set_train_steps_and_decoding(tmp_path):
    """The systems set's table: one row per train step (dtype, MFU or n/a, reasons), and the decoding table
    with tokens/s of the three sides and the speed-ups."""
    (tmp_path / "logs").mkdir()
    header = CELLS_HEADER.replace("batch\t", "batch\tdtype\t")
    lines = ["coca_base\tcolearn_jax\tcoca:base\tcudnn\tdots\t256\tbfloat16\t0\t60\tok\t",
             "imagebind_huge\tcolearn_jax\timagebind:huge\tcudnn\tdots\t128\tbfloat16\t1\t30\tfailed\t",
             "coca_decoding\tdecoding\tbase\t-\t-\t8\tfloat32\t0\t80\tok\t"]
    (tmp_path / "cells.tsv").write_text(header + "\n".join(lines) + "\n")
    (tmp_path / "coca_base.json").write_text(json.dumps({
        "mode": "train_step", "env": {"device_kind": "NVIDIA H200"},
        "result": {"step_time_s": 0.128, "examples_per_s": 2000.0, "mfu_analytic": 0.201, "model_tflops_per_s": None,
                   "device_memory": {"peak_bytes_in_use": 30 * 2**30}, "memory": {}, "lower_s": 5.0,
                   "compile_s": 30.0, "dtype": "bfloat16", "peak_tflops_per_device": 989.0}}))
    (tmp_path / "logs" / "imagebind_huge.log").write_text("ValueError: Unsupported sequence length\n")
    side = lambda tps, marginal: {"tokens_per_s": tps, "marginal_ms_per_step": marginal}  # noqa: E731
    (tmp_path / "coca_decoding.json").write_text(json.dumps({
        "benchmark": "coca_decoding", "new_tokens": 30, "repeats": 5, "env": {"device_kind": "NVIDIA H200",
                                                                             "torch_device": "cuda"},
        "results": {"cached": side(2400.0, 3.0), "uncached": side(800.0, 9.0), "open_clip": {"tokens_per_s": 600.0}},
        "speedup": {"uncached_over_cached": 3.0, "open_clip_over_cached": 4.0, "uncached_over_cached_per_step": 3.0},
        "checks": {"cached_equals_uncached": True}}))
    (tmp_path / "meta.json").write_text(json.dumps({"date": "2026-01-01", "commit": "abc1234", "smoke": 0,
                                                   "versions": "jax 0.0", "set": "systems"}))
    md = tmp_path / "t.md"
    assert _load_gpu_table().main([str(tmp_path), f"--md={md}"]) == 0
    text = md.read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(("| CoCa", "| ImageBind"))]
    assert rows[0] == ["CoCa base", "colearn_jax", "bfloat16", "cudnn", "dots", "256", "128.0", "2000.0", "20.1%",
                       "30.0 GiB", "35.0"]
    assert rows[1][:6] == ["ImageBind huge", "colearn_jax", "bfloat16", "cudnn", "dots", "128"]
    assert rows[1][6] == "n/a (failed: ValueError: Unsupported sequence length)"
    assert rows[2] == ["CoCa base", "8", "30", "2400.0", "800.0", "600.0", "3.0 / 9.0", "3.00x", "3.00x, 4.00x",
                       "True"]
    assert "one NVIDIA H200" in text and "989.0 TFLOP/s for bfloat16" in text and "on cuda" in text
    assert "GPU_SUITE_SET=systems" in text and "2 of 3 cells" in text


def test_gpu_table_names_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="cells.tsv"):
        _load_gpu_table().main([str(tmp_path)])


# ----------------------------------------------------------------------------- the suite, smoke mode
def _suite(tmp_path, **env):
    dest = tmp_path / "out"
    proc = subprocess.run(["bash", "experiments/gpu_suite.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env(NOT_ON_GPU_IMAGE, GPU_SUITE_SMOKE="1", GPU_SUITE_OUT=str(dest),
                                                TMPDIR=str(tmp_path), **env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(dest)) == ["gpu_results.json", "gpu_suite.log", "gpu_suite.tar.gz", "gpu_table.md"]
    results = json.loads((dest / "gpu_results.json").read_text())
    return {c["cell"]: c for c in results["cells"]}, (dest / "gpu_table.md").read_text()


@pytest.mark.slow
def test_gpu_suite_smoke_runs_cells_and_survives_a_failing_one(tmp_path):
    """Three of the smoke cells (about 45 s on 2 cores), with TFDS and grain unimportable in every
    process: colearn_jax and open_clip are measured, and the cuDNN cell fails on the CPU without
    stopping the suite."""
    cells, table = _suite(tmp_path, GPU_SUITE_CELLS="tiny_cudnn_none,tiny_xla_none,tiny_open_clip")
    assert list(cells) == ["tiny_xla_none", "tiny_open_clip", "tiny_cudnn_none"]  # the suite's order
    assert cells["tiny_xla_none"]["status"] == "ok" and cells["tiny_xla_none"]["metrics"]["examples_per_s"] > 0
    assert cells["tiny_open_clip"]["status"] == "ok" and cells["tiny_xla_none"]["vs_open_clip"] > 0
    assert cells["tiny_cudnn_none"]["status"] == "failed" and "cuDNN" in cells["tiny_cudnn_none"]["reason"]
    assert "SMOKE RUN" in table and "n/a (failed:" in table
    assert not [p for p in os.listdir(tmp_path) if p.startswith("gpu_suite.")]  # the work directory is removed


@pytest.mark.parametrize("cell_set,count", [("clip", 4), ("systems", 8)])
def test_gpu_suite_budget_skips_cells_and_still_writes_the_table(tmp_path, cell_set, count):
    cells, table = _suite(tmp_path, GPU_SUITE_BUDGET_S="0", GPU_SUITE_SET=cell_set)
    assert len(cells) == count and {c["status"] for c in cells.values()} == {"skipped"}
    assert table.count("n/a (skipped: suite budget spent") == count
