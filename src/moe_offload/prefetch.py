"""Speculative expert loading: guess the next layers' experts from the current hidden state.

Thanks to the residual stream, layer L+1's router applied to the hidden state entering layer L's
MoE block picks most of the experts layer L+1 will use. The guess is made before layer L's
experts run, so the reads overlap with compute; a wrong guess only costs bandwidth.

The first MoE layer has no layer before it: its guess for the next token is made as soon as the
logits exist, from the most likely next token's embedding, so those reads overlap with sampling
and with the next step's first attention block.
"""
from __future__ import annotations

import torch

from .cache import ExpertCache
from .stats import OffloadStats


class PayoffGate:
    """Lets a speculation run while it pays. Over every WINDOW outcomes (counted cumulatively by
    the caller) it measures the paying fraction; below MIN_USEFUL the speculation pauses except for
    one probe in PROBE_EVERY calls, which keeps measuring so it resumes when it pays again."""
    WINDOW, MIN_USEFUL, PROBE_EVERY = 16, 0.5, 8

    def __init__(self):
        self.paying, self.calls = True, 0
        self.mark = (0, 0)  # (tries, useful) at the start of the current window

    def allow(self, tries: int, useful: int) -> bool:
        self.calls += 1
        return self.pays(tries, useful) or self.calls % self.PROBE_EVERY == 0

    def pays(self, tries: int, useful: int) -> bool:
        """Whether the last complete window paid (no probing: for guesses that are scored anyway)."""
        if tries < self.mark[0]:  # the counters were reset
            self.mark = (0, 0)
        if tries - self.mark[0] >= self.WINDOW:
            self.paying = (useful - self.mark[1]) >= self.MIN_USEFUL * (tries - self.mark[0])
            self.mark = (tries, useful)
        return self.paying


class Prefetcher:
    # Speculation pays only if most speculative reads are used: each wasted read costs bandwidth and
    # a slot, and a guess costs the router (~0.2 ms a layer). The first layer's guesses, made from a
    # token embedding instead of the residual stream, are gated on their own precision as well.

    def __init__(self, cache: ExpertCache, stats: OffloadStats, routers: dict, norms: dict,
                 prefetch: int, lookahead: int, embed: torch.nn.Module | None = None):
        self.cache, self.stats, self.embed = cache, stats, embed
        self.routers, self.norms = routers, norms  # MoE layer -> its router / the norm before its MoE block
        self.layers = sorted(routers)
        self.prefetch, self.lookahead = prefetch, lookahead
        self.pending: dict[int, set[int]] = {}  # layer -> experts guessed for its next run
        self.shadow: dict[int, set[int]] = {}  # guesses made without reading: scored, not counted
        self.reads_gate, self.first_gate = PayoffGate(), PayoffGate()
        self.first_guessed = self.first_correct = 0  # the first layer's guesses and the right ones
        self.listeners: list = []  # called with (target_layer, experts, read) for every guess: traces record them

    @torch.no_grad()
    def guess(self, layer: int, residual: torch.Tensor) -> None:
        """Called when layer `layer`'s MoE input is known; `residual` is the stream before its norm."""
        if self.prefetch <= 0 or not self._worth_guessing():
            return
        pos = self.layers.index(layer)
        h = residual.reshape(-1, residual.shape[-1])
        for target in self.layers[pos + 1:pos + 1 + self.lookahead]:
            self._guess_layer(target, h)

    @torch.no_grad()
    def guess_first_layer(self, logits: torch.Tensor) -> None:
        """Called when a step's logits [B, T, V] exist: guess the first MoE layer's experts for
        the next token from the embedding of each sequence's most likely next token (exact for
        greedy decoding up to the first attention block's contribution). The guess is always
        scored, but reads start only while at least half of the recent guesses were right: an
        embedding predicts routing well in some models and barely in others (random weights)."""
        if self.prefetch <= 0 or self.embed is None:
            return
        token = logits[:, -1].argmax(dim=-1)
        read = self.first_gate.pays(self.first_guessed, self.first_correct)
        self._guess_layer(self.layers[0], self.embed(token), read=read and self._worth_guessing())

    def _guess_layer(self, target: int, h: torch.Tensor, read: bool = True) -> None:
        if read and not self.cache.has_room(target):
            return  # nothing a guess may evict: skip the router (~0.2 ms a layer on a CPU)
        logits = self.routers[target](self.norms[target](h))
        logits = logits[0] if isinstance(logits, tuple) else logits
        k = min(self.prefetch, logits.shape[-1])
        top = logits.float().topk(k, dim=-1).indices.reshape(-1)
        # Most probable first, so a nearly full pool takes the best guesses.
        experts = torch.unique(top, sorted=False).tolist() if h.shape[0] > 1 else top.tolist()
        for listener in self.listeners:
            listener(target, experts, read)
        if read:
            self.pending.setdefault(target, set()).update(experts)
            self.cache.prefetch(target, experts)
        else:
            self.shadow.setdefault(target, set()).update(experts)

    def _worth_guessing(self) -> bool:
        return self.reads_gate.allow(self.stats.prefetch_loads, self.stats.prefetch_useful)

    def score(self, layer: int, used: set[int]) -> None:
        """Compare the guesses made for `layer` with the experts it actually used."""
        guessed, shadow = self.pending.pop(layer, None), self.shadow.pop(layer, None)
        if layer == self.layers[0] and (guessed or shadow):  # only guess_first_layer guesses for it
            mine = (guessed or set()) | (shadow or set())
            self.first_guessed += len(mine)
            self.first_correct += len(mine & used)
        if guessed is not None:
            self.stats.add(prefetch_guesses=len(guessed), prefetch_correct=len(guessed & used),
                           prefetch_needed=len(used))
