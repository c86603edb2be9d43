"""Whether speculating makes decoding faster, measured on the decode itself.

A guess is computed on the decode's own path (norm, router, ranking, the hand-off to the loader),
its unused reads take the loader and the cores, and a used read spares only part of a wait. No
estimate from the counters foretold the outcome on the reference store, where the guesses were
right 78% of the time and offload still decoded slower than lru-only (README, "Planning"). So the
prefetcher asks this trial: windows of WINDOW decode tokens alternate between speculating and not
until each side has run MIN_WINDOWS; from then on the side with fewer seconds per decode token
runs, and the other gets one window in EXPLORE_EVERY, so the choice follows the routing and the
disk as they change.
"""
from __future__ import annotations

from .stats import OffloadStats


class SpeculationTrial:
    WINDOW, MIN_WINDOWS, EXPLORE_EVERY = 16, 2, 8

    def __init__(self, stats: OffloadStats):
        self.stats = stats
        self.on = True  # whether the current window speculates
        self.seconds = {True: 0.0, False: 0.0}  # decode seconds and tokens of each side's closed windows
        self.tokens = {True: 0, False: 0}
        self.windows = {True: 0, False: 0}
        self.mark: tuple[int, float] | None = None  # decode tokens and seconds when the window opened

    def speculating(self) -> bool:
        """Whether to speculate now; closes the current window once it holds WINDOW decode tokens."""
        now = (self.stats.tokens_decode, self.stats.seconds_decode)
        if self.mark is None or now[0] < self.mark[0]:  # the first call, or the counters were reset
            self.mark = now
        elif now[0] - self.mark[0] >= self.WINDOW:
            self._close(now)
        return self.on

    def seconds_per_token(self, on: bool) -> float:
        return self.seconds[on] / self.tokens[on] if self.tokens[on] else 0.0

    def _close(self, now: tuple[int, float]) -> None:
        side = self.on
        self.tokens[side] += now[0] - self.mark[0]
        self.seconds[side] += now[1] - self.mark[1]
        self.windows[side] += 1
        self.mark = now
        if min(self.windows.values()) < self.MIN_WINDOWS:
            self.on = not side
            return
        faster = self.seconds_per_token(True) <= self.seconds_per_token(False)
        explore = sum(self.windows.values()) % self.EXPLORE_EVERY == 0
        self.on = (not faster) if explore else faster
