"""The expert cache under random request streams, against a plain reference LRU."""
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from moe_offload.cache import ExpertCache
from moe_offload.stats import OffloadStats

BLOB = 4096


class InstantLoader:
    """Completes every read at once and stamps the slot with its key, so tests can see contents."""

    def __init__(self):
        self.reads = []

    def submit(self, layer, expert, dest):
        self.reads.append((layer, expert))
        dest[0], dest[1] = layer, expert
        f = Future()
        f.set_result(None)
        return f


class SlowLoader:
    """Reads on two threads and records how many are in flight at once."""

    def __init__(self, delay=0.05):
        self.pool, self.delay = ThreadPoolExecutor(2), delay
        self.reads, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()

    def submit(self, layer, expert, dest):
        self.reads.append((layer, expert))
        return self.pool.submit(self._read, layer, expert, dest)

    def _read(self, layer, expert, dest):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.delay)
        dest[0], dest[1] = layer, expert
        with self.lock:
            self.in_flight -= 1


class ReferenceLRU:
    """The same acquisition order as ExpertCache.stream (resident first, as many pinned as fit), on an
    OrderedDict per pool."""

    def __init__(self, pools, capacity):
        self.pools, self.capacity, self.evicted = {p: OrderedDict() for p in pools}, capacity, []

    def stream(self, pool_key, layer, experts):
        lru = self.pools[pool_key]
        pending = sorted(experts, key=lambda e: (layer, e) not in lru)
        active, pinned = [], set()
        while pending or active:
            while pending:
                key = (layer, pending[0])
                if key in lru:
                    lru.move_to_end(key)
                else:
                    if len(lru) >= self.capacity:
                        victim = next((k for k in lru if k not in pinned), None)
                        if victim is None:
                            break
                        del lru[victim]
                        self.evicted.append(victim)
                    lru[key] = True
                pinned.add(key)
                active.append(pending.pop(0))
            e = active.pop(0)
            pinned.discard((layer, e))
            yield e


requests = st.lists(st.tuples(st.integers(0, 2), st.sets(st.integers(0, 5), min_size=1, max_size=6)),
                    min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(requests=requests, capacity=st.integers(1, 6), scope=st.sampled_from(["layer", "global"]))
def test_cache_matches_reference_lru(requests, capacity, scope):
    layers = [0, 1, 2]
    stats = OffloadStats(3)
    loader = InstantLoader()
    cache = ExpertCache(layers, capacity, BLOB, loader, stats, scope)
    ref = ReferenceLRU(layers if scope == "layer" else [None], capacity)
    total = 0
    for layer, experts in requests:
        experts = sorted(experts)
        got = []
        expected = list(ref.stream(layer if scope == "layer" else None, layer, experts))
        for expert, blob in cache.stream(layer, experts):
            # The slot holds the blob of the expert it was handed out for, and it is pinned.
            assert (int(blob[0]), int(blob[1])) == (layer, expert)
            assert cache.residency[(layer, expert)].pins == 1
            got.append(expert)
            cache.check_invariants()
        assert got == expected
        total += len(experts)
    assert cache.evicted == ref.evicted
    assert len(cache.residency) <= stats.cache_slots
    for pool in cache.pools.values():
        assert sum(s.pins for s in pool.slots) == 0
    # Statistics add up: every request is a hit or a miss, every miss is one read.
    assert sum(stats.hits) + sum(stats.misses) == total
    assert sum(stats.misses) == len(loader.reads)


@settings(max_examples=60, deadline=None)
@given(requests=requests, capacity=st.integers(1, 4), guesses=st.lists(st.sets(st.integers(0, 5)), min_size=40,
                                                                       max_size=40))
def test_pinned_experts_survive_prefetch_pressure(requests, capacity, guesses):
    stats = OffloadStats(3)
    loader = InstantLoader()
    cache = ExpertCache([0, 1, 2], capacity, BLOB, loader, stats, "global")
    for (layer, experts), guess in zip(requests, guesses):
        for expert, blob in cache.stream(layer, sorted(experts)):
            cache.prefetch(layer, guess)  # tries to evict while `expert` is in use
            assert (layer, expert) in cache.residency
            assert (int(blob[0]), int(blob[1])) == (layer, expert)
            cache.check_invariants()
    assert sum(stats.misses) + stats.prefetch_loads == len(loader.reads)


def test_smallest_cache_runs_a_layer_needing_every_expert():
    stats = OffloadStats(1)
    cache = ExpertCache([0], 1, BLOB, InstantLoader(), stats)
    assert [e for e, _ in cache.stream(0, range(6))] == list(range(6))


def test_misses_of_one_layer_load_in_parallel():
    loader = SlowLoader(0.1)
    stats = OffloadStats(1)
    cache = ExpertCache([0], 4, BLOB, loader, stats)
    got = [e for e, _ in cache.stream(0, [0, 1, 2, 3])]
    assert sorted(got) == [0, 1, 2, 3]
    assert loader.max_in_flight == 2  # both loader threads busy at once
    assert stats.stall_seconds > 0


def test_request_for_an_expert_being_prefetched_coalesces():
    loader = SlowLoader(0.1)
    stats = OffloadStats(1)
    cache = ExpertCache([0], 2, BLOB, loader, stats)
    assert cache.prefetch(0, [3]) == 1
    got = [(e, int(b[1])) for e, b in cache.stream(0, [3])]
    assert got == [(3, 3)]
    assert loader.reads == [(0, 3)]  # one read served both
    assert stats.hits[0] == 1 and stats.misses[0] == 0


def test_failed_load_is_forgotten_and_raised():
    class Failing(InstantLoader):
        def submit(self, layer, expert, dest):
            f = Future()
            f.set_exception(OSError("disk gone"))
            return f

    cache = ExpertCache([0], 2, BLOB, Failing(), OffloadStats(1))
    try:
        list(cache.stream(0, [1]))
    except OSError as e:
        assert "disk gone" in str(e)
    else:
        raise AssertionError("the failed read was not raised")
    assert not cache.residency
    cache.check_invariants()


def test_a_guess_never_evicts_the_experts_of_the_latest_step():
    stats = OffloadStats(1)
    loader = InstantLoader()
    cache = ExpertCache([0], 2, BLOB, loader, stats)
    list(cache.stream(0, [1, 2]))  # the pool now holds exactly the latest step's experts
    assert cache.prefetch(0, [5]) == 0  # nothing may be evicted for a guess
    assert cache.contains(0, 1) and cache.contains(0, 2)
    list(cache.stream(0, [1]))  # expert 2 was not used by the latest step any more
    assert cache.prefetch(0, [5]) == 1
    assert cache.contains(0, 5) and cache.contains(0, 1) and not cache.contains(0, 2)


def test_forget_frees_a_layers_slots():
    stats = OffloadStats(2)
    loader = InstantLoader()
    cache = ExpertCache([0, 1], 3, BLOB, loader, stats, "global")  # one pool of 3 slots
    list(cache.stream(0, [1, 2]))
    list(cache.stream(1, [3]))
    assert cache.forget(0) == 2
    assert cache.resident() == [(1, 3)]
    list(cache.stream(0, [1]))
    assert stats.misses[0] == 3  # read again
    cache.check_invariants()


def _state(cache, stats):
    return ([list(p.lru) for p in cache.pools.values()], dict(cache.uses), [dict(p.last_step) for p in cache.pools.values()],
            list(stats.hits), list(stats.misses), stats.prefetch_useful, [s.pins for p in cache.pools.values() for s in p.slots])


@settings(max_examples=100, deadline=None)
@given(requests=requests, capacity=st.integers(3, 6), guesses=st.lists(st.sets(st.integers(0, 5), max_size=2),
                                                                       min_size=40, max_size=40))
def test_pin_resident_keeps_the_books_of_stream(requests, capacity, guesses):
    """pin_resident (the decode shortcut for a step whose experts are all in the cache) must leave the
    cache and its statistics exactly as stream(hold=True) would, and refuse (changing nothing) when any
    expert is missing."""
    caches = []
    for _ in range(2):
        stats = OffloadStats(3)
        caches.append((ExpertCache([0, 1, 2], capacity, BLOB, InstantLoader(), stats, "layer"), stats))
    (fast, fast_stats), (plain, plain_stats) = caches
    for (layer, experts), guess in zip(requests, guesses):
        experts = sorted(experts)[:capacity]
        for cache in (fast, plain):
            cache.prefetch(layer, sorted(guess))  # speculative slots: pin_resident must credit them
        before = _state(fast, fast_stats)
        slots = fast.pin_resident(layer, experts)
        if slots is None:
            assert any((layer, e) not in fast.residency for e in experts)
            assert _state(fast, fast_stats) == before
            stream = fast.stream(layer, experts, hold=True)
            got = [next(stream) for _ in experts]
            stream.close()
        else:
            assert [s.pins for s in slots] == [1] * len(experts)
            assert all(int(s.views[1]) == e for s, e in zip(slots, experts))
            fast.unpin(slots)
        stream = plain.stream(layer, experts, hold=True)
        got = [next(stream) for _ in experts]
        stream.close()
        assert sorted(e for e, _ in got) == experts
        assert _state(fast, fast_stats) == _state(plain, plain_stats)
        fast.check_invariants()


def test_fill_reads_into_free_slots_only_and_never_evicts():
    stats = OffloadStats(2)
    loader = InstantLoader()
    cache = ExpertCache([0, 1], 3, BLOB, loader, stats, "layer")
    list(cache.stream(0, [4]))
    reads = cache.fill(0, range(6)) + cache.fill(1, [0, 1])
    assert len(reads) == 4 and all(r.done() for r in reads)
    assert sorted(cache.resident()) == [(0, 0), (0, 1), (0, 4), (1, 0), (1, 1)]  # expert 4 kept, 2-5 found no slot
    assert loader.reads == [(0, 4), (0, 0), (0, 1), (1, 0), (1, 1)]
    assert cache.fill(0, range(6)) == [] and stats.evictions == 0  # the pool is full: nothing read, none evicted
    for layer, expert in cache.resident():  # each slot holds what was read into it
        views = cache.residency[(layer, expert)].buffer
        assert (int(views[0]), int(views[1])) == (layer, expert)
    cache.check_invariants()
    list(cache.stream(0, [1, 4]))
    assert stats.misses[0] == 1 and stats.hits[0] == 2  # filled experts are hits on their first use
