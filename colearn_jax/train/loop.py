"""The one generic train loop: it talks only to `System` (through `TrainProgram`) and names no model,
field, tokenizer or metric of any system.

`train(config, workdir)` validates the config (before the workdir exists), builds the program,
creates the sharded state — restored from the workdir's newest checkpoint, or fresh, optionally
initialised from `config.train.init_from` — and streams the system's train data onto the mesh
(placed ahead of the step by a device prefetcher), running the compiled step under
`jax.transfer_guard("disallow")`. Periodic evals use the system's evaluator and its metric
descriptions; `config.train.best_metric` keeps the best parameters in `<workdir>/best`. SIGTERM or
Ctrl-C finishes the current step, saves a checkpoint (state + data position) and returns; the same
command resumes and ends with exactly the parameters of an uninterrupted run. With several processes
(one per host) a signal to any one of them stops all at the same step (the next flag exchange, every
`train.stop_sync_every` steps; see train/stop.py); process 0 alone writes metrics and TensorBoard,
while every process takes part in each checkpoint (its shards, its data position) and each eval. A non-finite loss or
gradient stops the run before anything is saved (or, with `train.nonfinite="skip"`, skips the update).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from colearn_jax.evals import describe
from colearn_jax.models import DataContext
from colearn_jax.train.checkpoint import Checkpointer
from colearn_jax.train.init_from import apply_pretrained, restore_pretrained
from colearn_jax.train.metrics import MetricWriter
from colearn_jax.train.program import TrainProgram
from colearn_jax.train.state import TrainState, reinit_opt_state
from colearn_jax.train.stop import GracefulStop

log = logging.getLogger("colearn_jax")


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; nothing from that state was saved."""


def setup_compilation_cache(cache_dir: str):
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def metric_specs(config) -> dict:
    """{name: MetricSpec} of the system's evaluator, without building it (for summaries and plots)."""
    from colearn_jax.models import get_system  # noqa: PLC0415

    system = get_system(config.model.name)
    return system.describe_metrics(config) if system.describe_metrics else {}


def _initial_state(program: TrainProgram, ckpt: Checkpointer, train_data, say):
    """(state, train_data, resumed_from_step or None)."""
    config = program.config
    latest = ckpt.latest_step()
    if latest is not None:
        state, train_data = ckpt.restore(latest, program.abstract_state, train_data)
        say(f"Resumed from {ckpt.directory} at step {latest}.")
        return state, train_data, latest
    state = program.init_state()
    if config.train.get("init_from"):
        loaded, src_step, src_dir = restore_pretrained(
            config.train.init_from, program.abstract_state.variables(), config.train.get("init_from_map", ""),
            config.train.get("init_from_step"))
        variables = apply_pretrained(state.variables(), loaded)
        state = TrainState.from_parts(variables, state.progress())
        state = reinit_opt_state(state, program.tx, program.state_shardings)
        say(f"Initialised {len(loaded)} arrays from {src_dir} (step {src_step}).")
    return state, train_data, None


@jax.jit
def _update_health(health, nonfinite):
    """Device-side running counts: total non-finite steps, current and longest run of them."""
    total, run, longest = health
    run = jnp.where(nonfinite > 0, run + 1, 0)
    return total + nonfinite, run, jnp.maximum(longest, run)


def train(config, workdir: str, *, hooks: Iterable[Callable[[int, TrainState], None]] = (), devices=None) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the final state."""
    program = TrainProgram.build(config, devices=devices)  # validates before the workdir exists
    system, tc = program.system, config.train
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    setup_compilation_cache(tc.get("compilation_cache_dir", ""))
    is_main = jax.process_index() == 0
    ctx = DataContext(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    pbar = tqdm(total=tc.num_steps, disable=not (tc.progress_bar and is_main), desc="train", dynamic_ncols=True)

    def say(message: str):  # visible with or without the progress bar, once per run
        if pbar.disable:
            if is_main:
                print(message, flush=True)
        else:
            pbar.write(message)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                        async_save=tc.async_checkpoints)
    evaluator = system.make_evaluator(config, program.mesh, program.rules) if system.make_evaluator else None
    best = None
    if tc.get("best_metric") and evaluator is not None:
        spec = evaluator.metrics.get(tc.best_metric)
        if spec is None:
            raise ValueError(f"config.train.best_metric={tc.best_metric!r} is not a metric of this system's "
                             f"evaluator; choose one of {sorted(evaluator.metrics)}.")
        best = Checkpointer(os.path.join(workdir, "best"), keep=1, async_save=False, best_metric=tc.best_metric,
                            best_mode="max" if spec.higher_is_better else "min")
    writer = MetricWriter(workdir) if is_main else None  # process 0 writes metrics.jsonl and TensorBoard
    # Signals are caught from here on (restore, compile and the final save included): a SIGTERM before
    # the first step stops the run after it.
    with GracefulStop(tc.get("stop_sync_every", 1)) as stopper:
        try:
            state, train_data, resumed = _initial_state(program, ckpt, system.make_train_data(config, ctx), say)
            start = int(jax.device_get(state.step))
            pbar.update(start)
            if resumed is not None:
                pbar.set_description(f"train (resumed at {start})")
            if writer:
                writer.truncate_after(start)
            state = _run(program, state, train_data, start, ckpt, best, evaluator, writer, pbar, say, hooks,
                         stopper)
        finally:
            # Commit any in-flight async save (the last good checkpoint) even when the run fails.
            pbar.close()
            ckpt.close()
            if best is not None:
                best.close()
            if writer:
                writer.close()
    return state


def _run(program, state, train_data, start, ckpt, best, evaluator, writer, pbar, say, hooks, stopper):
    config, tc = program.config, program.config.train
    total = tc.num_steps
    skip_mode = tc.get("nonfinite", "stop") == "skip"
    max_skips = int(tc.get("max_consecutive_skips", 10))
    health = (jnp.int32(0), jnp.int32(0), jnp.int32(0))
    t_last, steps_since = time.perf_counter(), 0
    step_fn = program.step  # built (and its shardings derived) outside the transfer guard

    def check_health(done, metrics):
        total_bad, _, longest = (int(x) for x in jax.device_get(health))
        if not total_bad:
            return 0
        if not skip_mode:
            bad = [k for k, v in jax.device_get(metrics).items() if k != "nonfinite" and not jnp.isfinite(v)]
            raise NonFiniteError(
                f"Non-finite training at or before step {done} (first non-finite metric: {bad[0] if bad else 'loss'}); "
                f"no checkpoint of that state was written, the last good one is in {ckpt.directory}. Lower "
                "config.optim.lr or set config.train.nonfinite='skip'.")
        if longest > max_skips:
            raise NonFiniteError(
                f"{longest} consecutive non-finite steps (config.train.max_consecutive_skips={max_skips}) by step "
                f"{done}; stopping. The last saved checkpoint in {ckpt.directory} is intact.")
        return total_bad

    for step in range(start, total):
        batch = program.place_batch(next(train_data))
        with jax.transfer_guard("disallow"):
            state, metrics = step_fn(state, batch)
        health = _update_health(health, metrics["nonfinite"])
        done = step + 1
        steps_since += 1
        pbar.update(1)
        for hook in hooks:
            hook(done, state)

        if tc.log_every and (done % tc.log_every == 0 or done == total):
            skipped = check_health(done, metrics)
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            ex_per_s = steps_since * config.data.batch_size / max(now - t_last, 1e-9)
            t_last, steps_since = now, 0
            row = {f"train/{k}": v for k, v in metrics.items() if k != "nonfinite"}
            row["train/examples_per_sec"] = ex_per_s
            if skip_mode:
                row["train/skipped_steps"] = skipped
            pbar.set_postfix(loss=f"{float(metrics['loss']):.4f}", ex_s=f"{ex_per_s:.0f}")
            if writer:
                writer.write(done, row)

        if evaluator and tc.eval_every and (done % tc.eval_every == 0 or done == total):
            check_health(done, metrics)
            results = evaluator(program.model, state.variables())
            if writer:
                writer.write(done, {f"eval/{k}": v for k, v in results.items()})
            say(f"step {done}: " + ", ".join(f"{k}={describe(v, evaluator.metrics.get(k))}"
                                             for k, v in results.items()))
            if best is not None:
                best.save_variables(done, state.variables(), config, metrics={k: float(v) for k, v in results.items()})
            t_last = time.perf_counter()

        stop = stopper.agreed(done)
        should_save = (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == total
        if should_save or stop:
            check_health(done, metrics)
            ckpt.save(done, state, train_data, config, force=True)
        if stop:
            say(f"Stopped at step {done}; checkpoint saved in {ckpt.directory}. Run again to resume.")
            break
    return state
