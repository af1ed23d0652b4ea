"""Train any colearn_jax system from a config file.

  python experiments/train.py --config=configs/clip.py:digits --workdir=/tmp/clip_digits
  python experiments/train.py --config=configs/clip.py:vit_b16 --config.sharding=fsdp \
      --config.mesh.data=-1 --workdir=/tmp/clip_b16 --compile_only

Running the same command again resumes from the newest checkpoint in <workdir>/checkpoints (it must
be the same run: a changed model, optimizer or schedule is refused unless
--config.train.allow_config_change names it; a corrupt newest checkpoint is moved to
<workdir>/checkpoints_quarantine and the previous one used). SIGTERM / Ctrl-C save a checkpoint and
exit cleanly. Exit codes: 0 done; 2 a bad flag or config value (one line, nothing created); 1 the run
failed (non-finite loss, a checkpoint that cannot be written or read), its last good checkpoint kept.

`--compile_only` lowers and compiles the train step from abstract shapes (nothing is allocated) and
prints the same JSON as `experiments/benchmark.py --compile_only` (`{"mode", "env", "result"}`):
`result.flops_per_step` is the global XLA FLOPs of one step (every layer of a scanned stack counted,
see `perf.step_flops`), `result.flops_per_step_per_device_xla` the compiled per-device count,
`result.memory` the per-device memory plan; a readable table goes to stderr.
Multi-host: run the same command on every host with --multihost (jax.distributed.initialize(); on TPU
pods, Slurm, Open MPI and Kubernetes it finds its peers, elsewhere add --coordinator_address=host0:port
--num_processes=N --process_id=i). A SIGTERM on one host stops every host at the same step, after a
checkpoint; see README "Training".
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # experiments/benchmark.py for --compile_only

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/clip.py:digits.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard logs go.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Only lower + compile the train step, then exit.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() before anything else: one process per host (TPU pod "
    "slices, multi-GPU hosts, several CPU hosts). On TPU/Slurm/Open MPI/Kubernetes the coordinator and process "
    "ids are detected; elsewhere pass the three flags below (or set $JAX_COORDINATOR_ADDRESS).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "--multihost: host:port of process 0's coordination service (same on every host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--multihost: how many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--multihost: this process's index in [0, num_processes).")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 0, "Simulate this many CPU devices (sets XLA_FLAGS before JAX starts)."
)


def main(argv):
    del argv
    if _NUM_CPU_DEVICES.value:
        from colearn_jax import cpu_devices  # noqa: PLC0415

        cpu_devices.simulate(_NUM_CPU_DEVICES.value)
    from colearn_jax import host_memory  # noqa: PLC0415

    host_memory.configure_allocator()  # CPU hosts: reuse the step's scratch buffer (before JAX starts)
    import jax  # noqa: PLC0415 (after XLA_FLAGS)

    from colearn_jax.train.stop import GracefulStop  # noqa: PLC0415

    with contextlib.ExitStack() as signals:
        if _MULTIHOST.value:
            # CPU hosts exchange collectives through gloo (jax's default jax_cpu_collectives_implementation).
            jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                       process_id=_PROCESS_ID.value)
            # initialize() made JAX's preemption notifier the SIGTERM handler (it swallows the signal). Take
            # SIGTERM and Ctrl-C over now, so that one arriving during start-up, restore or compilation stops
            # every process after the first step (colearn_jax/train/stop.py).
            signals.enter_context(GracefulStop())
        elif any(flags.FLAGS[name].present for name in ("coordinator_address", "num_processes", "process_id")):
            raise app.UsageError("--coordinator_address/--num_processes/--process_id need --multihost.")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/TFDS INFO lines drown the progress bar
        # ...but not the trainer's own lines (resumed / initialised from / eval results) when there is no bar.
        logging.getLogger("colearn_jax").setLevel(logging.INFO)
        config = _CONFIG.value
        from colearn_jax.train import loop  # noqa: PLC0415

        if _COMPILE_ONLY.value:
            import benchmark  # noqa: PLC0415 (experiments/benchmark.py: one FLOP/memory accounting for both)

            report = benchmark.compile_only_report(config)
            if jax.process_index() == 0:
                print(benchmark.format_result(report["result"]), file=sys.stderr)
                print(json.dumps(report, indent=2, default=str))
            return
        if not _WORKDIR.value:
            raise app.UsageError("--workdir is required (unless --compile_only).")
        from colearn_jax.train.checkpoint import CheckpointError  # noqa: PLC0415

        try:
            loop.train(config, _WORKDIR.value)
        except (ValueError, FileNotFoundError) as e:  # named errors: no traceback wall
            _fail(str(e), 2)
        except (loop.NonFiniteError, CheckpointError) as e:
            _fail(str(e), 1)
    if jax.process_index() == 0:  # the one that wrote metrics.jsonl
        specs = loop.metric_specs(config)
        summarize(_WORKDIR.value, specs)
        from colearn_jax.train.plots import plot_metrics  # noqa: PLC0415

        path = plot_metrics(_WORKDIR.value, specs=specs)
        if path:
            print(f"Training curves: {path}")


def _fail(message: str, code: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _config_overrides(argv) -> tuple[str | None, list[str]]:
    """(the --config file spec, the dotted keys of its --config.<key>=... overrides) in `argv`."""
    spec, keys = None, []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    return spec, keys


def parse_flags(argv):
    """absl's flag parsing, except that a bad flag or an unknown config key is one line on stderr (with
    a suggestion for a misspelt key) and exit code 2, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e), 2)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a missing field
        spec, keys = _config_overrides(argv)
        try:
            from colearn_jax.config_checks import has_field, unknown_key_message  # noqa: PLC0415

            config = flags.FLAGS["config"].parser.parse(spec)
            missing = [k for k in keys if not has_field(config, k)]
        except Exception:  # noqa: BLE001 (the config file itself is broken: show the original error)
            missing = []
        _fail(unknown_key_message(config, missing[0]) if missing else f"bad --config override: {e}", 2)


def summarize(workdir: str, specs: dict):
    """Prints the final held-out metrics of the run (from metrics.jsonl), formatted by their MetricSpec."""
    from colearn_jax.evals import describe  # noqa: PLC0415
    from colearn_jax.train.metrics import read_metrics  # noqa: PLC0415

    evals = [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
    if not evals:
        return
    last = evals[-1]
    print(f"\nHeld-out evaluation at step {last['step']}:")
    for k, v in last.items():
        if k.startswith("eval/"):
            print(f"  {k:24s} {describe(v, specs.get(k[len('eval/'):]))}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
