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

That deadlock is real, not a slow thread (stop 14, stack dumps with py-spy / gdb): the 8 device threads
wait in *different* rendezvous — some in an AllGather, some in an AllReduce inside a WhileThunk — because
XLA:CPU's thunk executor may run independent collectives in either order on different devices. Looping
tests/test_sharding.py's BatchNorm FSDP step reproduces it within 8-21 steps (5 of 5 runs).
`--xla_cpu_enable_concurrency_optimized_scheduler=false` removes that one (300 and 500 steps clean) but
creates another: the cube-mesh ring-loss step (`gather="ring"`, fsdp_tp) then deadlocks, which it does
not without the flag (60 steps clean, twice). No process-wide flag found fixes both, so none is set;
a fix would give the BatchNorm case its own process with the flag.
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
             f"--xla_cpu_collective_timeout_seconds={COLLECTIVE_TIMEOUT_S}"]
    os.environ["XLA_FLAGS"] = " ".join([flags] + [f for f in extra if f.split("=")[0] not in flags]).strip()


def _backend_started() -> bool:
    """XLA reads XLA_FLAGS when JAX creates its first backend, not at `import jax`."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415

    return xla_bridge.backends_are_initialized()
