"""Host allocator settings for XLA:CPU runs: keep each step's scratch memory mapped between steps.

An XLA:CPU executable gets its whole scratch space (every intermediate of a train step: 1.7 GiB for
the small CLIP of `experiments/compare_open_clip.py` at batch 64) as ONE allocation per call, made
with `malloc` on an XLA worker thread. glibc serves a request that large from a fresh `mmap` in a
per-thread arena and returns it with `munmap` when the step ends, so every step page-faults the whole
buffer in again: 434,000 minor faults and 0.85 s of kernel time per 2.5 s step on a 2-core VM.

`configure_allocator()` tells glibc (`mallopt`) to serve every thread from the main heap, never to
use `mmap` for large blocks, and never to trim freed memory off the top of the heap, so the scratch
buffer is recycled by the next step with no faults (the same step: 0 faults, 2.0 s). The price is
that the process keeps its peak heap instead of returning it to the OS, which is what a training
process wants anyway. (A finite trim threshold is not enough: mallopt takes an int, and once the
freed scratch buffer plus its neighbours pass 2 GiB, glibc trims and the next step faults it all in.)

glibc binds each thread to an arena at its first allocation, so this must run before JAX starts its
CPU client (before the first `jax.devices()`, array or jit); afterwards it only affects new threads.
The experiment scripts call it first thing when JAX will run on the CPU. It is a no-op (returns
None) outside glibc, when `COLEARN_JAX_HOST_MALLOC=0`, or — with `only_if_cpu` — when an accelerator
plugin may be used, since a single arena would serialise a GPU/TPU host's input-pipeline threads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
ENV_SWITCH = "COLEARN_JAX_HOST_MALLOC"


def jax_will_use_cpu() -> bool:
    """Best guess, before JAX starts, that its default backend will be the CPU."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)


def configure_allocator(*, only_if_cpu: bool = True) -> dict | None:
    """Applies the settings above; returns them as a dict, or None when nothing was changed.
    (A trim threshold of -1 is glibc's "disables trimming completely".)"""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if only_if_cpu and not jax_will_use_cpu():
        return None
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = {"arena_max": (_M_ARENA_MAX, 1), "mmap_max": (_M_MMAP_MAX, 0), "trim_threshold": (_M_TRIM_THRESHOLD, -1)}
    applied = {}
    for name, (param, value) in settings.items():
        if mallopt(param, value) == 1:  # mallopt returns 1 on success
            applied[name] = value
    return applied or None
