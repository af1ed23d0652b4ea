"""Test set-up: 8 simulated CPU devices and the host allocator (set before jax is imported), fixtures."""
import os

from colearn_jax import cpu_devices  # noqa: E402  (imports no JAX)

cpu_devices.simulate(8)  # with collective timeouts that survive a loaded CI runner (see its docstring)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", ".tfds_test_cache"))

from colearn_jax import host_memory  # noqa: E402

host_memory.configure_allocator()  # before JAX starts (see its docstring); no page faults per step

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One program at a time on the 8 simulated devices: their threads never interleave two programs'
# collectives (see colearn_jax/cpu_devices.py).
jax.config.update("jax_cpu_enable_async_dispatch", False)
