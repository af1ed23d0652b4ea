"""`colearn_jax.cpu_devices.simulate`: N devices with the patient collective timeouts, and a clear error
once JAX's backend has started (the flags would be ignored silently)."""
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
