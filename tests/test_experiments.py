"""The user-facing scripts: CLIP really learns on digits, evaluate.py on a checkpoint, and the
paper-size config compiles under FSDP on the simulated mesh without allocating anything."""
import json
import os
import subprocess
import sys

import jax
import pytest

from colearn_jax.train import loop
from colearn_jax.train.metrics import read_metrics
from tests.helpers import ROOT, load_config


def _run(args, timeout=600, **env):
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "XLA_FLAGS": "", **env},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A shortened digits demo on one device: the real data, model family, loss and evaluator."""
    config = load_config("clip.py:digits")
    config.unlock()
    config.train.update(num_steps=200, eval_every=200, checkpoint_every=200, log_every=50, progress_bar=False,
                        compilation_cache_dir="")
    config.optim.warmup_steps = 20
    workdir = str(tmp_path_factory.mktemp("digits"))
    loop.train(config, workdir, devices=jax.devices()[:1])
    return workdir


def test_clip_learns_digits(digits_run):
    rows = read_metrics(digits_run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    final = [r for r in rows if "eval/zeroshot_top1" in r][-1]
    assert losses[-1] < 0.75 * losses[0], losses
    assert final["eval/zeroshot_top1"] >= 0.7, final  # chance is 0.1
    assert final["eval/t2i_r10"] > 0.1, final  # chance is 10/300


def test_evaluate_script_on_checkpoint(digits_run):
    out = _run(["experiments/evaluate.py", f"--workdir={digits_run}"])
    assert "zeroshot_top1" in out
    with open(os.path.join(digits_run, "eval_latest.json")) as f:
        metrics = json.load(f)
    last = [r for r in read_metrics(digits_run) if "eval/zeroshot_top1" in r][-1]
    assert metrics["zeroshot_top1"] == pytest.approx(last["eval/zeroshot_top1"], abs=1e-6)


def _compile_only(*args):
    """experiments/train.py --compile_only: its JSON report (the same as benchmark.py --compile_only)."""
    report = json.loads(_run(["experiments/train.py", *args, "--num_cpu_devices=8", "--compile_only"]))
    assert report["mode"] == "compile_only" and report["env"]["device_count"] == 8
    return report["result"]


def test_vit_b16_fsdp_compiles_from_the_command_line():
    r = _compile_only("--config=configs/clip.py:vit_b16", "--config.sharding=fsdp", "--config.mesh.data=-1")
    assert r["devices"] == 8 and r["scan"]
    # FSDP: each device holds about 1/8 of the 150M float32 params (+ AdamW moments) as arguments.
    assert r["memory"]["argument_bytes"] < 150e6 * 4 * 3 / 8 * 1.2
    # Global FLOPs of the whole step (every scanned layer counted): about the analytic model FLOPs.
    assert 0.95 < r["flops_per_step"] / r["flops_per_step_analytic"] < 1.1


def test_compile_only_reports_global_flops_of_scanned_stack():
    """XLA counts a scanned layer stack's loop body once; --compile_only must report the global
    FLOPs of every layer, equal to the unrolled config's, not the per-device or loop-body count."""
    scanned, unrolled = (_compile_only("--config=configs/clip.py:tiny", f"--config.model.scan={scan}")
                         for scan in (True, False))
    assert scanned["scan"] and not unrolled["scan"]
    assert scanned["flops_per_step"] == pytest.approx(unrolled["flops_per_step"], rel=1e-3)
    assert scanned["flops_per_step_xla_raw"] < 0.75 * scanned["flops_per_step"]  # the loop body counted once
    for r in (scanned, unrolled):
        # Global, not per device: 8 data-parallel devices each run 1/8 of the batch (plus the
        # replicated optimizer update, so per device x 8 over-counts a little when nothing is scanned).
        assert r["flops_per_step"] > 0.8 * 8 * r["flops_per_step_per_device_xla"], r
        assert 0.95 < r["flops_per_step"] / r["flops_per_step_analytic"] < 1.3, r


def test_unknown_config_key_is_named():
    proc = subprocess.run(
        [sys.executable, "experiments/train.py", "--config=configs/clip.py:tiny", "--config.model.widht=3",
         "--workdir=/tmp/never_used"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config.model.widht is not a config field; did you mean model.text.width or model.vision.width?")
    assert "Traceback" not in proc.stderr


def test_evaluate_a_2x2x2_run_with_eval_batch_100_on_its_own_mesh(tmp_path):
    """A run trained on a (data 2, fsdp 2, model 2) mesh with eval_batch_size=100 (not a multiple of 8)
    evaluates on the same 8 devices on its stored mesh, with the trainer's own numbers."""
    from colearn_jax.evals.checkpoint_eval import evaluate_checkpoint

    c = load_config("clip.py:tiny")
    c.unlock()
    c.mesh.update(data=2, fsdp=2, model=2)
    c.sharding = "fsdp_tp"
    c.data.eval_batch_size = 100
    c.train.update(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2, best_metric="")
    loop.train(c, str(tmp_path))
    result = evaluate_checkpoint(str(tmp_path))
    assert result.mesh == {"data": 2, "fsdp": 2, "model": 2} and result.sharding == "fsdp_tp"
    assert result.note == "the stored mesh"
    trained = [r for r in read_metrics(str(tmp_path)) if "eval/zeroshot_top1" in r][-1]
    assert set(result.metrics) == {k[len("eval/"):] for k in trained if k.startswith("eval/")}
    for k, v in result.metrics.items():
        assert v == pytest.approx(trained[f"eval/{k}"], abs=1e-6), k


def test_evaluate_docstring_names_every_flag():
    import ast
    import re

    with open(os.path.join(ROOT, "experiments", "evaluate.py")) as f:
        source = f.read()
    defined = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source))
    documented = set(re.findall(r"--(\w+)", ast.get_docstring(ast.parse(source))))
    assert defined == {"workdir", "step", "best", "override"}
    assert documented == defined


def test_training_curves_plot(digits_run):
    from colearn_jax.train.plots import plot_metrics

    path = plot_metrics(digits_run)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000
