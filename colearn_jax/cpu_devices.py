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

That deadlock is real and not a slow thread: XLA:CPU's *concurrency-optimized* HLO scheduler (on by
default) lets a device run independent collectives in either order — in the BatchNorm case, the ResNet
tower's statistics all-reduce beside the scanned text tower's FSDP all-gathers — so two device threads
can each wait in a different rendezvous for the other, forever (seen in stack dumps: devices split
between an AllGather and an AllReduce inside a WhileThunk). A repro (8 simulated devices,
that test's FSDP train step in a loop) deadlocked within 8-21 steps in each of 5 runs; with
`--xla_cpu_enable_concurrency_optimized_scheduler=false` it ran 300 and 500 steps clean. So simulated
devices turn that scheduler off (a CPU-only flag; it does not touch GPU or TPU compilation).
"""
from __future__ import annotations

import os
import sys

# Seconds a rendezvous waits for a late device thread before XLA:CPU aborts the process (XLA's default: 40).
COLLECTIVE_TIMEOUT_S = 600


def simulate(num_devices: int) -> None:
    """Makes JAX (started after this call) see `num_devices` CPU devices, with patient collectives."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    flags = os.environ.get("XLA_FLAGS", "")
    if _backend_started() and f"--xla_force_host_platform_device_count={num_devices}" not in flags:
        raise RuntimeError("Simulated CPU devices must be set before JAX starts its backend (before the "
                           "first jax.devices(), array or jit).")
    extra = [f"--xla_force_host_platform_device_count={num_devices}",
             f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TIMEOUT_S}",
             f"--xla_cpu_collective_timeout_seconds={COLLECTIVE_TIMEOUT_S}",
             "--xla_cpu_enable_concurrency_optimized_scheduler=false"]  # collectives in program order
    os.environ["XLA_FLAGS"] = " ".join([flags] + [f for f in extra if f.split("=")[0] not in flags]).strip()


def _backend_started() -> bool:
    """XLA reads XLA_FLAGS when JAX creates its first backend, not at `import jax`."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415

    return xla_bridge.backends_are_initialized()
