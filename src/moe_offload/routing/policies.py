"""Eviction policies for the cache simulator: each picks the resident expert to replace.

Every policy sees the pool's residents in LRU order (oldest first) and breaks its own ties by that
order, so with no other information each one degrades to LRU.

  lru     the least recently used (what the live cache does)
  lfu     the fewest uses since the trace began (counts survive eviction)
  lfru    the fewest uses in the last WINDOW steps: frequency, but forgetting old popularity
  belady  the one whose next use is furthest away (offline optimal: it reads the future trace)
"""
from __future__ import annotations

import bisect
from collections import defaultdict, deque

POLICIES = ("lru", "lfu", "lfru", "belady")


class Policy:
    name = "lru"

    def __init__(self, **kwargs):
        pass

    def on_access(self, key, now: int) -> None:
        pass

    def victim(self, candidates: list, now: int):
        """candidates: evictable residents, oldest use first."""
        return candidates[0]


class LFU(Policy):
    name = "lfu"

    def __init__(self, **kwargs):
        self.count = defaultdict(int)

    def on_access(self, key, now):
        self.count[key] += 1

    def victim(self, candidates, now):
        return min(candidates, key=lambda k: self.count[k])  # min keeps the first (oldest) on ties


class LFRU(Policy):
    name = "lfru"

    def __init__(self, window: int = 16, steps_per_time: int = 1, **kwargs):
        self.span = window * steps_per_time  # the window in simulator time units
        self.uses = defaultdict(deque)

    def on_access(self, key, now):
        self.uses[key].append(now)

    def victim(self, candidates, now):
        def recent(k):
            q = self.uses[k]
            while q and q[0] < now - self.span:
                q.popleft()
            return len(q)
        return min(candidates, key=recent)


class Belady(Policy):
    name = "belady"

    def __init__(self, future: dict | None = None, **kwargs):
        self.future = future or {}  # key -> sorted times it is used

    def next_use(self, key, now):
        times = self.future.get(key, ())
        i = bisect.bisect_right(times, now)
        return times[i] if i < len(times) else float("inf")

    def victim(self, candidates, now):
        best, far = candidates[0], -1.0
        for k in candidates:  # the first of equally far ones: the oldest
            t = self.next_use(k, now)
            if t > far:
                best, far = k, t
        return best


def make_policy(name: str, **kwargs) -> Policy:
    classes = {"lru": Policy, "lfu": LFU, "lfru": LFRU, "belady": Belady}
    return classes[name](**kwargs)
