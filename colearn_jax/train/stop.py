"""Graceful stop on SIGTERM / Ctrl-C that every process of a run agrees on.

The first SIGTERM or SIGINT sets a local flag (a second SIGINT interrupts at once). The loop asks
`agreed(step)` after every step; the answer is the same on every process, so all of them save the
checkpoint (a collective) at the same step and none waits forever for the others:
  * one process: the local flag;
  * several: JAX's preemption sync point (Orbax's preemption support: the coordination service
    relays a preemption notice to every task and picks a common step), or, every `sync_every`
    steps, a max-reduction of the local flags across processes (`process_allgather`), which covers
    a SIGTERM that reaches only one process.
"""
from __future__ import annotations

import contextlib
import logging
import signal

import jax
import numpy as np

log = logging.getLogger("colearn_jax")


def _preemption_sync_point(step: int) -> bool:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except (RuntimeError, AttributeError):  # no preemption sync manager in this runtime
        return False


def _any_process(flag: bool) -> bool:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


class GracefulStop(contextlib.AbstractContextManager):
    def __init__(self, sync_every: int = 1):
        self.requested = False  # this process received a signal
        self.sync_every = max(1, int(sync_every))
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Received %s: saving a checkpoint after this step, then stopping.", signal.Signals(signum).name)

    def agreed(self, step: int) -> bool:
        """True on every process at the same step once any process was asked to stop."""
        if jax.process_count() == 1:
            return self.requested
        if _preemption_sync_point(step):
            return True
        if step % self.sync_every:
            return False
        return _any_process(self.requested)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
