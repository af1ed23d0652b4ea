"""Multi-host training for real, on one machine: two processes x 4 CPU devices (`jax.distributed` on
localhost, gloo collectives) run `experiments/train.py --multihost` (through tests/multihost_worker.py)
in one shared workdir, against the one-process run on 8 devices of the same config.

* Same run: process p feeds rows [p*b, (p+1)*b) of every global batch and the mesh puts them on its
  devices, so the global batch is the one-process batch; metrics.jsonl (process 0 writes it), the
  evaluator's results and the final parameters must match the one-process run (tolerances below).
* A SIGTERM sent to ONE process (from outside, while it sits at a known step) becomes a stop that both
  agree on at the next flag exchange (`train.stop_sync_every`): both save that step and exit 0.
* Running the same command again resumes and ends bit-identical to the uninterrupted 2-process run.

Tolerances. The two programs differ only in how the gradient all-reduce is done (across processes:
gloo; within one: XLA:CPU), so sums are taken in another order and gradients differ in the last bits
(~1e-7 relative). Train metrics: rtol 1e-5. Parameters: Adam divides by sqrt(v) + eps, so a parameter
whose true gradient is exactly zero — the attention key biases, which the softmax ignores — is moved by
pure rounding noise, up to ~lr * noise / eps ~ 1e-6 a step; atol 1e-5 covers that, while one step on
a different batch moves the parameters by ~lr = 2e-3 (checked below: far more than the tolerance).
Eval metrics are fractions of the 300 test examples: a near-tie may rank differently, so abs 0.01.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import colearn_jax
from colearn_jax.data import digits
from colearn_jax.train.checkpoint import list_steps
from colearn_jax.train.metrics import read_metrics
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
STEPS, SYNC_EVERY, SIGNAL_AT = 10, 2, 3
# Seconds per launch (all its processes; a launch takes 30-60 s on 2 busy cores): a deadlock fails the test
# with the processes' logs instead of hanging CI, and three launches fit pytest's 900 s per test.
LAUNCH_TIMEOUT = 280
FAILED_GRACE = 30  # seconds the others may go on after one process failed (they block in collectives)
PARAM_RTOL, PARAM_ATOL, METRIC_RTOL, EVAL_ABS = 1e-5, 1e-5, 1e-5, 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def _launch(workdir, num_processes: int, cache_dir: str, *, signal_process: int | None = None,
            signal_at: int = 0, name: str = "launch"):
    """Runs the training command in `num_processes` processes (8 devices in all); returns [(rc, log)].
    Each process's output goes to `<workdir>.<name>.p<i>.log`.

    `signal_process`: that process pauses after step `signal_at` (0: before training starts, after
    `jax.distributed.initialize()`), and this test sends it SIGTERM there.
    """
    args = ["--config=configs/clip.py:tiny", f"--workdir={workdir}", f"--num_cpu_devices={8 // num_processes}",
            f"--config.train.num_steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=5",
            "--config.train.checkpoint_every=5", f"--config.train.stop_sync_every={SYNC_EVERY}",
            f"--config.train.compilation_cache_dir={cache_dir}"]
    port = _free_port()
    marker = f"{workdir}.{name}.paused"
    if os.path.exists(marker):
        os.remove(marker)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs, logs = [], []
    try:
        for i in range(num_processes):
            extra = []
            if num_processes > 1:
                extra = ["--multihost", f"--coordinator_address=localhost:{port}",
                         f"--num_processes={num_processes}", f"--process_id={i}"]
            penv = dict(env)
            if i == signal_process:
                penv.update(COLEARN_TEST_PAUSE_AT_STEP=str(signal_at), COLEARN_TEST_PAUSE_MARKER=marker,
                            COLEARN_TEST_PAUSE_TIMEOUT="120")
            logs.append(open(f"{workdir}.{name}.p{i}.log", "w+"))
            procs.append(subprocess.Popen([sys.executable, WORKER, *args, *extra], cwd=ROOT, env=penv,
                                          stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        signalled = signal_process is None
        failed_at = None
        while True:
            codes = [p.poll() for p in procs]
            now = time.monotonic()
            if all(rc is not None for rc in codes) or now > deadline:
                break
            if not signalled and os.path.exists(marker):  # the process sits at the agreed point
                procs[signal_process].send_signal(signal.SIGTERM)
                signalled = True
            if any(rc not in (None, 0) for rc in codes):  # the others cannot finish without it
                failed_at = failed_at or now
                if now - failed_at > FAILED_GRACE:
                    break
            time.sleep(0.1)
        results = []
        for p, log in zip(procs, logs):
            log.seek(0)
            results.append((p.poll(), log.read()))
        if any(rc is None for rc, _ in results):
            why = (f"a process failed and the others were still running {FAILED_GRACE} s later" if failed_at
                   else f"it did not finish within {LAUNCH_TIMEOUT} s (deadlock?)")
            pytest.fail(f"{num_processes}-process run killed: {why}.\n"
                        + "\n".join(f"--- process {i} (exit {rc}):\n{_tail(out)}"
                                    for i, (rc, out) in enumerate(results)))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def _assert_ok(results):
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{_tail(out)}"


def _data_positions(workdir, step: int, num_processes: int) -> list[str]:
    """Each process's saved data-iterator position (grain state) in checkpoint `step`."""
    data = os.path.join(workdir, "checkpoints", str(step), "data")
    positions = []
    for i in range(num_processes):
        with open(os.path.join(data, f"process_{i}-of-{num_processes}.json")) as f:
            positions.append(f.read())
    return positions


def _params(workdir, step=None):
    _, variables, _ = colearn_jax.load(workdir, step=step)
    return jax.device_get(variables["params"])


def _train_rows(workdir):
    return [r for r in read_metrics(workdir) if "train/loss" in r]


def _eval_rows(workdir):
    return [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    digits.ensure_built()  # built once here, not raced by the worker processes
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    workdir = str(tmp_path_factory.mktemp("one_process") / "run")
    _assert_ok(_launch(workdir, 1, cache_dir))
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, cache_dir):
    workdir = str(tmp_path_factory.mktemp("two_processes") / "run")
    _assert_ok(_launch(workdir, 2, cache_dir))
    assert _data_positions(workdir, STEPS, 2)  # both processes took part in the final checkpoint
    return workdir


def test_two_processes_train_like_one(one_process, two_processes):
    ref, run = _train_rows(one_process), _train_rows(two_processes)
    assert [r["step"] for r in run] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    keys = sorted(k for k in ref[0] if k.startswith("train/") and k != "train/examples_per_sec")
    assert {"train/loss", "train/grad_norm", "train/param_norm"} <= set(keys)
    for a, b in zip(run, ref):
        for k in keys:
            np.testing.assert_allclose(a[k], b[k], rtol=METRIC_RTOL, err_msg=f"{k} at step {a['step']}")
    assert ref[-1]["train/loss"] < ref[0]["train/loss"]

    ref_eval, run_eval = _eval_rows(one_process), _eval_rows(two_processes)
    assert [r["step"] for r in run_eval] == [r["step"] for r in ref_eval] == [5, 10]
    for a, b in zip(run_eval, ref_eval):
        assert set(a) == set(b) and "eval/zeroshot_top1" in a
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=EVAL_ABS), (k, a["step"])
    # The best checkpoint (config.train.best_metric) was kept by both processes together.
    assert list_steps(os.path.join(two_processes, "best"))

    final, ref_final = _params(two_processes), _params(one_process)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=PARAM_RTOL, atol=PARAM_ATOL), final, ref_final)
    # The tolerance is far below what training moves: five steps change the parameters by >> atol.
    moved = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(ref_final),
                                                              jax.tree.leaves(_params(one_process, step=5))))
    assert moved > 100 * PARAM_ATOL, moved


def _first_exchange_from(step: int) -> int:
    """The step at which a stop requested during step `step` is agreed: the next flag exchange."""
    return -(-step // SYNC_EVERY) * SYNC_EVERY


def test_sigterm_to_one_process_stops_both_then_resume_is_exact(two_processes, cache_dir, tmp_path):
    workdir = str(tmp_path / "run")
    # 1. SIGTERM to process 1 only, after step SIGNAL_AT: both stop at the next exchange, save it, exit 0.
    results = _launch(workdir, 2, cache_dir, signal_process=1, signal_at=SIGNAL_AT, name="stop")
    _assert_ok(results)
    stop_at = _first_exchange_from(SIGNAL_AT)
    assert "Received SIGTERM" in results[1][1] and "Received SIGTERM" not in results[0][1]
    assert list_steps(os.path.join(workdir, "checkpoints")) == [stop_at]
    positions = _data_positions(workdir, stop_at, 2)
    assert positions[0] == positions[1]  # both processes saved their data position at the same step
    assert [r["step"] for r in _train_rows(workdir)] == list(range(1, stop_at + 1))

    # 2. Resume, with SIGTERM to process 1 during start-up (where JAX's own preemption notifier would
    # swallow it, and on a resumed run never act on it): the run stops at its first exchange.
    results = _launch(workdir, 2, cache_dir, signal_process=1, signal_at=0, name="stop_at_startup")
    _assert_ok(results)
    second_stop = _first_exchange_from(stop_at + 1)
    assert second_stop < STEPS
    assert "Received SIGTERM" in results[1][1]
    assert max(list_steps(os.path.join(workdir, "checkpoints"))) == second_stop
    positions = _data_positions(workdir, second_stop, 2)
    assert positions[0] == positions[1]
    assert [r["step"] for r in _train_rows(workdir)] == list(range(1, second_stop + 1))

    # 3. The same command again runs to the end, bit-identical to the uninterrupted 2-process run.
    _assert_ok(_launch(workdir, 2, cache_dir, name="resume"))
    final, full = _params(workdir), _params(two_processes)
    jax.tree.map(np.testing.assert_array_equal, final, full)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train/examples_per_sec"} for r in rows]  # noqa: E731
    assert strip(read_metrics(workdir)) == strip(read_metrics(two_processes))
