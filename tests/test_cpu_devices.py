"""`colearn_jax.cpu_devices.simulate`: N devices with the patient collective timeouts and collectives in
program order, and a clear error once JAX's backend has started (the flags would be ignored silently)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import os
from colearn_jax import cpu_devices
import jax  # importing is fine: XLA reads its flags when the backend starts
cpu_devices.simulate(3)
flags = os.environ["XLA_FLAGS"]
assert "--xla_cpu_collective_call_terminate_timeout_seconds=600" in flags, flags
assert "--xla_cpu_collective_timeout_seconds=600" in flags, flags
assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags, flags
print(len(jax.devices()), jax.jit(lambda x: x + 1)(1))
try:
    cpu_devices.simulate(5)
except RuntimeError as e:
    print("refused:", e)
"""


def test_simulate_sets_devices_and_timeouts_and_refuses_after_start():
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "3 2"
    assert lines[1].startswith("refused:") and "before JAX starts its backend" in lines[1]


DEADLOCK_SCRIPT = """
import os
from colearn_jax import cpu_devices
cpu_devices.simulate(8)
os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace("seconds=600", "seconds=30")  # abort fast, not hang
import jax
from tests.helpers import synthetic_clip_batch
from tests.test_sharding import CUBE, _config
from colearn_jax.train.program import TrainProgram
config = _config("fsdp", CUBE, resnet=True)
program = TrainProgram.build(config)
state = program.init_state()
batch = program.place_batch(synthetic_clip_batch(config, seed=1))
for _ in range(60):
    state, _ = program.step(state, batch)
    jax.device_get(state.model_state)
print("60 steps")
"""


def test_collectives_in_independent_branches_do_not_deadlock():
    """The deadlock `simulate` prevents: CLIP with a BatchNorm ResNet tower beside a scanned text tower,
    FSDP on the 2x2x2 mesh. With XLA's concurrency-optimized scheduler on, this loop deadlocked (then
    aborted at the rendezvous timeout) within 8-21 steps in each of 5 runs."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", DEADLOCK_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("60 steps")
