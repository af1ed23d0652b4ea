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
while every process takes part in each checkpoint (its shards, its data position) and each eval.

A run never destroys its last good state:
  * a non-finite loss or gradient raises `NonFiniteError` (naming the first bad step and metric)
    before anything is saved, or, with `train.nonfinite="skip"`, the update is dropped on device and
    `train/skipped_steps` is logged; the loop reads a device-side counter only at log/eval/save time;
  * a resume compares the stored config with the requested one before reading any array, and falls
    back past a corrupt newest checkpoint, which is moved aside (train/resume.py);
  * a failed save (e.g. a full disk) raises `CheckpointSaveError`; earlier checkpoints are untouched.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from colearn_jax.evals import describe
from colearn_jax.models import DataContext
from colearn_jax.train.checkpoint import Checkpointer
from colearn_jax.train.init_from import apply_pretrained, restore_pretrained
from colearn_jax.train.metrics import MetricWriter
from colearn_jax.train.program import TrainProgram
from colearn_jax.train.resume import resume
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


def _initial_state(program: TrainProgram, ckpt: Checkpointer, make_train_data, say, warn):
    """(state, train_data, resumed_from_step or None)."""
    config = program.config
    resumed = resume(ckpt, program, make_train_data, say, warn)
    if resumed is not None:
        state, train_data, step = resumed
        say(f"Resumed from {ckpt.directory} at step {step}.")
        return resumed
    train_data = make_train_data()
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


def _initial_health(metrics_shape: dict) -> dict:
    zero = jnp.int32(0)
    return dict(total=zero, run=zero, longest=zero, first_step=jnp.int32(-1),
                first_metrics={k: jnp.zeros((), v.dtype) for k, v in metrics_shape.items() if k != "nonfinite"})


@jax.jit
def _update_health(health, metrics, step):
    """Device-side: total non-finite steps, current and longest run of them, and the first bad step
    (the step count after it) with its metrics. Nothing reaches the host until `check_health` reads it."""
    bad = metrics["nonfinite"] > 0
    first = bad & (health["total"] == 0)
    run = jnp.where(bad, health["run"] + 1, 0)
    return dict(
        total=health["total"] + bad.astype(jnp.int32), run=run, longest=jnp.maximum(health["longest"], run),
        first_step=jnp.where(first, step, health["first_step"]),
        first_metrics={k: jnp.where(first, metrics[k], v) for k, v in health["first_metrics"].items()},
    )


def _first_nonfinite(metrics: dict) -> str:
    """'loss=nan' for the first non-finite metric (loss, then grad_norm, then the rest by name)."""
    order = ["loss", "grad_norm"] + sorted(k for k in metrics if k not in ("loss", "grad_norm"))
    for k in order:
        if k in metrics and not np.isfinite(metrics[k]):
            return f"{k}={float(metrics[k])}"
    return "loss or gradient norm"


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

    # Above the progress bar when there is one, else the "colearn_jax" logger (experiments/train.py shows
    # its INFO lines).
    say = pbar.write if not pbar.disable else log.info
    warn = pbar.write if not pbar.disable else log.warning

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                        async_save=tc.async_checkpoints)
    evaluator = system.make_evaluator(config, program.mesh, program.rules) if system.make_evaluator else None
    best = None
    if tc.get("best_metric") and evaluator is not None:
        spec = evaluator.metrics[tc.best_metric]  # config_checks made sure it exists
        best = Checkpointer(os.path.join(workdir, "best"), keep=1, async_save=False, best_metric=tc.best_metric,
                            best_mode="max" if spec.higher_is_better else "min")
    writer = MetricWriter(workdir) if is_main else None  # process 0 writes metrics.jsonl and TensorBoard
    # Signals are caught from here on (restore, compile and the final save included): a SIGTERM before
    # the first step stops the run after it.
    with GracefulStop(tc.get("stop_sync_every", 1)) as stopper:
        try:
            state, train_data, resumed = _initial_state(
                program, ckpt, lambda: system.make_train_data(config, ctx), say, warn)
            start = int(jax.device_get(state.step))
            pbar.update(start)
            if resumed is not None:
                pbar.set_description(f"train (resumed at {start})")
            if writer:
                writer.truncate_after(start)
            state = _run(program, state, train_data, start, ckpt, best, evaluator, writer, pbar, say, warn, hooks,
                         stopper)
        finally:
            # Commit any in-flight async save (the last good checkpoint) even when the run fails.
            pbar.close()
            _close_all([ckpt, best, writer])
    return state


def _close_all(closables):
    """Closes every one; re-raises the first error (e.g. a failed async save) after trying all."""
    error = None
    for c in closables:
        if c is None:
            continue
        try:
            c.close()
        except Exception as e:  # noqa: BLE001
            error = error or e
    if error is not None:
        raise error


def _last_good(ckpt: Checkpointer) -> str:
    step = ckpt.last_saved_step()
    return (f"the last good checkpoint is step {step} in {ckpt.directory}" if step is not None
            else f"no checkpoint had been written yet in {ckpt.directory}")


def _run(program, state, train_data, start, ckpt, best, evaluator, writer, pbar, say, warn, hooks, stopper):
    config, tc = program.config, program.config.train
    total = tc.num_steps
    skip_mode = tc.get("nonfinite", "stop") == "skip"
    max_skips = int(tc.get("max_consecutive_skips", 10))
    health = None
    reported_skips = 0
    t_last, steps_since = time.perf_counter(), 0
    step_fn = program.step  # built (and its shardings derived) outside the transfer guard

    def check_health(done):
        """Reads the device-side counters (a small transfer); raises NonFiniteError when the run must stop.
        Returns the number of skipped steps."""
        nonlocal reported_skips
        h = jax.device_get(health)
        if not h["total"]:
            return 0
        first = f"step {int(h['first_step'])} ({_first_nonfinite(h['first_metrics'])})"
        if not skip_mode:
            found = f" (seen at step {done})" if int(h["first_step"]) != done else ""
            raise NonFiniteError(
                f"Non-finite training at {first}{found}; nothing from that state was saved and "
                f"{_last_good(ckpt)}. Lower config.optim.lr (or set config.optim.grad_clip_norm), or set "
                "config.train.nonfinite='skip' to drop such updates.")
        if h["longest"] > max_skips:
            raise NonFiniteError(
                f"{int(h['longest'])} consecutive non-finite steps by step {done} (more than "
                f"config.train.max_consecutive_skips={max_skips}; the first at {first}); stopping, and "
                f"{_last_good(ckpt)}.")
        if h["total"] > reported_skips:
            warn(f"WARNING: skipped {int(h['total'])} non-finite update(s) by step {done}; the first at {first}.")
            reported_skips = int(h["total"])
        return int(h["total"])

    # The data position saved with a checkpoint is that of the last batch the step consumed, also when
    # a prefetcher has placed the next ones on the mesh already (data/prefetch.py).
    prefetch = int(config.data.get("prefetch", 0))
    if prefetch:
        from colearn_jax.data.prefetch import device_prefetch  # noqa: PLC0415

        train_data = device_prefetch(train_data, program.place_batch, buffer_size=prefetch)
    next_batch = (lambda: next(train_data)) if prefetch else (lambda: program.place_batch(next(train_data)))
    try:
        for step in range(start, total):
            batch = next_batch()
            with jax.transfer_guard("disallow"):
                state, metrics = step_fn(state, batch)
            if health is None:
                health = _initial_health(metrics)
            health = _update_health(health, metrics, state.step)
            done = step + 1
            steps_since += 1
            pbar.update(1)
            for hook in hooks:
                hook(done, state)

            if tc.log_every and (done % tc.log_every == 0 or done == total):
                skipped = check_health(done)
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
                check_health(done)
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
                check_health(done)
                ckpt.save(done, state, train_data, config, force=True)
            if stop:
                say(f"Stopped at step {done}; checkpoint saved in {ckpt.directory}. Run again to resume.")
                break
    finally:
        if prefetch:
            train_data.close()
    return state
