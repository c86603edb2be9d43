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
    def __init__(self, cache: ExpertCache, stats: OffloadStats, routers: dict, norms: dict,
                 prefetch: int, lookahead: int):
        self.cache, self.stats = cache, stats
        self.routers, self.norms = routers, norms  # MoE layer -> its router / the norm before its MoE block
        self.layers = sorted(routers)
        self.prefetch, self.lookahead = prefetch, lookahead
        self.pending: dict[int, set[int]] = {}  # layer -> experts guessed for its next run

    @torch.no_grad()
    def guess(self, layer: int, residual: torch.Tensor) -> None:
        """Called when layer `layer`'s MoE input is known; `residual` is the stream before its norm."""
        if self.prefetch <= 0:
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

    def score(self, layer: int, used: set[int]) -> None:
        """Compare the guesses made for `layer` with the experts it actually used."""
        guessed = self.pending.pop(layer, None)
        if guessed is not None:
            self.stats.add(prefetch_guesses=len(guessed), prefetch_correct=len(guessed & used),
                           prefetch_needed=len(used))
