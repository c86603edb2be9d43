"""The expert cache: preallocated slots, residency, LRU or LFU eviction, pinning, coalesced loads.

Slots are carved from one page-aligned buffer sized by the budget. Each pool (one per MoE layer,
or one global pool) keeps its resident experts in LRU order. The victim is the least recently
used evictable expert, or with policy "lfu" the least often requested one since loading began
(counts survive eviction; ties go to the least recently used): on a trained model's routing some
experts stay popular for long stretches, which recency alone forgets (README, "Cache policies"). An expert being computed is pinned
and cannot be evicted; an expert still loading cannot be evicted either; a second request for an
expert already loading waits on the same read instead of starting another.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Callable, Iterator

import torch

from .loader import aligned_buffer
from .stats import OffloadStats

Key = tuple[int, int]  # (layer, expert)


class Slot:
    __slots__ = ("index", "buffer", "views", "key", "pins", "future", "speculative")

    def __init__(self, index: int, buffer: torch.Tensor, views):
        self.index, self.buffer, self.views = index, buffer, views
        self.key: Key | None = None
        self.pins = 0
        self.future: Future | None = None
        self.speculative = False  # loaded by a guess and not used yet

    def loading(self) -> bool:
        return self.future is not None and not self.future.done()

    def evictable(self) -> bool:
        return self.pins == 0 and not self.loading()


class Pool:
    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self.free = list(reversed(slots))
        self.lru: OrderedDict[Key, Slot] = OrderedDict()  # oldest first
        self.last_step: dict[int, set[Key]] = {}  # layer -> the experts its latest step used


class ExpertCache:
    def __init__(self, layers: list[int], slots_per_pool: int, blob_size: int, loader,
                 stats: OffloadStats, scope: str = "layer", make_views: Callable | None = None,
                 policy: str = "lru", allocate: Callable[[int], torch.Tensor] = aligned_buffer):
        self.loader, self.stats, self.scope, self.policy = loader, stats, scope, policy
        self.uses: dict[Key, int] = {}  # requests per expert since the cache was made (policy "lfu")
        pool_keys = layers if scope == "layer" else [None]
        total = slots_per_pool * len(pool_keys)
        self.buffer = allocate(total * blob_size)  # the whole budget, allocated once (in VRAM on a GPU)
        slots = [Slot(i, self.buffer[i * blob_size:(i + 1) * blob_size], None) for i in range(total)]
        for s in slots:
            s.views = make_views(s.buffer) if make_views else s.buffer
        self.pools = {k: Pool(slots[i * slots_per_pool:(i + 1) * slots_per_pool]) for i, k in enumerate(pool_keys)}
        self.residency: dict[Key, Slot] = {}
        self.lock = threading.Lock()
        self.changes = 0  # counts every slot taken, loaded or freed: a residency snapshot is current while equal
        self.evicted: list[Key] = []  # eviction order, kept short; tests compare it with a reference LRU
        stats.cache_slots = total
        stats.resident = lambda: len(self.residency)
        # A tier below with room of its own (tiers.HostCache): guesses no slot here can take go there.
        self.warm_below = getattr(loader, "warm", None)

    def pool(self, layer: int) -> Pool:
        return self.pools[layer if self.scope == "layer" else None]

    # ------------------------------------------------------------ internals (call with the lock held)

    def _claim(self, pool: Pool, keep: set[Key] = frozenset()) -> Slot | None:
        """A free slot, else the least recently used evictable one not in `keep`; None if every slot
        is busy."""
        if pool.free:
            return pool.free.pop()
        victim = self._lfu_victim(pool, keep) if self.policy == "lfu" else None
        for key, slot in pool.lru.items():
            if slot.evictable() and key not in keep and (victim is None or key == victim):
                del pool.lru[key]
                del self.residency[key]
                self.changes += 1
                self.evicted.append(key)
                if len(self.evicted) > 4096:
                    del self.evicted[:2048]
                self.stats.evictions += 1
                slot.key = slot.future = None
                return slot
        return None

    def _lfu_victim(self, pool: Pool, keep: set[Key]) -> Key | None:
        """The least requested evictable expert, the least recently used of equals; None if none."""
        best, fewest = None, None
        for key, slot in pool.lru.items():  # oldest first: a strict < keeps the oldest of equals
            if slot.evictable() and key not in keep:
                uses = self.uses.get(key, 0)
                if fewest is None or uses < fewest:
                    best, fewest = key, uses
        return best

    def _load(self, pool: Pool, slot: Slot, key: Key, speculative: bool = False) -> None:
        slot.key, slot.speculative = key, speculative
        slot.future = self.loader.submit(key[0], key[1], slot.buffer)
        self.residency[key] = slot
        self.changes += 1
        pool.lru[key] = slot

    def _drop(self, slot: Slot) -> None:
        """Forget a slot whose load failed, so a later request reads the blob again."""
        pool = self.pool(slot.key[0])
        self.residency.pop(slot.key, None)
        pool.lru.pop(slot.key, None)
        self.changes += 1
        slot.key = slot.future = None
        slot.pins = 0
        pool.free.append(slot)

    # ------------------------------------------------------------ public

    def contains(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.residency

    def prefetch(self, layer: int, experts) -> int:
        """Start loading guessed experts that are not resident. A guess never evicts an expert that
        is pinned, loading, or was used by the layer's latest step: routing repeats from token to
        token, so those are the likeliest to be needed, and a wrong guess that evicted one would cost
        two reads instead of one (measured: at a budget of top-k experts per layer that made
        speculation read 2.6x the bytes of plain LRU). Returns how many reads started."""
        started = 0
        pool = self.pool(layer)
        with self.lock:
            keep = pool.last_step.get(layer, set())
            for e in experts:
                key = (layer, int(e))
                if key in self.residency:
                    continue
                slot = self._claim(pool, keep)
                if slot is None:
                    if self.warm_below is not None:  # the rest of the guess fills the host tier only
                        left = [e for e in experts if (layer, int(e)) not in self.residency]
                        self.warm_below(layer, left)
                    break
                self._load(pool, slot, key, speculative=True)
                # A guess enters at the old end of the LRU order: if wrong, it is the next to go
                # instead of pushing out experts that are being reused; if right, its use promotes it.
                pool.lru.move_to_end(key, last=False)
                started += 1
        if started:
            self.stats.add(prefetch_loads=started)
        return started

    def fill(self, layer: int, experts) -> list[Future]:
        """Start reading the given experts of a layer into free slots, never evicting one (a cache
        filled before its first use); returns the reads' futures."""
        pool, futures = self.pool(layer), []
        with self.lock:
            for e in experts:
                key = (layer, int(e))
                if key in self.residency or not pool.free:
                    continue
                slot = pool.free.pop()
                self._load(pool, slot, key)
                futures.append(slot.future)
        return futures

    def stream(self, layer: int, experts, hold: bool = False) -> Iterator[tuple[int, object]]:
        """Yield (expert, slot views) for every requested expert, resident ones first, misses as
        their reads complete. Each expert stays pinned until the caller asks for the next one, so
        a layer needing more experts than its pool holds still runs, a few at a time. With `hold`,
        every yielded expert stays pinned until the generator is closed (one call computing all
        of them; the pool must hold that many, which the minimum cache size guarantees at decode)."""
        held: list[Slot] = []
        pool = self.pool(layer)
        with self.lock:
            pending = sorted((int(e) for e in experts), key=lambda e: (layer, e) not in self.residency)
            pool.last_step[layer] = {(layer, e) for e in pending}
            for e in pending:
                self.uses[(layer, e)] = self.uses.get((layer, e), 0) + 1
        active: list[tuple[int, Slot]] = []
        try:
            while pending or active:
                with self.lock:
                    while pending:
                        key = (layer, pending[0])
                        slot = self.residency.get(key)
                        if slot is not None:
                            pool.lru.move_to_end(key)
                            self.stats.record_access(layer, hit=True)
                            if slot.speculative:
                                slot.speculative = False
                                self.stats.prefetch_useful += 1
                        else:
                            slot = self._claim(pool)
                            if slot is None:
                                break  # every slot is pinned or loading: compute, then come back
                            self._load(pool, slot, key)
                            self.stats.record_access(layer, hit=False)
                        slot.pins += 1
                        active.append((pending.pop(0), slot))
                if not active:  # only other loads (prefetches) hold the pool: wait for one
                    loading = [s.future for s in pool.slots if s.loading()]
                    if not loading:
                        raise RuntimeError(f"no cache slot can be freed for layer {layer}")
                    self._wait(loading)
                    continue
                ready = next((a for a in active if not a[1].loading()), None)
                if ready is None:
                    self._wait([s.future for _, s in active])
                    continue
                active.remove(ready)
                expert, slot = ready
                if slot.future is not None and slot.future.exception() is not None:
                    error = slot.future.exception()
                    with self.lock:
                        self._drop(slot)
                    raise error
                try:
                    yield expert, slot.views
                finally:
                    if hold:
                        held.append(slot)
                    else:
                        with self.lock:
                            slot.pins -= 1
        finally:
            with self.lock:
                for _, slot in active:
                    slot.pins -= 1
                for slot in held:
                    slot.pins -= 1

    def pin_resident(self, layer: int, experts: list[int]) -> list[Slot] | None:
        """stream(layer, experts, hold=True) for a step whose experts are all resident and loaded,
        without the generator (a decode step of a warm cache costs ~20 us less a layer): the same
        bookkeeping (hit counts, LRU order, prefetch credit, last step, uses), every slot pinned
        until unpin(). None, with nothing changed, if any expert is missing, loading or failed."""
        with self.lock:
            slots = self.loaded_slots(layer, experts)
            if slots is not None:
                self.record_hits(layer, experts, slots)
                for slot in slots:
                    slot.pins += 1
        return slots

    def loaded_slots(self, layer: int, experts) -> list[Slot] | None:
        """(lock held) The slots of `experts` if every one is resident and loaded, else None."""
        slots = []
        for e in experts:
            slot = self.residency.get((layer, e))
            if slot is None:
                return None
            if slot.future is not None:
                if not slot.future.done() or slot.future.exception():
                    return None
                slot.future = None  # read and checked: later steps skip the future's locks
            slots.append(slot)
        return slots

    def record_hits(self, layer: int, experts: list[int], slots: list[Slot]) -> None:
        """(lock held) A step's bookkeeping for resident experts: hit counts, LRU order, prefetch
        credit, the layer's last step, uses."""
        self.record_steps_hit([(layer, experts, slots)])

    def record_steps_hit(self, steps: list[tuple[int, list[int], list[Slot]]]) -> None:
        """(lock held) record_hits for several layers' steps, in order: a stacked decode token books
        every layer at once (on a 48-layer, top-8 model, 384 experts a token)."""
        uses, useful = self.uses, 0
        for layer, experts, slots in steps:
            pool = self.pool(layer)
            keys = [(layer, e) for e in experts]
            pool.last_step[layer] = set(keys)
            lru = pool.lru
            for key, slot in zip(keys, slots):
                uses[key] = uses.get(key, 0) + 1
                lru.move_to_end(key)
                if slot.speculative:
                    slot.speculative = False
                    useful += 1
        if useful:
            self.stats.prefetch_useful += useful
        self.stats.record_hits([(layer, len(slots)) for layer, _, slots in steps])

    def unpin(self, slots: list[Slot]) -> None:
        with self.lock:
            for slot in slots:
                slot.pins -= 1

    def _wait(self, futures: list[Future]) -> None:
        if not futures:
            return
        started = time.perf_counter()
        wait(futures, return_when=FIRST_COMPLETED)
        self.stats.add(stall_seconds=time.perf_counter() - started)

    def has_room(self, layer: int) -> bool:
        """Whether a guess for `layer` could start a read now (a free slot, or an evictable one
        outside the layer's latest step). Cheap: the prefetcher asks before computing a guess."""
        pool = self.pool(layer)
        with self.lock:
            if pool.free:
                return True
            keep = pool.last_step.get(layer, set())
            return any(slot.evictable() and key not in keep for key, slot in pool.lru.items())

    def forget(self, layer: int) -> int:
        """Free every evictable slot holding an expert of `layer`, so its next use reads again (the
        benchmark's no-cache mode). Returns how many slots were freed."""
        pool, freed = self.pool(layer), 0
        with self.lock:
            for key, slot in list(pool.lru.items()):
                if key[0] == layer and slot.evictable():
                    del pool.lru[key]
                    del self.residency[key]
                    self.changes += 1
                    slot.key = slot.future = None
                    pool.free.append(slot)
                    freed += 1
        return freed

    def resident(self) -> list[Key]:
        with self.lock:
            return list(self.residency)

    def check_invariants(self) -> None:
        """Consistency of residency, pools and free lists (used by tests)."""
        with self.lock:
            seen = 0
            for pool in self.pools.values():
                assert len(pool.lru) + len(pool.free) <= len(pool.slots)
                for key, slot in pool.lru.items():
                    assert self.residency[key] is slot and slot.key == key
                assert not set(map(id, pool.free)) & {id(s) for s in pool.lru.values()}
                seen += len(pool.lru)
            assert seen == len(self.residency) <= sum(len(p.slots) for p in self.pools.values())
