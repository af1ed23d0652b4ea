"""Tests of `colearn_jax.data.prefetch.device_prefetch`: order, exact resume, errors, clean stop."""
import threading
import time

import grain
import jax
import numpy as np
import pytest

from colearn_jax import sharding
from colearn_jax.data import prefetch


def _grain_iterator(seed=3, num_threads=0):
    """A small shuffled, randomly augmented grain pipeline (a real DatasetIterator with state)."""
    ds = grain.MapDataset.range(50).seed(seed).shuffle().repeat()
    ds = ds.random_map(lambda i, rng: {"x": np.full((2,), i, np.int32),
                                       "noise": rng.standard_normal(3).astype(np.float32)})
    ds = ds.batch(8, drop_remainder=True)  # divisible by the 8 simulated devices
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)))


def _to_host(batch):
    return jax.tree.map(np.asarray, batch)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "device_prefetch"]


class _Counter:
    """A finite iterator with get_state/set_state; `fail_at` raises at that index."""

    def __init__(self, n=6, fail_at=None):
        self.i, self.n, self.fail_at = 0, n, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"bad record {self.i}")
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return self.i - 1

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_yields_placed_batches_in_order_and_stops():
    with prefetch.device_prefetch(_Counter(6), lambda x: ("placed", x), buffer_size=2) as it:
        assert list(it) == [("placed", i) for i in range(6)]
        assert it.get_state() == {"i": 6}
        with pytest.raises(StopIteration):
            next(it)
    assert not _prefetch_threads()


def test_places_on_the_mesh_ahead_and_resumes_exactly():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    rules = sharding.get_rules("dp")
    place = lambda b: sharding.shard_batch(b, mesh, rules)  # noqa: E731
    reference = _grain_iterator()
    expected = [next(reference) for _ in range(12)]

    it = prefetch.device_prefetch(_grain_iterator(), place, buffer_size=3)
    initial = it.get_state()
    taken = [next(it) for _ in range(5)]
    for batch in taken:
        assert isinstance(batch["x"], jax.Array) and batch["x"].sharding == sharding.batch_sharding(mesh, rules)
    # The producer runs ahead; the prefetcher's state must still be that of the 5th batch.
    _wait_until(lambda: it._queue.full())
    assert it._iterator.get_state() != it.get_state()
    saved = it.get_state()
    assert saved != initial
    it.close()
    assert not _prefetch_threads()

    fresh = _grain_iterator()
    fresh.set_state(saved)
    with prefetch.device_prefetch(fresh, place, buffer_size=3) as resumed:
        rest = [next(resumed) for _ in range(7)]
    for got, want in zip(taken + rest, expected):
        _assert_same(_to_host(got), want)


def test_set_state_on_the_prefetcher_drops_queued_batches():
    reference = _grain_iterator(num_threads=2)
    expected = [next(reference) for _ in range(8)]
    with prefetch.device_prefetch(_grain_iterator(num_threads=2), lambda b: b, buffer_size=2) as it:
        first = [next(it) for _ in range(3)]
        state = it.get_state()
        more = [next(it) for _ in range(4)]
        it.set_state(state)
        again = [next(it) for _ in range(5)]
    for got, want in zip(first + more, expected):
        _assert_same(got, want)
    for got, want in zip(again, expected[3:]):
        _assert_same(got, want)


def test_orbax_checkpoint_of_the_prefetcher_restores_into_a_bare_iterator(tmp_path):
    import orbax.checkpoint as ocp

    reference = _grain_iterator()
    expected = [next(reference) for _ in range(6)]
    it = prefetch.device_prefetch(_grain_iterator(), lambda b: b, buffer_size=2)
    [next(it) for _ in range(4)]
    _wait_until(lambda: it._queue.full())
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        it.close()
        fresh = _grain_iterator()
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(next(fresh), expected[4])
    _assert_same(next(fresh), expected[5])


@pytest.mark.parametrize("where", ["iterator", "place_fn"])
def test_producer_errors_reach_the_consumer_after_earlier_batches(where):
    if where == "iterator":
        source, place = _Counter(10, fail_at=3), (lambda x: x)
    else:
        def place(x):
            if x == 3:
                raise ValueError("bad record 3")
            return x
        source = _Counter(10)
    it = prefetch.device_prefetch(source, place, buffer_size=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad record 3"):
        next(it)
    with pytest.raises(ValueError, match="bad record 3"):  # stays failed
        next(it)
    assert it.get_state() == {"i": 3}
    it.close()
    assert not _prefetch_threads()


def test_close_stops_a_blocked_producer_and_rejects_next():
    endless = iter(_Counter(10**9))
    it = prefetch.device_prefetch(endless, lambda x: x, buffer_size=1)
    next(it)
    _wait_until(lambda: it._queue.full())  # producer now blocked on a full queue
    assert _prefetch_threads()
    it.close()
    it.close()  # idempotent
    assert not _prefetch_threads()
    with pytest.raises(ValueError, match="closed"):
        next(it)


def test_bad_arguments():
    with pytest.raises(ValueError, match="buffer_size"):
        prefetch.device_prefetch(_Counter(), lambda x: x, buffer_size=0)
    with pytest.raises(TypeError, match="place_fn"):
        prefetch.device_prefetch(_Counter(), None)
