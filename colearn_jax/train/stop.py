"""Graceful stop on SIGTERM / Ctrl-C that every process of a run agrees on.

Signals. The first SIGTERM or SIGINT sets a flag (a second SIGINT interrupts at once). The outermost
active `GracefulStop` owns the handlers; nested ones (the trainer's, inside the one
`experiments/train.py` enters right after `jax.distributed.initialize()`) share its flag, so a signal
that arrives while the step compiles or a checkpoint restores still counts.

Agreement. The loop asks `agreed(step)` after every step. With one process the answer is the flag.
With several, every `sync_every` steps the processes exchange their flags (an all-gather,
`process_allgather`) and all stop if any was signalled, so they save the same checkpoint step (a
collective) and none waits forever for the others; between exchanges the answer is False everywhere.
The exchange waits for the step in flight (a host-device sync): raise `train.stop_sync_every` when
that costs throughput; a stop then lands up to that many steps later.

JAX's own SIGTERM handler. `jax.distributed.initialize()` starts a preemption sync manager whose
notifier installs a C-level SIGTERM handler (TSL's `SigtermNotifier`, via `std::signal`): SIGTERM then
no longer kills the process; the notice goes through the coordination service to every process, and
`multihost_utils.reached_preemption_sync_point(step)` becomes True at (largest step reported) + 1.
Python's `signal.signal` replaces that handler (`signal.getsignal` still reports SIG_DFL, so leaving
restores the default, not the notifier), so inside a `GracefulStop` our flag, not the notifier, sees
SIGTERM. A notice the notifier did catch (a SIGTERM before the first `GracefulStop`) is honoured too,
but only as one more input to the exchange: the sync point's own answer is not trusted to agree (its
counter is also fed by Orbax's asynchronous saves, and a notice before the first step of a resumed run
sets it to 1, a step that never comes), so acting on it directly could leave one process saving while
the others wait.
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
    _owner: "GracefulStop | None" = None  # the outermost active instance: it holds the handlers and the flag

    def __init__(self, sync_every: int = 1):
        self._requested = False  # this process received a signal (on the owner)
        self._preempted = False  # JAX's preemption sync point was reached (a notice its notifier caught)
        self.sync_every = max(1, int(sync_every))
        self._previous = {}
        self._outer: GracefulStop | None = None

    @property
    def requested(self) -> bool:
        """This process received SIGTERM or SIGINT while a GracefulStop was active."""
        return self._outer.requested if self._outer is not None else self._requested

    def _handle(self, signum, frame):
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested = True
        log.warning("Received %s: saving a checkpoint after this step, then stopping.", signal.Signals(signum).name)

    def agreed(self, step: int) -> bool:
        """True on every process at the same step once any process was asked to stop."""
        if jax.process_count() == 1:
            return self.requested
        if not self._preempted and _preemption_sync_point(step):
            log.warning("JAX preemption sync point reached at step %d: stopping at the next agreement.", step)
            self._preempted = True
        if step % self.sync_every:
            return False
        return _any_process(self.requested or self._preempted)

    def __enter__(self):
        if GracefulStop._owner is not None:
            self._outer = GracefulStop._owner
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        GracefulStop._owner = self
        return self

    def __exit__(self, *exc):
        if self._outer is not None:
            self._outer = None
            return False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        GracefulStop._owner = None
        return False


def stop_requested() -> bool:
    """Whether this process was signalled while a GracefulStop is active (for hooks and long evals)."""
    owner = GracefulStop._owner
    return owner is not None and owner.requested
