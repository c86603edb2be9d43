"""Replay a routing trace through a model of the expert cache under several policies.

The model follows the live cache (cache.py) step for step: per forward step and MoE layer in
order, the prefetcher's guesses for the next LOOKAHEAD layers are made first (from the recorded
rankings, top PREFETCH of each token, pooled over the step's tokens), then the layer's experts are
requested, resident ones first, each in ascending order; a miss takes a free slot or evicts the
policy's victim. A guess never evicts an expert the target layer's latest step used, and enters at
the old end of the LRU order. Differences from the live cache, on purpose: no payoff gate and no
timing (a guess is always made and always arrives in time), and a prefill step that needs more
experts than its pool holds is served one expert after another (live, the eviction order then
depends on which read finishes first).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import MoeOffloadError
from .policies import POLICIES, make_policy
from .trace_format import Trace


@dataclass(frozen=True)
class Setting:
    policy: str = "lru"
    slots: int = 4  # per layer; a global pool gets slots x MoE layers
    scope: str = "layer"
    prefetch: int = 0
    lookahead: int = 1
    window: int = 16  # lfru's window, in steps


@dataclass
class Result:
    setting: Setting
    hits: int = 0
    misses: int = 0
    demand_loads: int = 0
    prefetch_loads: int = 0
    prefetch_useful: int = 0
    guessed: int = 0
    guessed_right: int = 0
    needed: int = 0
    bytes_read: int = 0
    decode_hits: int = 0  # the same counts over decode steps only: what a decode token costs
    decode_misses: int = 0
    # misses of one MoE layer in one decode step -> how many such (step, layer): the cache submits a
    # layer's misses together, so a read's cost depends on how many run beside it (bench/roofline.py)
    decode_miss_groups: dict = field(default_factory=dict)
    evictions: list | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def decode_hit_rate(self) -> float:
        n = self.decode_hits + self.decode_misses
        return self.decode_hits / n if n else 0.0

    @property
    def precision(self) -> float:
        return self.guessed_right / self.guessed if self.guessed else 0.0

    @property
    def recall(self) -> float:
        return self.guessed_right / self.needed if self.needed else 0.0

    def row(self) -> dict:
        return {**asdict(self.setting), "hit_rate": round(self.hit_rate, 4), "hits": self.hits,
                "misses": self.misses, "loads": self.demand_loads + self.prefetch_loads,
                "prefetch_loads": self.prefetch_loads, "prefetch_useful": self.prefetch_useful,
                "prefetch_precision": round(self.precision, 4), "prefetch_recall": round(self.recall, 4),
                "bytes_read": self.bytes_read}


class Steps:
    """The trace cut into what the simulator needs, computed once and shared by every setting."""

    def __init__(self, trace: Trace):
        self.trace, self.L = trace, trace.num_layers
        self.used: list[list[list[int]]] = []  # step -> layer -> sorted unique experts
        self.tokens: list[np.ndarray] = []
        self.decode: list[bool] = []
        for _, idx in trace.steps():
            self.tokens.append(idx)
            self.used.append([sorted(set(trace.experts[idx, i].reshape(-1).tolist())) for i in range(self.L)])
            self.decode.append(bool(trace.decode[idx[0]]))
        self.future: dict = {}  # (layer, expert) -> sorted times used; time = step * L + layer
        for s, layers in enumerate(self.used):
            for i, experts in enumerate(layers):
                for e in experts:
                    self.future.setdefault((i, e), []).append(s * self.L + i)
        self._guesses: dict = {}

    def guesses(self, k: int, lookahead: int) -> list[list[list[tuple[int, list[int]]]]]:
        """step -> source layer -> [(target layer, experts)] made from that layer's hidden state;
        source -1 is the first layer's guess made from the previous step's logits."""
        key = (k, lookahead)
        if key in self._guesses:
            return self._guesses[key]
        t, out = self.trace, []
        if lookahead > t.lookahead_depth:
            raise MoeOffloadError(f"the trace records guesses {t.lookahead_depth} layer(s) ahead; "
                                  f"--lookahead {lookahead} needs a trace made with --depth {lookahead}")
        for s, idx in enumerate(self.tokens):
            per_source = [[] for _ in range(self.L + 1)]  # index 0: the first-layer guess
            if self.decode[s] and t.first_rank[idx[0], 0] >= 0:
                per_source[0].append((0, _top_union(t.first_rank[idx], k)))
            for i in range(self.L):
                for d in range(1, lookahead + 1):
                    if i + d < self.L:
                        per_source[i + 1].append((i + d, _top_union(t.spec_rank[idx, i, d - 1], k)))
            out.append(per_source)
        self._guesses[key] = out
        return out


def _top_union(ranks: np.ndarray, k: int) -> list[int]:
    """The top-k of each token's ranking, the most probable first, without repeats."""
    seen: dict[int, None] = {}
    for col in range(min(k, ranks.shape[-1])):
        for e in ranks[..., col].reshape(-1).tolist():
            seen.setdefault(int(e), None)
    return list(seen)


class Pool:
    def __init__(self, slots: int, policy):
        self.slots, self.policy = slots, policy
        self.lru: OrderedDict = OrderedDict()  # oldest first
        self.speculative: set = set()

    def victim(self, now: int, keep) -> object | None:
        candidates = [k for k in self.lru if k not in keep]
        return self.policy.victim(candidates, now) if candidates else None


def simulate(steps: Steps, setting: Setting, record_evictions: bool = False) -> Result:
    """One replay of the trace under one setting."""
    if setting.policy not in POLICIES:
        raise MoeOffloadError(f"unknown policy {setting.policy!r}; choose from {', '.join(POLICIES)}")
    if setting.scope not in ("layer", "global"):
        raise MoeOffloadError(f"scope must be 'layer' or 'global', got {setting.scope!r}")
    L, top_k = steps.L, steps.trace.meta["top_k"]
    if setting.slots < top_k:
        raise MoeOffloadError(f"{setting.slots} slot(s) per layer is fewer than the router's top-k ({top_k})")
    blob = int(steps.trace.meta["blob_size"])
    res = Result(setting, evictions=[] if record_evictions else None)
    kwargs = dict(window=setting.window, steps_per_time=L, future=steps.future)
    if setting.scope == "layer":
        pools = [Pool(setting.slots, make_policy(setting.policy, **kwargs)) for _ in range(L)]
    else:
        shared = Pool(setting.slots * L, make_policy(setting.policy, **kwargs))
        pools = [shared] * L
    last_step: list[set] = [set() for _ in range(L)]
    guesses = steps.guesses(setting.prefetch, setting.lookahead) if setting.prefetch > 0 else None
    pending: dict[int, set] = {}

    def evict(pool, key, res):
        del pool.lru[key]
        pool.speculative.discard(key)
        if res.evictions is not None:
            res.evictions.append(key)

    def prefetch(target: int, experts: list[int], now: int) -> None:
        pending.setdefault(target, set()).update(experts)
        pool = pools[target]
        for e in experts:
            key = (target, e)
            if key in pool.lru:
                continue
            if len(pool.lru) >= pool.slots:
                victim = pool.victim(now, last_step[target])
                if victim is None:
                    break
                evict(pool, victim, res)
            pool.lru[key] = None
            pool.lru.move_to_end(key, last=False)
            pool.speculative.add(key)
            res.prefetch_loads += 1

    for s, layers in enumerate(steps.used):
        for i in range(L):
            now = s * L + i
            if guesses is not None:
                if i == 0:
                    for target, experts in guesses[s][0]:
                        prefetch(target, experts, now)
                for target, experts in guesses[s][i + 1]:
                    prefetch(target, experts, now)
            pool, used = pools[i], layers[i]
            guessed = pending.pop(i, None)
            if guessed is not None:
                res.guessed += len(guessed)
                res.guessed_right += len(guessed & set(used))
                res.needed += len(used)
            keys = [(i, e) for e in used]
            last_step[i] = set(keys)
            order = [k for k in keys if k in pool.lru] + [k for k in keys if k not in pool.lru]
            done: set = set()
            decode = steps.decode[s]
            missed = res.misses
            for key in order:
                if key in pool.lru:
                    res.hits += 1
                    res.decode_hits += decode
                    pool.lru.move_to_end(key)
                    if key in pool.speculative:
                        pool.speculative.discard(key)
                        res.prefetch_useful += 1
                else:
                    res.misses += 1
                    res.decode_misses += decode
                    res.demand_loads += 1
                    if len(pool.lru) >= pool.slots:
                        victim = pool.victim(now, done) or next(iter(pool.lru))
                        evict(pool, victim, res)
                    pool.lru[key] = None
                pool.policy.on_access(key, now)
                done.add(key)
            if decode and res.misses > missed:
                group = res.misses - missed
                res.decode_miss_groups[group] = res.decode_miss_groups.get(group, 0) + 1
    res.bytes_read = (res.demand_loads + res.prefetch_loads) * blob
    return res
