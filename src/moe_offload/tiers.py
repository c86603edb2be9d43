"""The middle tier: a host-RAM cache of expert blobs between the disk and the device's slots.

    disk (DiskLoader) -> host RAM (HostCache, pinned when the device is a GPU) -> device slots (ExpertCache)

Arrows point one way: the device cache calls `HostCache.submit(layer, expert, dest) -> Future`, the
same interface as `DiskLoader.submit`, so it does not know which tier it reads from; the host cache
calls the disk loader the same way, and a transport copies host -> device. The transport is the
only device-specific piece (`HostCopy` here, a plain copy; `transport_cuda.CudaTransport` on a GPU,
which only `model.load` imports, and only when a CUDA device is asked for).

With device="cpu" and a host cache the "device" slots are host memory too: the CPU stand-in that the
tests use to check the three-tier logic (hits, misses and evictions in each tier, bytes moved per
hop, prefetch through both hops, logits) on machines without a GPU.

Hybrid execution (`Hybrid`): an expert that misses the device but sits in host RAM is computed on
the CPU when the CPU's time for it beats copying it (`compute_on_cpu`, on numbers measured at load).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import torch

from .loader import aligned_buffer
from .stats import OffloadStats

Key = tuple[int, int]  # (layer, expert)
MIN_HOST_SLOTS = 4  # a staging area: two reads and two copies in flight


class HostCopy:
    """The host -> "device" transport of the CPU stand-in: a plain copy."""

    device = torch.device("cpu")

    def copy(self, src: torch.Tensor, dest: torch.Tensor) -> None:
        dest.copy_(src[:dest.numel()])

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        return aligned_buffer(nbytes)

    def allocate_device(self, nbytes: int) -> torch.Tensor:
        return aligned_buffer(nbytes)


class _HostSlot:
    __slots__ = ("buffer", "views", "key", "future", "pins")

    def __init__(self, buffer: torch.Tensor):
        self.buffer, self.views = buffer, None
        self.key: Key | None = None
        self.future: Future | None = None  # the disk read into this slot
        self.pins = 0  # copies to the device or CPU computations in progress

    def loading(self) -> bool:
        return self.future is not None and not self.future.done()

    def ready(self) -> bool:
        return self.future is not None and self.future.done() and self.future.exception() is None


class HostCache:
    """One LRU pool of expert blobs in host RAM (all layers), filled from the tier below it.

    `submit` (the device cache's reads): a hit copies the host slot into `dest`; a miss reads the blob
    from below into a host slot first (disk -> host -> device). `warm` starts reads into host slots
    only (speculation whose guess found no device slot). A slot being read or copied from is never
    evicted; when every slot is busy, a device read waits for one."""

    tier = "host"

    def __init__(self, lower, slots: int, blob_size: int, stats: OffloadStats, transport=None,
                 make_views: Callable | None = None, threads: int = 2):
        self.lower, self.stats = lower, stats
        self.transport = transport or HostCopy()
        self.blob_size = blob_size
        slots = max(slots, MIN_HOST_SLOTS)
        self.buffer = self.transport.allocate_host(slots * blob_size)  # pinned on a GPU: true async DMA
        self.slots = [_HostSlot(self.buffer[i * blob_size:(i + 1) * blob_size]) for i in range(slots)]
        self.make_views = make_views
        self.free = list(reversed(self.slots))
        self.lru: OrderedDict[Key, _HostSlot] = OrderedDict()  # oldest first
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moe-offload-host")
        stats.host_slots = slots

    # ------------------------------------------------------------ internals (call with the lock held)

    def _claim(self) -> _HostSlot | None:
        if self.free:
            return self.free.pop()
        for key, slot in self.lru.items():
            if slot.pins == 0 and not slot.loading():
                del self.lru[key]
                self.stats.host_evictions += 1
                slot.key = slot.future = None
                return slot
        return None

    def _start(self, slot: _HostSlot, key: Key) -> None:
        slot.key = key
        slot.future = self.lower.submit(key[0], key[1], slot.buffer)
        self.lru[key] = slot

    def _drop(self, slot: _HostSlot, key: Key) -> None:
        """Forget a slot whose read failed (if no one did yet), so a later request reads again."""
        if slot.key == key and self.lru.get(key) is slot:
            del self.lru[key]
            slot.key = slot.future = None
            self.free.append(slot)

    # ------------------------------------------------------------ the loader interface

    def submit(self, layer: int, expert: int, dest: torch.Tensor) -> Future:
        """Fill `dest` (a device slot) with one expert's blob; the future completes when it is usable."""
        return self.pool.submit(self._fill, (layer, expert), dest)

    def _fill(self, key: Key, dest: torch.Tensor) -> None:
        slot = self._acquire(key)
        try:
            try:
                slot.future.result()  # disk -> host (already done on a hit)
            except BaseException:
                with self.lock:
                    self._drop(slot, key)
                raise
            self.transport.copy(slot.buffer, dest)
            self.stats.add(bytes_to_device=dest.numel())
        finally:
            with self.lock:
                slot.pins -= 1

    def _acquire(self, key: Key) -> _HostSlot:
        """The host slot of `key`, pinned: resident (a hit) or claimed and being read (a miss)."""
        while True:
            with self.lock:
                slot = self.lru.get(key)
                if slot is not None:
                    self.lru.move_to_end(key)
                    slot.pins += 1
                    self.stats.host_hits += 1
                    return slot
                slot = self._claim()
                if slot is not None:
                    self._start(slot, key)
                    slot.pins += 1
                    self.stats.host_misses += 1
                    return slot
                busy = [s.future for s in self.slots if s.loading()]
            # Every slot is pinned or loading: copies and reads finish soon. (The device cache counts
            # this wait as stall time: it waits on this read's future.)
            if busy:
                wait(busy, return_when=FIRST_COMPLETED)
            else:
                time.sleep(0.0002)

    def warm(self, layer: int, experts) -> int:
        """Start reading guessed experts into host slots only (no device slot could take them).
        Never waits and never evicts a busy slot; a guess enters at the old end of the LRU order.
        Returns how many reads started."""
        started = 0
        with self.lock:
            for e in experts:
                key = (layer, int(e))
                if key in self.lru:
                    continue
                slot = self._claim()
                if slot is None:
                    break
                self._start(slot, key)
                self.lru.move_to_end(key, last=False)
                started += 1
        if started:
            self.stats.add(host_prefetch_loads=started)
        return started

    # ------------------------------------------------------------ for hybrid execution and tests

    def ready(self, layer: int, expert: int) -> bool:
        """Whether the blob sits, fully read, in a host slot."""
        with self.lock:
            slot = self.lru.get((layer, expert))
            return slot is not None and slot.ready()

    def pin(self, layer: int, expert: int):
        """Pin a ready host slot and return (slot, views over it), or None if it is not ready."""
        with self.lock:
            slot = self.lru.get((layer, expert))
            if slot is None or not slot.ready():
                return None
            self.lru.move_to_end((layer, expert))
            slot.pins += 1
            self.stats.host_hits += 1
        if slot.views is None:
            slot.views = self.make_views(slot.buffer) if self.make_views else slot.buffer
        return slot, slot.views

    def unpin(self, slot: _HostSlot) -> None:
        with self.lock:
            slot.pins -= 1

    def resident(self) -> list[Key]:
        with self.lock:
            return list(self.lru)

    def check_invariants(self) -> None:
        with self.lock:
            assert len(self.lru) + len(self.free) <= len(self.slots)
            assert not {id(s) for s in self.free} & {id(s) for s in self.lru.values()}
            for key, slot in self.lru.items():
                assert slot.key == key and slot.pins >= 0

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.lower.close()


# ---------------------------------------------------------------- hybrid execution

@dataclass(frozen=True)
class TierCosts:
    """Numbers measured at load: the host -> device link and the CPU's time for one expert."""

    copy_bytes_per_s: float  # host -> device bandwidth (PCIe), pinned source
    copy_latency_s: float  # fixed cost of one copy (launch, event)
    cpu_seconds_per_expert: float  # one expert, one token, on the CPU kernels


def compute_on_cpu(blob_bytes: int, tokens: int, costs: TierCosts) -> bool:
    """Whether an expert that sits in host RAM but not on the device is cheaper to compute on the CPU
    (where its bytes are) than to copy to the device: CPU time grows with the tokens routed to it, the
    copy does not (the device's own time for the expert is small next to either)."""
    copy = costs.copy_latency_s + blob_bytes / costs.copy_bytes_per_s
    return costs.cpu_seconds_per_expert * max(1, tokens) < copy


class Hybrid:
    """Chooses, per layer call, the experts to compute on the CPU from host slots, and runs them."""

    def __init__(self, host: HostCache, costs: TierCosts, stats: OffloadStats):
        self.host, self.costs, self.stats = host, costs, stats

    def take(self, cache, layer: int, experts, tokens: int) -> dict[int, tuple]:
        """expert -> (host slot, views), pinned, for each expert of `experts` that misses the device
        cache, sits in host RAM and is cheaper on the CPU. The caller computes them and calls release."""
        if not compute_on_cpu(self.host.blob_size, tokens, self.costs):
            return {}
        taken = {}
        # Leave host slots for the device's own reads: they wait for an unpinned one.
        most = len(self.host.slots) - MIN_HOST_SLOTS // 2
        for e in experts:
            if len(taken) >= most:
                break
            if cache.contains(layer, e):
                continue
            got = self.host.pin(layer, e)
            if got is not None:
                taken[e] = got
                self.stats.record_access(layer, hit=False)  # a miss of the device tier
        if taken:
            self.stats.add(experts_cpu=len(taken))
        return taken

    def release(self, taken: dict) -> None:
        for slot, _ in taken.values():
            self.host.unpin(slot)


def measure_cpu_expert(expert_fn, views, hidden_size: int, dtype: torch.dtype, reps: int = 5) -> float:
    """Seconds for one token through one expert on the CPU (the best of `reps`, after a warm-up)."""
    x = torch.randn(1, hidden_size).to(dtype)
    with torch.no_grad():
        expert_fn(x, views)
        best = float("inf")
        for _ in range(reps):
            started = time.perf_counter()
            expert_fn(x, views)
            best = min(best, time.perf_counter() - started)
    return best
