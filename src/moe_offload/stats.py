"""The one statistics object: what the CLI prints, the API returns and the server exports."""
from __future__ import annotations

import threading
from collections import defaultdict


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status in bytes; 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; reset by OffloadStats.reset where allowed)."""
    peak = status_bytes("VmHWM")
    if peak:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class OffloadStats:
    """Counters updated by the cache, loader, prefetcher and model hooks; derived rates on read."""

    def __init__(self, layers: int | list[int], cache_slots: int = 0):
        # Per-layer counters are keyed by MoE layer: dense layers (DeepSeek's first ones) have none.
        self.moe_layers = list(range(layers)) if isinstance(layers, int) else list(layers)
        self.position = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.num_layers = len(self.moe_layers)
        self.cache_slots = cache_slots
        self.host_slots = 0  # set by the host tier (tiers.HostCache) when there is one
        self._lock = threading.Lock()
        self.resident = lambda: 0  # set by the cache: how many experts are resident now
        # Set by load(): the process's memory before the model's tensors (torch, transformers and the
        # other libraries), the dense part's tensors, the expert cache's slots; and how the cache was sized.
        self.memory: dict[str, int] = {}
        self.cache_touched = None  # () -> bytes of the host cache buffer in RAM (set by model.load)
        self.cache_choice = ""
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.tokens_prefill = self.tokens_decode = 0
            self.seconds_prefill = self.seconds_decode = 0.0
            self.hits = [0] * self.num_layers
            self.misses = [0] * self.num_layers
            self.evictions = 0
            self.prefetch_guesses = 0  # experts guessed
            self.prefetch_correct = 0  # guessed experts that the layer then used
            self.prefetch_needed = 0  # experts used by layers for which a guess was made
            self.prefetch_loads = 0  # guesses that started a read
            self.prefetch_useful = 0  # reads started by guesses that a layer then used
            self.bytes_read: dict[str, int] = defaultdict(int)
            self.loads = 0
            self.read_seconds = 0.0  # the loader's time inside reads (prefetch weighs a guess against it)
            self.guess_seconds, self.guess_calls = 0.0, 0  # the prefetcher's guesses, computed on the decode's path
            self.stall_seconds = 0.0
            # The host tier and the device (tiers.py): zero when there is none.
            self.host_hits = self.host_misses = self.host_evictions = self.host_prefetch_loads = 0
            self.bytes_to_device = 0  # host -> device (over PCIe on a GPU)
            self.experts_cpu = 0  # experts computed on the CPU from host RAM instead of copied (hybrid)
        try:  # restart the peak-RSS watermark (Linux); harmless where not allowed
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def add(self, **counts) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def record_access(self, layer: int, hit: bool, count: int = 1) -> None:
        with self._lock:
            (self.hits if hit else self.misses)[self.position[layer]] += count

    def record_hits(self, counts: list[tuple[int, int]]) -> None:
        """record_access(layer, hit=True, count) for each (layer, count), under one lock."""
        hits, position = self.hits, self.position
        with self._lock:
            for layer, count in counts:
                hits[position[layer]] += count

    def record_read(self, tier: str, nbytes: int, seconds: float = 0.0) -> None:
        with self._lock:
            self.bytes_read[tier] += nbytes
            self.loads += 1
            self.read_seconds += seconds

    @property
    def hit_rate(self) -> float:
        total = sum(self.hits) + sum(self.misses)
        return sum(self.hits) / total if total else 0.0

    def as_dict(self) -> dict:
        with self._lock:
            hits, misses = sum(self.hits), sum(self.misses)
            return {
                "tokens_prefill": self.tokens_prefill,
                "tokens_decode": self.tokens_decode,
                "seconds_prefill": round(self.seconds_prefill, 4),
                "seconds_decode": round(self.seconds_decode, 4),
                "prefill_tokens_per_s": _rate(self.tokens_prefill, self.seconds_prefill),
                "decode_tokens_per_s": _rate(self.tokens_decode, self.seconds_decode),
                "hits": hits,
                "misses": misses,
                "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
                "moe_layers": list(self.moe_layers),
                "hits_per_layer": list(self.hits),  # one entry per MoE layer, in the order of moe_layers
                "misses_per_layer": list(self.misses),
                "evictions": self.evictions,
                "prefetch_guesses": self.prefetch_guesses,
                "prefetch_loads": self.prefetch_loads,
                "prefetch_useful_loads": self.prefetch_useful,
                "prefetch_precision": _ratio(self.prefetch_correct, self.prefetch_guesses),
                "prefetch_recall": _ratio(self.prefetch_correct, self.prefetch_needed),
                "loads": self.loads,
                "bytes_read": dict(self.bytes_read),
                "stall_seconds": round(self.stall_seconds, 4),
                "peak_rss_bytes": peak_rss_bytes(),
                "resident_experts": self.resident(),
                "cache_slots": self.cache_slots,
                "memory": self.memory_split(),
                "expert_cache_choice": self.cache_choice,
                **self._tier_dict(),
            }

    def _tier_dict(self) -> dict:
        if not self.host_slots:
            return {}
        return {"host_slots": self.host_slots, "host_hits": self.host_hits, "host_misses": self.host_misses,
                "host_evictions": self.host_evictions, "host_prefetch_loads": self.host_prefetch_loads,
                "bytes_to_device": self.bytes_to_device, "experts_cpu": self.experts_cpu}

    def memory_split(self) -> dict[str, int]:
        """Peak RSS split into the libraries' baseline, the dense part, the expert cache and the rest
        (activations, KV cache, kernels built at run time, allocator slack): bytes."""
        if not self.memory:
            return {}
        peak = peak_rss_bytes()
        split = dict(self.memory)
        # The slots count once a read has touched them (model.load gives the measure; none on a GPU).
        touched = self.cache_touched() if self.cache_touched else None
        split["cache_resident_bytes"] = split["cache_bytes"] if touched is None else min(split["cache_bytes"], touched)
        split["rest_bytes"] = max(0, peak - split["baseline_bytes"] - split["dense_bytes"] - split["cache_resident_bytes"])
        split["peak_rss_bytes"] = peak
        return split

    def summary(self) -> str:
        """A few readable lines for the terminal."""
        d = self.as_dict()
        read = sum(d["bytes_read"].values())
        return "\n".join([
            f"prefill: {d['tokens_prefill']} tokens at {d['prefill_tokens_per_s']:.1f} tok/s   "
            f"decode: {d['tokens_decode']} tokens at {d['decode_tokens_per_s']:.2f} tok/s",
            f"expert cache: {d['resident_experts']}/{d['cache_slots']} slots used, hit rate {d['hit_rate']:.3f} "
            f"({d['hits']} hits, {d['misses']} misses, {d['evictions']} evictions)",
            (f"prefetch: precision {d['prefetch_precision']:.3f}, recall {d['prefetch_recall']:.3f} "
             f"({d['prefetch_guesses']} guesses, {d['prefetch_loads']} loads started)" if d["prefetch_guesses"] else
             "prefetch: no guesses (off, or the cache never had a slot a guess could take)"),
            f"read {read / 2**20:.1f} MiB in {d['loads']} loads, stalled {d['stall_seconds']:.3f} s, "
            f"peak RSS {d['peak_rss_bytes'] / 2**20:.0f} MiB",
            *([_memory_line(d["memory"])] if d["memory"] else []),
            *([d["expert_cache_choice"]] if d["expert_cache_choice"] else []),
            *([f"host tier: {d['host_hits']} hits, {d['host_misses']} misses, {d['host_evictions']} evictions in "
               f"{d['host_slots']} slots; {d['bytes_to_device'] / 2**20:.1f} MiB to the device, "
               f"{d['experts_cpu']} experts computed on the CPU"] if "host_slots" in d else []),
        ])


def _memory_line(m: dict) -> str:
    mib = lambda key: f"{m[key] / 2**20:.0f}"  # noqa: E731
    mapped = f" (+{mib('dense_mapped_bytes')} mapped from the store)" if m.get("dense_mapped_bytes") else ""
    return (f"memory: peak RSS {mib('peak_rss_bytes')} MiB = libraries {mib('baseline_bytes')} + dense part "
            f"{mib('dense_bytes')}{mapped} + expert cache {mib('cache_resident_bytes')} (of {mib('cache_bytes')}) + rest "
            f"{mib('rest_bytes')}")


def _rate(n: float, seconds: float) -> float:
    return round(n / seconds, 3) if seconds > 0 else 0.0


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0
