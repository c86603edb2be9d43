"""/metrics: the engine's counters and the offload statistics in Prometheus' text format."""
from __future__ import annotations

from ..engine import Engine
from .settings import ServerSettings

STAT_METRICS = {  # offload_stats() key -> (metric name, type, help)
    "prefill_tokens_per_s": ("prefill_tokens_per_second", "gauge", "Prefill throughput."),
    "decode_tokens_per_s": ("decode_tokens_per_second", "gauge", "Decode throughput."),
    "hit_rate": ("expert_cache_hit_rate", "gauge", "Fraction of expert lookups served from the cache."),
    "hits": ("expert_cache_hits_total", "counter", "Expert lookups served from the cache."),
    "misses": ("expert_cache_misses_total", "counter", "Expert lookups that had to load the expert."),
    "prefetch_precision": ("prefetch_precision", "gauge", "Fraction of prefetched experts that were used."),
    "prefetch_recall": ("prefetch_recall", "gauge", "Fraction of used experts that had been prefetched."),
    "evictions": ("expert_cache_evictions_total", "counter", "Experts evicted from the cache."),
    "loads": ("expert_loads_total", "counter", "Expert reads from the slow tier."),
    "prefetch_useful_loads": ("prefetch_useful_loads_total", "counter", "Speculative reads that a layer then used."),
    "stall_seconds": ("stall_seconds_total", "counter", "Seconds compute waited for experts to arrive."),
    "resident_experts": ("resident_experts", "gauge", "Experts in the fast tier now."),
    "cache_slots": ("expert_cache_slots", "gauge", "Slots in the expert cache."),
    "peak_rss_bytes": ("peak_rss_bytes", "gauge", "Peak resident memory of the process."),
}


def prometheus_text(engine: Engine, settings: ServerSettings) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP moe_offload_{name} {help_text}", f"# TYPE moe_offload_{name} {kind}"])
        lines.extend(f"moe_offload_{name}{labels} {number(value)}" for labels, value in samples)

    metric("requests_total", "counter", "HTTP requests, by endpoint and status code.",
           [(f'{{endpoint="{ep}",status="{status}"}}', n)
            for (ep, status), n in sorted(settings.request_counts.items(), key=str)])
    metric("generated_tokens_total", "counter", "Tokens generated.",
           [("", engine.counters["generated_tokens"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens processed.",
           [("", engine.counters["prompt_tokens"])])
    metric("last_request_tokens_per_second", "gauge",
           "Generated tokens per second of the last finished request (prefill included).",
           [("", engine.last_tokens_per_s)])
    metric("queue_depth", "gauge", "Requests waiting for the model.", [("", engine.queue_depth)])
    metric("busy", "gauge", "1 while a generation runs.", [("", int(engine.busy))])

    stats = offload_stats_dict(engine.model)
    for key, (name, kind, help_text) in STAT_METRICS.items():
        if isinstance(stats.get(key), (int, float)):
            metric(name, kind, help_text, [("", stats[key])])
    if isinstance(stats.get("bytes_read"), dict):
        metric("bytes_read_total", "counter", "Bytes of experts read, by tier they came from.",
               [(f'{{tier="{tier}"}}', n) for tier, n in sorted(stats["bytes_read"].items())])
    split = stats.get("memory")
    if isinstance(split, dict) and split:
        metric("memory_bytes", "gauge", "Peak RSS split: libraries, dense part, expert cache (touched slots), rest.",
               [(f'{{part="{part}"}}', split[key]) for part, key in (
                   ("libraries", "baseline_bytes"), ("dense", "dense_bytes"), ("expert_cache", "cache_resident_bytes"),
                   ("rest", "rest_bytes"))])
    return "\n".join(lines) + "\n"


def number(value) -> str:
    return str(int(value)) if isinstance(value, (bool, int)) else repr(float(value))


def offload_stats_dict(model) -> dict:
    stats = getattr(model, "offload_stats", None)
    return stats().as_dict() if callable(stats) else {}
