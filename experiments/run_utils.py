"""What the results scripts under experiments/ share: train a config (or resume it) and evaluate its final
parameters with the system's own evaluator, once per work directory (`result.json` caches the figures), and
end the whole script, not just the run, when a signal stopped training (`run_script`)."""
from __future__ import annotations

import json
import os
import time


def exit_if_stopped(workdir: str):
    """A SIGTERM / Ctrl-C makes `loop.train` save and return early: end the script there, not the run only."""
    from colearn_jax.train.stop import stop_requested  # noqa: PLC0415

    if stop_requested():
        raise SystemExit(f"Stopped by a signal; {workdir} keeps its checkpoint: run the same command to resume.")


def evaluate(config, variables) -> dict:
    """The system's evaluator (`System.make_evaluator`) on `variables`, as floats."""
    from colearn_jax.train.program import TrainProgram  # noqa: PLC0415

    program = TrainProgram.build(config)
    evaluator = program.system.make_evaluator(config, program.mesh, program.rules)
    return {k: float(v) for k, v in evaluator(program.model, variables).items()}


def train_and_evaluate(config, workdir: str, extra_evals=None) -> dict:
    """Trains (or resumes) `config` in `workdir`, evaluates the final parameters and writes
    `workdir/result.json`; a finished run's result.json is returned as it is. `extra_evals(state) -> dict`
    adds figures (e.g. the same evaluator on another split)."""
    from colearn_jax.train import loop  # noqa: PLC0415

    done = os.path.join(workdir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    t0 = time.time()
    state = loop.train(config, workdir)
    wall = time.time() - t0
    exit_if_stopped(workdir)
    result = {"train_wall_s": wall, "steps": int(config.train.num_steps), **evaluate(config, state.variables())}
    if extra_evals is not None:
        result.update(extra_evals(state))
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def prepare_output(path: str) -> str:
    """`path` with its folder created (results JSON / PNG outputs)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_json(path: str, payload) -> None:
    with open(prepare_output(path), "w") as f:
        json.dump(payload, f, indent=1)
    print("wrote", path)


def run_script(body):
    """Runs a results script's `body()` with the host allocator configured and one `GracefulStop` held across
    all its runs, so a SIGTERM / Ctrl-C ends the script after the current run saves."""
    from colearn_jax import host_memory  # noqa: PLC0415
    from colearn_jax.train.stop import GracefulStop  # noqa: PLC0415

    host_memory.configure_allocator()
    with GracefulStop():
        return body()
