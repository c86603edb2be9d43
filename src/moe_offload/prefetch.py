"""Speculative expert loading: guess the next layers' experts from the current hidden state.

Thanks to the residual stream, layer L+1's router applied to the hidden state entering layer L's
MoE block picks most of the experts layer L+1 will use. The guess is made before layer L's
experts run, so the reads overlap with compute; a wrong guess only costs bandwidth.
"""
from __future__ import annotations

import torch

from .cache import ExpertCache
from .stats import OffloadStats


class Prefetcher:
    # Speculation pays only if most speculative reads are used: each wasted read costs bandwidth
    # and a slot. Over every WINDOW speculative reads we measure the used fraction; below
    # MIN_USEFUL, guessing pauses (the router costs ~0.2 ms a layer) except one probe in PROBE_EVERY
    # that keeps measuring, so speculation resumes when routing becomes predictable again.
    WINDOW, MIN_USEFUL, PROBE_EVERY = 16, 0.5, 8

    def __init__(self, cache: ExpertCache, stats: OffloadStats, routers: dict, norms: dict,
                 prefetch: int, lookahead: int):
        self.cache, self.stats = cache, stats
        self.routers, self.norms = routers, norms  # MoE layer -> its router / the norm before its MoE block
        self.layers = sorted(routers)
        self.prefetch, self.lookahead = prefetch, lookahead
        self.pending: dict[int, set[int]] = {}  # layer -> experts guessed for its next run
        self.paying, self.calls = True, 0
        self.mark = (0, 0)  # (speculative reads, used ones) at the start of the current window

    @torch.no_grad()
    def guess(self, layer: int, residual: torch.Tensor) -> None:
        """Called when layer `layer`'s MoE input is known; `residual` is the stream before its norm."""
        if self.prefetch <= 0 or not self._worth_guessing():
            return
        pos = self.layers.index(layer)
        h = residual.reshape(-1, residual.shape[-1])
        for target in self.layers[pos + 1:pos + 1 + self.lookahead]:
            if not self.cache.has_room(target):
                continue  # nothing a guess may evict: skip the router (~0.2 ms a layer on a CPU)
            logits = self.routers[target](self.norms[target](h))
            logits = logits[0] if isinstance(logits, tuple) else logits
            k = min(self.prefetch, logits.shape[-1])
            top = logits.float().topk(k, dim=-1).indices.reshape(-1)
            # Most probable first, so a nearly full pool takes the best guesses.
            experts = torch.unique(top, sorted=False).tolist() if h.shape[0] > 1 else top.tolist()
            self.pending.setdefault(target, set()).update(experts)
            self.cache.prefetch(target, experts)

    def _worth_guessing(self) -> bool:
        loads, useful = self.stats.prefetch_loads, self.stats.prefetch_useful
        if loads < self.mark[0]:  # the statistics were reset
            self.mark = (0, 0)
        if loads - self.mark[0] >= self.WINDOW:
            self.paying = (useful - self.mark[1]) >= self.MIN_USEFUL * (loads - self.mark[0])
            self.mark = (loads, useful)
        self.calls += 1
        return self.paying or self.calls % self.PROBE_EVERY == 0

    def score(self, layer: int, used: set[int]) -> None:
        """Compare the guesses made for `layer` with the experts it actually used."""
        guessed = self.pending.pop(layer, None)
        if guessed is not None:
            self.stats.add(prefetch_guesses=len(guessed), prefetch_correct=len(guessed & used),
                           prefetch_needed=len(used))
