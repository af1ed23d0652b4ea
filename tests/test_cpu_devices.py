"""`colearn_jax.cpu_devices.simulate`: N devices with the patient collective timeouts and enough worker
threads that collectives cannot starve each other (a sharded step looped until it would have deadlocked),
and a clear error once JAX's backend has started (the flags would be ignored silently)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    """This process's environment without the simulated-device settings conftest gave it."""
    env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
    return {**env, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


SCRIPT = """
import os
from colearn_jax import cpu_devices
import jax  # importing is fine: XLA reads its flags when the backend starts
cpu_devices.simulate(3)
flags = os.environ["XLA_FLAGS"]
assert "--xla_cpu_collective_call_terminate_timeout_seconds=600" in flags, flags
assert "--xla_cpu_collective_timeout_seconds=600" in flags, flags
assert int(os.environ["PJRT_NPROC"]) >= 4 * 3, os.environ["PJRT_NPROC"]
print(len(jax.devices()), jax.jit(lambda x: x + 1)(1))
try:
    cpu_devices.simulate(5)
except RuntimeError as e:
    print("refused:", e)
"""


def test_simulate_sets_devices_and_timeouts_and_refuses_after_start():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "3 2"
    assert lines[1].startswith("refused:") and "before JAX starts its backend" in lines[1]


STARVATION_SCRIPT = """
import os
from colearn_jax import cpu_devices
cpu_devices.simulate(8)
os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace("seconds=600", "seconds=60")  # abort, never hang
import jax
jax.config.update("jax_cpu_enable_async_dispatch", False)
from tests.helpers import synthetic_clip_batch
from tests.test_sharding import CUBE, _config
from colearn_jax.train.program import TrainProgram
config = _config("fsdp", CUBE, resnet=True)
program = TrainProgram.build(config)
state = program.init_state()
batch = program.place_batch(synthetic_clip_batch(config, seed=1))
for _ in range(STEPS):
    state, metrics = program.step(state, batch)
    float(metrics["loss"])
print(STEPS, "steps")
"""


def test_collectives_do_not_starve_each_other_of_threads():
    """CLIP with a BatchNorm ResNet tower beside a scanned text tower, FSDP on the 2x2x2 mesh: each device
    runs independent all-gathers and all-reduces side by side. With XLA's default pool (the host's cores)
    or `PJRT_NPROC=8`, this loop deadlocked within 1-21 steps in 7 of 7 runs on the 2-core machine (then
    aborted at the rendezvous timeout); with the threads `simulate` gives it, it runs to the end."""
    script = STARVATION_SCRIPT.replace("STEPS", "40")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(),
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("40 steps")
