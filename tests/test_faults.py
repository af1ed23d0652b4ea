"""Injected faults: a run never destroys its last good state, and every bad input is refused clearly.

Each fault below (a non-finite loss, a corrupt newest checkpoint, SIGKILL during an async save, a
full disk) leaves a workdir whose checkpoint restores and continues to exactly the parameters of an
undisturbed run. Bad config values, a changed model on resume and an unknown command-line key give
one error naming the key. The toy system (tests/toy_system.py) keeps this module fast; CLIP's tiny
config is used where its own fields are checked; subprocesses only where a real kill or the command
line is the point.
"""
import errno
import glob
import json
import logging
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import colearn_jax
from colearn_jax.train import loop
from colearn_jax.train.checkpoint import Checkpointer, CheckpointSaveError, list_steps
from colearn_jax.train.metrics import read_metrics
from colearn_jax.train.program import TrainProgram
from colearn_jax.train.resume import ConfigChangeError
from tests import toy_system
from tests.helpers import ROOT, load_config

STEPS = 8


def _toy(**train):
    c = toy_system.get_config()
    c.train.update({**dict(num_steps=STEPS, log_every=2, eval_every=0, checkpoint_every=2, keep_checkpoints=2,
                           best_metric=""), **train})
    return c


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _ckpts(workdir):
    return os.path.join(workdir, "checkpoints")


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """(workdir with checkpoints [6, 8], final params) of a run nothing happened to."""
    workdir = str(tmp_path_factory.mktemp("undisturbed"))
    state = loop.train(_toy(), workdir)
    assert list_steps(_ckpts(workdir)) == [6, 8]
    return workdir, jax.device_get(state.params)


def _resume_matches(workdir, final_params, config=None):
    state = loop.train(config or _toy(), workdir)
    assert int(state.step) == STEPS
    _same(jax.device_get(state.params), final_params)
    assert [r["step"] for r in read_metrics(workdir)] == [2, 4, 6, 8]  # repeated steps logged once
    return state


# ---------------------------------------------------------------------- non-finite training
def test_nan_in_stop_mode_names_the_step_and_keeps_the_last_good_checkpoint(undisturbed, tmp_path, monkeypatch):
    workdir = str(tmp_path)
    monkeypatch.setattr(toy_system, "NAN_STEPS", (4,))  # the 5th step
    with pytest.raises(loop.NonFiniteError, match=r"Non-finite training at step 5 \(loss=nan\) \(seen at step 6\)"
                       r".*last good checkpoint is step 4"):
        loop.train(_toy(), workdir)
    assert list_steps(_ckpts(workdir)) == [2, 4]  # nothing of the NaN state was saved
    monkeypatch.setattr(toy_system, "NAN_STEPS", ())
    _resume_matches(workdir, undisturbed[1])


def test_nan_in_skip_mode_drops_the_update_and_logs_skipped_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_system, "NAN_STEPS", (4,))
    seen = {}
    hook = lambda step, state: seen.update({step: jax.device_get(state.params)})  # noqa: E731
    state = loop.train(_toy(nonfinite="skip"), str(tmp_path), hooks=[hook])
    _same(seen[5], seen[4])  # the 5th update was dropped ...
    assert not np.allclose(seen[6]["fc"]["kernel"], seen[5]["fc"]["kernel"])  # ... and training went on
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    skipped = {r["step"]: r["train/skipped_steps"] for r in read_metrics(str(tmp_path))}
    assert skipped == {2: 0, 4: 0, 6: 1, 8: 1}
    assert list_steps(_ckpts(str(tmp_path))) == [6, 8]


def test_too_many_consecutive_skips_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_system, "NAN_STEPS", tuple(range(2, STEPS)))
    with pytest.raises(loop.NonFiniteError, match=r"consecutive non-finite steps by step 6 .*"
                       r"max_consecutive_skips=2.*the first at step 3"):
        loop.train(_toy(nonfinite="skip", max_consecutive_skips=2), str(tmp_path))
    assert list_steps(_ckpts(str(tmp_path))) == [2, 4]


# ---------------------------------------------------------------------- corrupt newest checkpoint
def _data_files(step_dir):
    files = glob.glob(os.path.join(step_dir, "model", "**", "d", "*"), recursive=True)
    assert files, step_dir
    return sorted(files)


def _truncate(step_dir, _):
    """Every data file cut to half (which of them a read opens depends on Orbax's OCDBT layout)."""
    for f in _data_files(step_dir):
        os.truncate(f, os.path.getsize(f) // 2)


def _garbage(step_dir, _):
    rng = np.random.default_rng(0)
    for f in _data_files(step_dir):
        with open(f, "r+b") as fh:
            fh.write(rng.bytes(os.path.getsize(f)))


def _empty_metadata(step_dir, _):
    open(os.path.join(step_dir, "model", "_METADATA"), "w").close()


def _rewrite_item(step_dir, item, tree, keep_checksums=True):
    """Replaces one stored item with `tree`, written by Orbax (a well-formed file with other values)."""
    scratch = step_dir + ".scratch"
    with Checkpointer(scratch, async_save=False) as other:  # Orbax directly: our save refuses NaN
        other.manager.save(0, args=ocp.args.Composite(**{item: ocp.args.PyTreeSave(tree)}))
    shutil.rmtree(os.path.join(step_dir, item))
    shutil.move(os.path.join(scratch, "0", item), os.path.join(step_dir, item))
    shutil.rmtree(scratch)
    if not keep_checksums:
        shutil.rmtree(os.path.join(step_dir, "checksums"))


def _flip_first(tree, where: str, flip):
    """`tree` (host copies) with `flip` applied to the first 2-D leaf whose path contains `where`."""
    from colearn_jax.train.integrity import path_str

    done = []

    def visit(path, x):
        x = np.array(x)
        if not done and where in path_str(path) and x.ndim == 2:
            flip(x)
            done.append(path_str(path))
        return x

    tree = jax.tree_util.tree_map_with_path(visit, tree)
    assert done, where
    return tree


def _flipped_bit(step_dir, workdir):
    """One exponent bit of one Adam moment flipped: finite (~1e38), well-formed, silently wrong."""
    program = TrainProgram.build(_toy())
    with Checkpointer(_ckpts(workdir), read_only=True) as ckpt:
        state, _ = ckpt.restore(STEPS, program.abstract_state)

    def flip(x):
        x.view(np.uint32)[0, 0] ^= np.uint32(1 << 30)
        assert np.isfinite(x[0, 0]) and abs(x[0, 0]) > 1e30

    _rewrite_item(step_dir, "train", _flip_first(jax.device_get(state.progress()), "/nu/", flip))


def _nan_params_without_checksums(step_dir, workdir):
    """A NaN parameter in a checkpoint from before checksums existed: only finiteness can catch it."""
    _, variables, _ = colearn_jax.load(workdir)

    def poison(x):
        x[0, 0] = np.nan

    _rewrite_item(step_dir, "model", _flip_first(jax.device_get(variables), "params/", poison), keep_checksums=False)


@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _empty_metadata, _flipped_bit, _nan_params_without_checksums],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(undisturbed, tmp_path, corrupt, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(undisturbed[0], workdir)
    corrupt(os.path.join(_ckpts(workdir), str(STEPS)), workdir)
    with caplog.at_level(logging.WARNING, logger="colearn_jax"):
        _resume_matches(workdir, undisturbed[1])
    said = caplog.text
    assert f"Checkpoint step {STEPS} in {_ckpts(workdir)} is corrupt" in said
    assert f"Moved it to {_ckpts(workdir)}_quarantine/{STEPS}" in said
    assert "resuming from step 6, the newest good checkpoint" in said
    assert os.path.isdir(os.path.join(_ckpts(workdir) + "_quarantine", str(STEPS), "model"))  # kept, not deleted
    assert list_steps(_ckpts(workdir)) == [6, 8]  # step 8 written again by the resumed run


def test_every_checkpoint_corrupt_is_an_error_not_a_silent_restart(undisturbed, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(undisturbed[0], workdir)
    for step in (6, 8):
        _empty_metadata(os.path.join(_ckpts(workdir), str(step)), workdir)
    with pytest.raises(RuntimeError, match=r"No checkpoint in .* could be restored; steps \[8, 6\] were moved"):
        loop.train(_toy(), workdir)
    assert sorted(os.listdir(_ckpts(workdir) + "_quarantine")) == ["6", "8"]


# ---------------------------------------------------------------------- SIGKILL during an async save
_KILL_DURING_SAVE = """
import os, signal, sys, threading
sys.path.insert(0, {root!r})
import tests.conftest  # the test session's 8 devices and matmul precision
from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
from colearn_jax.train import loop
from tests import toy_system, test_faults

save_fn = jh.JsonCheckpointHandler._save_fn

async def killed_mid_commit(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).startswith("{step}."):
        print("SIGKILL in", threading.current_thread().name, directory, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return await save_fn(self, x, directory)

jh.JsonCheckpointHandler._save_fn = killed_mid_commit
loop.train(test_faults._toy(), {workdir!r})
"""


def _tensorboard_steps(tb_dir) -> dict:
    """{tag: [steps]} over every events file, read independently of colearn_jax: each TFRecord frame's
    masked CRC-32C is checked (what TensorBoard verifies), then parsed with tensorboardX's protos."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    steps = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "*tfevents*"))):
        blob, pos = open(path, "rb").read(), 0
        while pos < len(blob):
            header = blob[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", blob[pos + 8:pos + 12])[0] == masked(header), path
            data = blob[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])[0] == masked(data), path
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
            pos += 16 + length
    return steps


def test_sigkill_during_async_save_keeps_the_previous_checkpoint(undisturbed, tmp_path):
    workdir = str(tmp_path / "run")
    script = _KILL_DURING_SAVE.format(root=ROOT, step=6, workdir=workdir)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == -9, proc.stderr[-3000:]
    killed = [line for line in proc.stdout.splitlines() if line.startswith("SIGKILL in")]
    assert killed and "MainThread" not in killed[0]  # in Orbax's background commit thread
    assert list_steps(_ckpts(workdir)) == [2, 4]
    assert glob.glob(os.path.join(_ckpts(workdir), "6.orbax-checkpoint-tmp*"))  # the save really was cut short
    assert sorted(_tensorboard_steps(os.path.join(workdir, "tensorboard"))["train/loss"]) == [2, 4, 6]

    _resume_matches(workdir, undisturbed[1])
    assert not glob.glob(os.path.join(_ckpts(workdir), "*.orbax-checkpoint-tmp*"))  # cleaned on open
    for tag, steps in _tensorboard_steps(os.path.join(workdir, "tensorboard")).items():
        assert sorted(steps) == [2, 4, 6, 8], (tag, steps)  # no step twice per tag


# ---------------------------------------------------------------------- disk full
def test_disk_full_during_save_is_a_clear_error_and_the_previous_checkpoint_survives(undisturbed, tmp_path,
                                                                                      monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    save_fn = jh.JsonCheckpointHandler._save_fn

    async def disk_full(self, x, directory):
        if os.path.basename(os.path.dirname(str(directory))).startswith("6."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await save_fn(self, x, directory)

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", disk_full)
    workdir = str(tmp_path)
    with pytest.raises(CheckpointSaveError, match=r"Could not write step 6 in .*No space left on device.*"
                       r"the previous checkpoint \(step 4\) is intact\. The disk is full"):
        loop.train(_toy(), workdir)
    assert list_steps(_ckpts(workdir)) == [2, 4]
    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", save_fn)
    _resume_matches(workdir, undisturbed[1])


# ---------------------------------------------------------------------- bad config values
BAD_VALUES = [
    ("optim.lr", -1e-3, r"config.optim.lr=-0.001 must be > 0"),
    ("optim.lr", float("nan"), r"config.optim.lr=nan must be a finite number"),
    ("optim.warmup_steps", -5, r"config.optim.warmup_steps=-5 must be an integer >= 0"),
    ("optim.weight_decay", -0.1, r"config.optim.weight_decay=-0.1 must be >= 0"),
    ("optim.b2", 1.0, r"config.optim.b2=1.0 must be in \[0, 1\)"),
    ("optim.eps", 0.0, r"config.optim.eps=0.0 must be > 0"),
    ("optim.grad_clip_norm", -1.0, r"config.optim.grad_clip_norm=-1.0 must be > 0"),
    ("optim.end_lr_factor", 2.0, r"config.optim.end_lr_factor=2.0 must be in \[0, 1\]"),
    ("data.batch_size", 0, r"config.data.batch_size=0 must be a positive integer"),
    ("data.eval_batch_size", -8, r"config.data.eval_batch_size=-8 must be a positive integer"),
    ("train.num_steps", 0, r"config.train.num_steps=0 must be a positive integer"),
    ("train.checkpoint_every", -1, r"config.train.checkpoint_every=-1 must be an integer >= 0"),
    ("train.keep_checkpoints", 0, r"config.train.keep_checkpoints=0 must be a positive integer"),
    ("train.max_consecutive_skips", -1, r"config.train.max_consecutive_skips=-1 must be an integer >= 0"),
    ("train.nonfinite", "ignore", r"config.train.nonfinite='ignore' must be 'stop' or 'skip'"),
    ("train.allow_config_change", "train.num_step", r"allow_config_change names 'train.num_step'.*"
                                                     r"did you mean train.num_steps"),
    ("train.best_metric", "accuracy", r"config.train.best_metric='accuracy' is not a metric.*zeroshot_top1"),
    ("seed", -1, r"config.seed=-1 must be an integer >= 0"),
    # CLIP's own fields (clip_system.validate_config)
    ("model.dropout", 1.0, r"config.model.dropout=1.0 must be in \[0.0, 1.0\)"),
    ("model.embed_dim", 0, r"config.model.embed_dim=0 must be a positive integer"),
    ("model.vision.width", -3, r"config.model.vision.width=-3 must be a positive integer"),
    ("model.vision.patch_size", 0, r"config.model.vision.patch_size=0 must be a positive integer"),
    ("model.vision.mlp_ratio", 0.0, r"config.model.vision.mlp_ratio=0.0 must be in"),
    ("model.text.heads", 5, r"config.model.text.width=32 is not divisible by config.model.text.heads=5"),
    ("model.text.layers", 0, r"config.model.text.layers=0 must be a positive integer"),
    ("model.activation", "swish", r"config.model.activation='swish'; choose one of"),
    ("model.remat_policy", "some", r"config.model.remat_policy='some'; choose one of"),
    ("data.context_length", -1, r"config.data.context_length=-1 must be a positive integer"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_each_bad_config_value_is_refused_before_the_workdir_exists(tmp_path, key, value, message):
    c = load_config("clip.py:tiny")
    c.unlock()
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        loop.train(c, str(workdir))
    assert not workdir.exists()


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "experiments/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT})


def test_unknown_config_key_on_the_command_line_is_one_line_with_a_suggestion(tmp_path):
    proc = _cli("--config=configs/clip.py:tiny", "--config.model.vision.widht=3", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: config.model.vision.widht is not a config field; did you mean model.vision.width?"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- a changed config on resume
def test_changed_model_on_resume_is_refused_with_the_key_diff(undisturbed, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(undisturbed[0], workdir)
    c = _toy(num_steps=10, log_every=4)  # log cadence may change; the schedule may not
    c.model.hidden = 32
    c.optim.lr = 5e-3
    c.sharding = "fsdp"  # free
    with pytest.raises(ConfigChangeError) as e:
        loop.train(c, workdir)
    msg = str(e.value)
    assert "in 3 key(s)" in msg
    assert "model.hidden: 16 (stored) -> 32 (requested)" in msg
    assert "optim.lr: 0.01 (stored) -> 0.005 (requested)" in msg
    assert "train.num_steps: 8 (stored) -> 10 (requested)" in msg
    assert "log_every" not in msg and "sharding" not in msg
    assert "--config.train.allow_config_change=model.hidden,optim.lr,train.num_steps" in msg
    assert list_steps(_ckpts(workdir)) == [6, 8] and not os.path.exists(_ckpts(workdir) + "_quarantine")

    # An allowed change that reshapes parameters is still refused (from metadata), never quarantined.
    c.train.allow_config_change = "model.hidden,optim.lr,train.num_steps"
    with pytest.raises(ConfigChangeError, match=r"model/params/fc/kernel: stored \(8, 16\) vs requested \(8, 32\)"):
        loop.train(c, workdir)
    assert list_steps(_ckpts(workdir)) == [6, 8] and not os.path.exists(_ckpts(workdir) + "_quarantine")


def test_allowed_schedule_change_resumes_with_a_warning(undisturbed, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(undisturbed[0], workdir)
    with caplog.at_level(logging.INFO, logger="colearn_jax"):
        state = loop.train(_toy(num_steps=10, allow_config_change="train.num_steps"), workdir)
    assert int(state.step) == 10
    assert "train.num_steps: 8 (stored) -> 10 (requested)" in caplog.text
    assert f"Resumed from {_ckpts(workdir)} at step 8." in caplog.text
    assert json.load(open(os.path.join(_ckpts(workdir), "10", "config", "metadata")))["train"]["num_steps"] == 10
