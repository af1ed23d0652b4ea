"""Simulated CPU devices: the XLA flags that split one host into N devices, set before JAX starts.

`--xla_force_host_platform_device_count=N` runs every device's program on its own thread; the
collectives between them (all-gather, psum, ppermute) meet at a rendezvous. XLA:CPU aborts the whole
process (SIGABRT, "Termination timeout ... exceeded") when one participant arrives more than a fixed
time after the others. Eight device threads on a busy 2-core machine can be that late, so a run (or
the test suite) died mid-way with exit code 134 on a loaded CI runner although nothing was wrong:
`tests/test_sharding.py`'s BatchNorm case reproduces it here with four busy loops beside it and the
timeout at 1 s, and passes with the same load and the timeouts below. Simulated devices are for
correctness and memory studies, never timing, so a late thread is waited for instead — up to
`COLLECTIVE_TIMEOUT_S`, not forever: the same test was once seen *deadlocked* on an idle machine
(every device thread asleep in a rendezvous), and a deadlock should end in a clear abort within
minutes, not hang a CI job until its wall-clock limit. Tests also dispatch synchronously
(`jax_cpu_enable_async_dispatch=False`, tests/conftest.py), so no two programs' device threads interleave.

That deadlock is real, not a slow thread, and its cause is *thread starvation*. Every device's program
runs on worker threads of one client-wide pool, sized by default to the host's cores (2 on the CI
runner), and a device that waits in a rendezvous keeps its thread blocked; XLA:CPU's thunk executor may
also run a device's independent collectives side by side, each holding a thread (stack dumps of
tests/test_sharding.py's BatchNorm FSDP step, stop 14-15: device 0 waited in two all-gathers and an
all-reduce at once while devices 1, 3, 5, 7 waited in none — they had no thread left to reach them).
Looping that step deadlocks within 1-21 steps (7 of 7 runs) with the default pool and with
`PJRT_NPROC=8`, and runs clean with `PJRT_NPROC=16` (150 steps) and 32 (80 + 300 steps; the cube-mesh
ring-loss step too, 100 steps, even with the concurrency-optimized scheduler off, which had deadlocked it).
So `simulate` gives the pool `THREADS_PER_DEVICE` threads per simulated device (XLA reads `PJRT_NPROC`,
the pool size, when the backend starts); idle threads cost nothing (the tiny CLIP step on 8 devices: 39 ms
either way), and a value already in the environment is kept. One cost: with the larger pool glibc hands
XLA's scratch buffer back more often, so `host_memory`'s reuse holds in fewer calls (tests/test_host_memory.py
probes one device with the default pool) - simulated devices are for correctness and memory, not timing.
"""
from __future__ import annotations

import os
import sys

# Seconds a rendezvous waits for a late device thread before XLA:CPU aborts the process (XLA's default: 40).
COLLECTIVE_TIMEOUT_S = 600
# Worker threads per simulated device in XLA's CPU client pool (`PJRT_NPROC`); 1 deadlocks, 2 did not.
THREADS_PER_DEVICE = 4


def simulate(num_devices: int) -> None:
    """Makes JAX (started after this call) see `num_devices` CPU devices, with patient collectives and enough
    worker threads that a device waiting in a collective never starves the others (see the module docstring)."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    flags = os.environ.get("XLA_FLAGS", "")
    if _backend_started() and f"--xla_force_host_platform_device_count={num_devices}" not in flags:
        raise RuntimeError("Simulated CPU devices must be set before JAX starts its backend (before the "
                           "first jax.devices(), array or jit).")
    extra = [f"--xla_force_host_platform_device_count={num_devices}",
             f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TIMEOUT_S}",
             f"--xla_cpu_collective_timeout_seconds={COLLECTIVE_TIMEOUT_S}"]
    os.environ["XLA_FLAGS"] = " ".join([flags] + [f for f in extra if f.split("=")[0] not in flags]).strip()
    os.environ.setdefault("PJRT_NPROC", str(max(os.cpu_count() or 1, THREADS_PER_DEVICE * num_devices)))


def _backend_started() -> bool:
    """XLA reads XLA_FLAGS when JAX creates its first backend, not at `import jax`."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415

    return xla_bridge.backends_are_initialized()
