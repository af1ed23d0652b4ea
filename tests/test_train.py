"""The generic trainer on the 8-device mesh: metrics, graceful SIGTERM + exact resume, crash safety,
checkpoint loading onto one CPU, clear config errors."""
import os
import signal

import jax
import numpy as np
import pytest

import colearn_jax
from colearn_jax.train import loop
from colearn_jax.train.checkpoint import CorruptCheckpointError, list_steps
from colearn_jax.train.metrics import read_metrics
from colearn_jax.train.program import TrainProgram
from colearn_jax.train.stop import GracefulStop
from tests.helpers import load_config


def _config(**train):
    c = load_config("clip.py:tiny")
    c.unlock()
    c.train.update(num_steps=8, log_every=2, eval_every=0, checkpoint_every=4, **train)
    return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    state = loop.train(_config(), workdir)
    return workdir, jax.device_get(state.params)


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_metrics_jsonl_and_checkpoints(uninterrupted):
    workdir, _ = uninterrupted
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/examples_per_sec"} <= set(rows[0])
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert list_steps(os.path.join(workdir, "checkpoints")) == [4, 8]
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_sigterm_then_resume_gives_identical_params(uninterrupted, tmp_path):
    _, full_params = uninterrupted
    workdir = str(tmp_path)

    def send_sigterm(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = loop.train(_config(), workdir, hooks=[send_sigterm])
    assert int(stopped.step) == 3  # finished the step in flight, then stopped
    assert list_steps(os.path.join(workdir, "checkpoints"))[-1] == 3
    resumed = loop.train(_config(), workdir)  # the same command again
    assert int(resumed.step) == 8
    _assert_trees_equal(jax.device_get(resumed.params), full_params)
    assert [r["step"] for r in read_metrics(workdir)] == [2, 4, 6, 8]


def test_crash_keeps_last_good_checkpoint_and_resumes(uninterrupted, tmp_path):
    _, full_params = uninterrupted
    workdir = str(tmp_path)

    def crash(step, state):
        if step == 6:
            raise RuntimeError("simulated failure")

    with pytest.raises(RuntimeError, match="simulated failure"):
        loop.train(_config(), workdir, hooks=[crash])
    assert list_steps(os.path.join(workdir, "checkpoints")) == [4]
    resumed = loop.train(_config(), workdir)
    _assert_trees_equal(jax.device_get(resumed.params), full_params)
    assert [r["step"] for r in read_metrics(workdir)] == [2, 4, 6, 8]  # repeated steps logged once


def test_load_onto_one_cpu_device(uninterrupted):
    workdir, full_params = uninterrupted
    model, variables, config = colearn_jax.load(workdir)
    assert config.model.name == "clip"
    cpu = jax.devices("cpu")[0]
    for leaf in jax.tree.leaves(variables):
        assert leaf.sharding.device_set == {cpu}
    _assert_trees_equal(jax.device_get(variables["params"]), full_params)
    images = np.zeros((3, config.data.image_size, config.data.image_size, 3), np.float32)
    emb = model.apply(variables, images, method=model.encode_image)
    assert emb.shape == (3, config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="step 5 not in"):
        colearn_jax.load(workdir, step=5)


def test_missing_and_corrupt_checkpoints_are_named(uninterrupted, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
        colearn_jax.load(str(tmp_path / "nothing_here"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        colearn_jax.load(str(empty))
    # Corrupt the array data of a copy of the newest checkpoint: loading names the step.
    import shutil
    workdir, _ = uninterrupted
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    blobs = 0
    for root, _, files in os.walk(copy / "checkpoints" / "8" / "model"):
        if os.path.basename(root) == "d":
            for f in files:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.write(b"garbage!" * 8)
                blobs += 1
    assert blobs
    # In-process: the stray callbacks of Orbax's failed reads are drained (checkpoint._drain_stray_callbacks).
    with pytest.raises(CorruptCheckpointError, match=r"Checkpoint step 8 in .*copy/checkpoints is corrupt: unreadable"):
        colearn_jax.load(str(copy))
    assert list_steps(os.path.join(workdir, "checkpoints")) == [4, 8]  # the original is untouched


def test_config_errors_fail_before_compiling(tmp_path):
    c = _config()
    c.data.batch_size = 12
    with pytest.raises(ValueError, match="config.data.batch_size=12 is not divisible"):
        loop.train(c, str(tmp_path))
    c = _config()
    c.model.vision.image_size = 24
    with pytest.raises(ValueError, match="config.model.vision.image_size=24 differs"):
        loop.train(c, str(tmp_path))
    c = _config()
    c.mesh.model = 16
    with pytest.raises(ValueError, match="config.mesh"):
        loop.train(c, str(tmp_path))
    assert not os.listdir(tmp_path)  # validation runs before the workdir gets anything


def test_ctrl_c_requests_a_graceful_stop_and_a_second_one_interrupts():
    # The handler in place before (Python's default_int_handler, or SIG_IGN where the suite was started in
    # the background by a non-interactive shell) is what must come back.
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGINT) is not before  # GracefulStop's own handler is installed
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_train_step_runs_under_a_transfer_guard(tmp_path, monkeypatch):
    """The loop calls the step under jax.transfer_guard("disallow"): a batch left on the host (an
    implicit host-to-device copy inside the step) is an error, not a silent round-trip."""
    monkeypatch.setattr(TrainProgram, "place_batch", lambda self, batch: batch)
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
        loop.train(_config(), str(tmp_path))


def test_nested_graceful_stops_share_the_outer_flag():
    """experiments/train.py enters a GracefulStop right after jax.distributed.initialize(); the trainer's
    own one inside it must see a signal that arrived before it started (e.g. during compilation)."""
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        with GracefulStop() as inner:
            assert inner.requested and inner.agreed(1)
        assert outer.requested
        assert signal.getsignal(signal.SIGTERM) == outer._handle  # the inner one left the handler alone
    assert signal.getsignal(signal.SIGTERM) == previous
    with GracefulStop() as fresh:  # a new outermost one starts unsignalled
        assert not fresh.requested


def test_multiprocess_stop_is_decided_only_by_the_exchange(monkeypatch):
    """Several processes: between exchanges nobody stops; at an exchange the local flag — or a JAX
    preemption sync point seen since the last one — goes into the all-gather, whose answer decides."""
    from colearn_jax.train import stop as stop_lib

    exchanged, sync_points = [], {3}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(stop_lib, "_preemption_sync_point", lambda step: step in sync_points)
    others = {"flag": False}

    def exchange(flag):
        exchanged.append(flag)
        return flag or others["flag"]

    monkeypatch.setattr(stop_lib, "_any_process", exchange)
    with GracefulStop(sync_every=2) as stopper:
        assert [stopper.agreed(s) for s in (1, 2)] == [False, False]
        assert exchanged == [False]  # one exchange, at step 2
        assert stopper.agreed(3) is False  # the sync point is latched, not acted on between exchanges
        assert stopper.agreed(4) is True and exchanged[-1] is True
    exchanged.clear()
    sync_points.clear()
    others["flag"] = True  # another process was signalled: this one stops at the same exchange
    with GracefulStop(sync_every=2) as stopper:
        assert [stopper.agreed(s) for s in (1, 2)] == [False, True] and exchanged == [False]
