"""Device prefetch: place the next batches on the mesh in a background thread, checkpointably.

`device_prefetch(iterator, place_fn, buffer_size=2)` wraps a host-batch iterator (the grain
iterator of `pipeline.make_train_iterator`). A producer thread takes `next(iterator)`, records
`iterator.get_state()` right after it, calls `place_fn(host_batch)` (in the trainer
`sharding.shard_batch(batch, mesh, rules)`, which returns global jax.Arrays sharded over the data
axes) and queues the pair, so the next batch is already on the devices when the step asks for it.

Checkpointing stays exact. The producer runs ahead of the consumer, so the underlying iterator's own
state is up to `buffer_size + 1` batches too far; the prefetcher's `get_state()` instead returns the
state recorded with the last batch the consumer took (before the first one: the state at
construction). It is a `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave(prefetcher)`
(and thus `train.checkpoint.Checkpointer.save`) writes that state in the same format as the bare
grain iterator. Restore by setting the state on a fresh underlying iterator and wrapping it again:

    it = make_train_iterator(...)
    state, it = ckpt.restore(step, abstract_state, it)       # grain set_state on the bare iterator
    with device_prefetch(it, lambda b: sharding.shard_batch(b, mesh, rules)) as batches:
        for step in ...:
            state, metrics = step_fn(state, next(batches))
            ...
            ckpt.save(step, state, batches, config)           # position of the last batch taken

(`prefetcher.set_state(state)` also works: it stops the producer, drops the queued batches, sets the
state on the underlying iterator and starts again.)

Errors raised by the underlying iterator or by `place_fn` are re-raised by `next()` in the
consumer, after the batches produced before them; a finite iterator ends with StopIteration.
`close()` (or leaving the `with` block) stops and joins the thread, so none is left running.
The underlying iterator must only be used through the prefetcher while it is open (grain iterators
are not thread-safe).
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable, Iterator

import grain

_POLL_S = 0.05  # how often a blocked producer checks whether it should stop


class _End:
    """Queue marker: the underlying iterator is exhausted."""


class _Failure:
    """Queue marker: the producer raised `error`."""

    def __init__(self, error: BaseException):
        self.error = error


def _state_of(iterator) -> Any:
    get_state = getattr(iterator, "get_state", None)
    return copy.deepcopy(get_state()) if get_state is not None else None


class DevicePrefetcher(grain.DatasetIterator):
    """Iterator of placed batches, produced `buffer_size` ahead by a background thread.

    See the module docstring for the checkpointing contract. Not thread-safe itself: one consumer.
    """

    def __init__(self, iterator: Iterator, place_fn: Callable[[Any], Any], buffer_size: int = 2):
        super().__init__()
        if int(buffer_size) < 1:
            raise ValueError(f"device_prefetch: buffer_size={buffer_size} must be >= 1.")
        if not callable(place_fn):
            raise TypeError(f"device_prefetch: place_fn must be callable, got {type(place_fn).__name__}.")
        self._iterator = iterator
        self._place_fn = place_fn
        self._buffer_size = int(buffer_size)
        self._state = _state_of(iterator)
        self._failure: BaseException | None = None
        self._exhausted = False
        self._thread: threading.Thread | None = None
        self._start()

    # ------------------------------------------------------------------ producer
    def _start(self):
        self._queue: queue.Queue = queue.Queue(maxsize=self._buffer_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="device_prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Blocks until `item` is queued (True) or a stop is requested (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            while not self._stop.is_set():
                try:
                    host_batch = next(self._iterator)
                except StopIteration:
                    self._put(_End())
                    return
                state = _state_of(self._iterator)
                if not self._put((self._place_fn(host_batch), state)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(e))

    def _stop_producer(self):
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
        self._thread = None

    # ------------------------------------------------------------------ consumer
    def __next__(self):
        self._assert_not_closed()
        if self._failure is not None:
            raise self._failure
        if self._exhausted:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._exhausted = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._failure = item.error
            raise item.error
        batch, self._state = item
        return batch

    def get_state(self) -> Any:
        """The underlying iterator's state as of the last batch returned by `next()`."""
        return copy.deepcopy(self._state)

    def set_state(self, state: Any) -> None:
        """Continues from `state` (as returned by `get_state`): queued batches are dropped."""
        self._assert_not_closed()
        self._stop_producer()
        self._iterator.set_state(state)
        self._state = _state_of(self._iterator)
        self._failure, self._exhausted = None, False
        self._start()

    def close(self) -> None:
        """Stops and joins the producer thread and closes the underlying iterator. Idempotent."""
        if self._closed:
            return
        self._stop_producer()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        super().close()

    def __enter__(self) -> "DevicePrefetcher":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __del__(self):
        try:
            self._stop_producer()
        except Exception:  # noqa: BLE001 - best effort at interpreter shutdown
            pass

    def __str__(self) -> str:
        return f"DevicePrefetcher(buffer_size={self._buffer_size})"


def device_prefetch(iterator: Iterator, place_fn: Callable[[Any], Any], buffer_size: int = 2) -> DevicePrefetcher:
    """Wraps `iterator` so that `place_fn(batch)` runs `buffer_size` batches ahead in a thread.

    Returns a `DevicePrefetcher`: iterate it, checkpoint it like the grain iterator it wraps
    (`get_state()` is the position of the last batch taken), and `close()` it or use it as a
    context manager.
    """
    return DevicePrefetcher(iterator, place_fn, buffer_size)
