"""Test driver for tests/test_multihost.py: runs `experiments/train.py` — its flags, its `main`, its
`--multihost` start-up — in this process, with one optional pause for a signal from outside.

    python tests/multihost_worker.py --config=configs/clip.py:tiny --workdir=... --multihost \
        --coordinator_address=localhost:PORT --num_processes=2 --process_id=1 --num_cpu_devices=4

$COLEARN_TEST_PAUSE_AT_STEP=k: after train step k (k=0: before `train()` starts, i.e. during start-up,
after `jax.distributed.initialize()`) this process creates $COLEARN_TEST_PAUSE_MARKER and waits (up to
$COLEARN_TEST_PAUSE_TIMEOUT seconds, default 300) until SIGTERM or Ctrl-C has reached it. The test
sends the signal from another process while this one sits at a known point, so where the run must stop
does not depend on the machine's speed. The other processes are not paused: they block in their next
collective until this one goes on.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def _wait_for_signal(where: str):
    from colearn_jax.train.stop import stop_requested  # noqa: PLC0415

    with open(os.environ["COLEARN_TEST_PAUSE_MARKER"], "w") as f:
        f.write(where)
    timeout = float(os.environ.get("COLEARN_TEST_PAUSE_TIMEOUT", "300"))
    deadline = time.monotonic() + timeout
    while not stop_requested():
        if time.monotonic() > deadline:
            raise TimeoutError(f"multihost_worker: no SIGTERM/SIGINT seen within {timeout:.0f} s ({where}).")
        time.sleep(0.02)


def main():
    from absl import app  # noqa: PLC0415

    import train as train_cli  # noqa: PLC0415 (experiments/train.py: defines its flags)
    from colearn_jax.train import loop  # noqa: PLC0415

    if "COLEARN_TEST_PAUSE_AT_STEP" in os.environ:
        pause_at = int(os.environ["COLEARN_TEST_PAUSE_AT_STEP"])
        real_train = loop.train

        def hook(step, state):
            if step == pause_at:
                _wait_for_signal(f"after step {step}")

        def train(config, workdir, *, hooks=(), **kw):
            if pause_at == 0:
                _wait_for_signal("before train()")
            return real_train(config, workdir, hooks=[*hooks, hook], **kw)

        loop.train = train
    app.run(train_cli.main)


if __name__ == "__main__":
    main()
