"""Speculative expert loading: guess the next layers' experts from the current hidden state.

Thanks to the residual stream, layer L+1's router applied to the hidden state entering layer L's
MoE block picks most of the experts layer L+1 will use. The guess is made before layer L's
experts run, so the reads overlap with compute; a wrong guess only costs bandwidth.

The first MoE layer has no layer before it: its guess for the next token is made as soon as the
logits exist, from the most likely next token's embedding, so those reads overlap with sampling
and with the next step's first attention block.
"""
from __future__ import annotations

import contextlib
import time

import torch

from .cache import ExpertCache
from .speculation_trial import SpeculationTrial
from .stats import OffloadStats


def _no_grad():
    """torch.no_grad() where gradients are on (a user's own forward), else nothing: decode runs under
    generate's no_grad already, and entering the context costs more than a skipped guess."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


class PayoffGate:
    """Lets a speculation run while it pays. Over every WINDOW outcomes (counted cumulatively by
    the caller) it measures the paying fraction; below MIN_USEFUL the speculation pauses except for
    one probe in PROBE_EVERY calls, which keeps measuring so it resumes when it pays again."""
    WINDOW, MIN_USEFUL, PROBE_EVERY = 16, 0.5, 8

    def __init__(self):
        self.paying, self.calls = True, 0
        self.mark = (0, 0)  # (tries, useful) at the start of the current window

    def allow(self, tries: int, useful: int, also: bool = True) -> bool:
        """Whether to speculate now: while the last window paid and `also` holds, else one probe in
        PROBE_EVERY calls."""
        self.calls += 1
        return (self.pays(tries, useful) and also) or self.calls % self.PROBE_EVERY == 0

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
    # a slot. And only if a guess costs less than the stalls it saves: it is computed on the decode's
    # own path (norm, router, ranking, handing the reads to the loader: 0.15-0.3 ms a layer on a
    # 2-core CPU), while a right guess saves at most a read; on small experts read in 0.1-0.3 ms the
    # guesses cost more than they save (README, "Planning"). Both are estimates; what decides in the
    # end is the decode's own time with and without speculation (speculation_trial.py). The first
    # layer's guesses, made from a token embedding instead of the residual stream, are gated on
    # their own precision as well.

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
        self.trial = SpeculationTrial(stats)

    def guess(self, layer: int, residual: torch.Tensor) -> None:
        """Called when decoder layer `layer`'s MLP input is known (`residual`: the stream before its
        norm): guess the next `lookahead` MoE layers after it. Dense layers are skipped over."""
        targets = [t for t in self.layers if t > layer][:self.lookahead]
        if self.prefetch <= 0 or not targets or not self._worth_guessing():
            return
        started = time.perf_counter()
        h = residual.reshape(-1, residual.shape[-1])
        with _no_grad():
            for target in targets:
                self._guess_layer(target, h)
        self._spent(started)

    def guess_first_layer(self, logits: torch.Tensor) -> None:
        """Called when a step's logits [B, T, V] exist: guess the first MoE layer's experts for
        the next token from the embedding of each sequence's most likely next token (exact for
        greedy decoding up to the first attention block's contribution). The guess is made and
        scored while guesses pay their time (_worth_guessing), but reads start only while at least
        half of the recent first-layer guesses were right: an embedding predicts routing well in
        some models and barely in others (random weights)."""
        if self.prefetch <= 0 or self.embed is None or not self._worth_guessing():
            return
        started = time.perf_counter()
        token = logits[:, -1].argmax(dim=-1)
        read = self.first_gate.pays(self.first_guessed, self.first_correct)
        with _no_grad():
            self._guess_layer(self.layers[0], self.embed(token), read=read)
        self._spent(started)

    def _guess_layer(self, target: int, h: torch.Tensor, read: bool = True) -> None:
        if read and not self.cache.has_room(target) and getattr(self.cache, "warm_below", None) is None:
            return  # nothing a guess may evict: skip the router (~0.2 ms a layer on a CPU)
        top = self._ranked(self.routers[target](self.norms[target](h))).reshape(-1)
        # Most probable first, so a nearly full pool takes the best guesses.
        experts = torch.unique(top, sorted=False).tolist() if h.shape[0] > 1 else top.tolist()
        for listener in self.listeners:
            listener(target, experts, read)
        if read:
            self.pending.setdefault(target, set()).update(experts)
            self.cache.prefetch(target, experts)
        else:
            self.shadow.setdefault(target, set()).update(experts)

    def _ranked(self, routed) -> torch.Tensor:
        """The `prefetch` likeliest experts per token [T, K] from what a router module returns: its
        own choice (top_k_index, ranked by its weights) when it returns one, so sigmoid, biased and
        group-limited routers guess what they will pick; further guesses by raw logit."""
        logits = routed[0] if isinstance(routed, tuple) else routed
        k = min(self.prefetch, logits.shape[-1])
        if not isinstance(routed, tuple) or len(routed) < 3:
            return logits.float().topk(k, dim=-1).indices
        weights, index = routed[-2], routed[-1]
        chosen = index.gather(-1, weights.float().argsort(dim=-1, descending=True))
        if k <= chosen.shape[-1]:
            return chosen[..., :k]
        rest = logits.float().scatter(-1, chosen, float("-inf")).topk(k - chosen.shape[-1], dim=-1).indices
        return torch.cat([chosen, rest], dim=-1)

    def _worth_guessing(self) -> bool:
        if not self.trial.speculating():  # a window timed without speculation, or one that lost to it
            return False
        s = self.stats
        return self.reads_gate.allow(s.prefetch_loads, s.prefetch_useful, also=self.saves_time())

    def saves_time(self) -> bool:
        """Whether the guesses so far saved more time than they took: the right ones (reads a layer
        then used) times the mean read each spared a wait for, against the guesses' own time. True
        until a window of guesses and a read have been measured."""
        s = self.stats
        if s.guess_calls < PayoffGate.WINDOW or not s.loads:
            return True
        return s.prefetch_useful * s.read_seconds / s.loads >= s.guess_seconds

    def _spent(self, started: float) -> None:
        self.stats.add(guess_seconds=time.perf_counter() - started, guess_calls=1)

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
