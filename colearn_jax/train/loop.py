"""The one generic train loop: sharded state, jitted donated step, eval, checkpoints, graceful stop.

`train(config, workdir)` builds the mesh and rules from config, creates (or restores) the sharded
train state, streams grain batches onto the mesh, and runs the compiled step under
`jax.transfer_guard("disallow")` so no accidental host round-trip hides in it. SIGTERM or Ctrl-C
finishes the current step, saves a checkpoint (state + data-iterator position) and returns; running
the same command again resumes and ends with exactly the parameters of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from colearn_jax import config_checks, sharding
from colearn_jax.models import get_system
from colearn_jax.train.checkpoint import Checkpointer, with_shardings
from colearn_jax.train.metrics import MetricWriter
from colearn_jax.train.optimizer import make_optimizer
from colearn_jax.train.state import TrainState, create_sharded_state, state_shardings
from colearn_jax.train.step import make_train_step

log = logging.getLogger("colearn_jax")


class GracefulStop(contextlib.AbstractContextManager):
    """Turns the first SIGTERM/SIGINT into a flag; a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Received %s: saving a checkpoint after this step, then stopping.", signal.Signals(signum).name)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def setup_compilation_cache(cache_dir: str):
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _concrete_example(system, config, batch_size):
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), system.example_batch(config, batch_size))


def build(config, *, devices=None):
    """Everything a run needs that does not touch data: (system, model, mesh, rules, tx, schedule)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.get_rules(config.sharding)
    system = get_system(config.model.name)
    model = system.build_model(config)
    tx, schedule = make_optimizer(config.optim, config.train.num_steps)
    return system, model, mesh, rules, tx, schedule


def compile_train_step(config, *, devices=None, batch_size: int | None = None):
    """Lowers and compiles the train step from abstract shapes only (no parameters are allocated).

    Returns the compiled executable; used by `experiments/train.py --compile_only` and benchmarks.
    """
    system, model, mesh, rules, tx, schedule = build(config, devices=devices)
    config_checks.validate(config, mesh, rules)
    dp = sharding.data_parallel_size(mesh, rules)
    abstract, shardings = state_shardings(model, tx, system.example_batch(config, dp), mesh, rules)
    batch = system.example_batch(config, batch_size or config.data.batch_size)
    bsh = sharding.batch_sharding(mesh, rules)
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=bsh), batch)
    step = make_train_step(
        model, system.make_objective(config, mesh, rules), tx, schedule, system.constrain_params, rules
    )
    jitted = jax.jit(step, in_shardings=(shardings, bsh), out_shardings=(shardings, sharding.replicated(mesh)),
                     donate_argnums=0)
    with jax.set_mesh(mesh):
        lowered = jitted.lower(with_shardings(abstract, shardings), batch)
    return lowered.compile(), lowered


def train(config, workdir: str, *, hooks: Iterable[Callable[[int, TrainState], None]] = (), devices=None) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the final state."""
    from colearn_jax.data import get_tokenizer, make_train_iterator  # noqa: PLC0415 (imports TFDS)

    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    setup_compilation_cache(config.train.get("compilation_cache_dir", ""))
    system, model, mesh, rules, tx, schedule = build(config, devices=devices)
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.get("vocab_path"))
    config_checks.validate(config, mesh, rules, tokenizer)
    dp = sharding.data_parallel_size(mesh, rules)

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoints,
    )
    train_iter = make_train_iterator(
        config.data, tokenizer, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    latest = ckpt.latest_step()
    if latest is not None:
        abstract, shardings = state_shardings(model, tx, system.example_batch(config, dp), mesh, rules)
        state, train_iter = ckpt.restore(latest, with_shardings(abstract, shardings), train_iter)
        log.info("Resumed from %s at step %d.", ckpt.directory, latest)
    else:
        rng = jax.random.PRNGKey(config.seed)
        state, shardings = create_sharded_state(
            model, tx, _concrete_example(system, config, dp), mesh, rules, rng
        )

    bsh = sharding.batch_sharding(mesh, rules)
    step_fn = jax.jit(
        make_train_step(model, system.make_objective(config, mesh, rules), tx, schedule, system.constrain_params, rules),
        in_shardings=(shardings, bsh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    evaluator = system.make_evaluator(config, mesh, rules) if system.make_evaluator else None
    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir) if is_main else None

    start = int(jax.device_get(state.step))
    if writer:
        writer.truncate_after(start)
    total = config.train.num_steps
    tc = config.train
    pbar = tqdm(total=total, initial=start, disable=not (tc.progress_bar and is_main), desc="train", dynamic_ncols=True)
    t_last, steps_since = time.perf_counter(), 0
    try:
        with GracefulStop() as stopper, jax.set_mesh(mesh):
            for step in range(start, total):
                batch = sharding.shard_batch(next(train_iter), mesh, rules)
                with jax.transfer_guard("disallow"):
                    state, metrics = step_fn(state, batch)
                done = step + 1
                steps_since += 1
                pbar.update(1)
                for hook in hooks:
                    hook(done, state)

                if tc.log_every and (done % tc.log_every == 0 or done == total):
                    metrics = jax.device_get(metrics)
                    now = time.perf_counter()
                    ex_per_s = steps_since * config.data.batch_size / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    row = {f"train/{k}": v for k, v in metrics.items()}
                    row["train/examples_per_sec"] = ex_per_s
                    pbar.set_postfix(loss=f"{float(metrics['loss']):.4f}", ex_s=f"{ex_per_s:.0f}")
                    if writer:
                        writer.write(done, row)

                if evaluator and tc.eval_every and (done % tc.eval_every == 0 or done == total):
                    eval_metrics = evaluator(model, state.variables())
                    row = {f"eval/{k}": v for k, v in eval_metrics.items()}
                    if writer:
                        writer.write(done, row)
                    pbar.write(f"step {done}: " + ", ".join(f"{k}={float(v):.4f}" for k, v in row.items()))
                    t_last = time.perf_counter()

                should_save = (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == total
                if should_save or stopper.requested:
                    ckpt.save(done, state, train_iter, config, force=True)
                if stopper.requested:
                    pbar.write(f"Stopped at step {done}; checkpoint saved in {ckpt.directory}. Run again to resume.")
                    break
    finally:
        # Commit any in-flight async save (the last good checkpoint) even when the run fails.
        pbar.close()
        ckpt.close()
        if writer:
            writer.close()
    return state
