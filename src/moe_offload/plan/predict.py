"""Predict, before running, whether a store fits a RAM budget and how fast it will decode.

  memory      dense weights (resident) + cache slots x blob size + the runtime's own footprint
  cache size  what is left for the cache, in whole experts per MoE layer (at most all of them)
  hit rate    from a trace: the simulator's LRU at that cache size (what the live cache does);
              without one: slots / experts, the rate of routing with no locality at all
  tokens/s    1 / (compute + reads): compute is a short decode timed with every expert
              resident (or dense + top-k expert bytes over the RAM bandwidth); reads are the
              expected misses per token, (1 - hit rate) x top-k x MoE layers, times the blob size
              over the disk's blob-read bandwidth (measured cold, the loader's way, or given)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..errors import MoeOffloadError
from ..store import DENSE_FILE, Store

RUNTIME_BYTES = 400 << 20  # python + torch + transformers + tokenizer, measured RSS of a loaded tiny store ~350 MiB


@dataclass
class Plan:
    ram: int
    dense_bytes: int
    blob_size: int
    moe_layers: int
    num_experts: int
    top_k: int
    fits: bool
    slots_per_layer: int
    cache_bytes: int
    hit_rate: float
    hit_rate_source: str
    misses_per_token: float
    compute_seconds: float
    compute_source: str
    disk_bytes_per_s: float
    read_seconds: float
    decode_tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def cache_slots(store: Store, ram: int, runtime: int = RUNTIME_BYTES) -> tuple[bool, int]:
    dense = (store.path / DENSE_FILE).stat().st_size
    left = ram - dense - runtime
    slots = min(store.num_experts, left // (store.blob_size * len(store.moe_layers))) if left > 0 else 0
    return slots >= store.top_k, int(max(slots, 0))


def trace_hit_rate(trace_path, slots: int) -> float:
    from ..routing import Setting, Steps, load_trace, simulate

    trace = load_trace(trace_path)
    return simulate(Steps(trace), Setting("lru", slots)).hit_rate


def measure_compute(store: Store, tokens: int = 24) -> float:
    """Seconds per decode token with every expert resident (nothing read after warm-up)."""
    from transformers import AutoTokenizer

    from ..engine import SamplingParams, generate_text
    from ..model import load

    model = load(store.path, experts_per_layer=store.num_experts, prefetch=0)
    try:
        tok = AutoTokenizer.from_pretrained(store.path, local_files_only=True)
        ids = tok("And it came to pass").input_ids
        generate_text(model, tok, ids, SamplingParams(max_new_tokens=4))  # loads every expert it touches
        for layer in store.moe_layers:  # and the rest, so the timed run reads nothing
            list(model.offload_runtime.cache.stream(layer, range(store.num_experts)))
        stats = model.offload_stats()
        stats.reset()
        generate_text(model, tok, ids, SamplingParams(max_new_tokens=tokens))
        d = stats.as_dict()
        return d["seconds_decode"] / max(1, d["tokens_decode"])
    finally:
        model.close()


def estimate_compute(store: Store, ram_bw: float) -> float:
    dense = (store.path / DENSE_FILE).stat().st_size
    return (dense + store.top_k * len(store.moe_layers) * store.blob_size) / ram_bw


def plan(store_path, ram: int, *, disk_read: float | None = None, trace=None, measure: bool = True,
         runtime: int = RUNTIME_BYTES) -> Plan:
    store = Store.open(store_path)
    fits, slots = cache_slots(store, ram, runtime)
    L, E, k, blob = len(store.moe_layers), store.num_experts, store.top_k, store.blob_size
    if trace is not None and fits:
        hit, source = trace_hit_rate(trace, slots), f"LRU on trace {trace}"
    else:
        hit, source = (slots / E if fits else 0.0), "slots / experts (no trace: routing without locality)"
    if disk_read is None:
        from ..bench.roofline import blob_bandwidth

        disk_read = blob_bandwidth(store, limit=min(256 << 20, L * E * blob))
    if disk_read <= 0:
        raise MoeOffloadError("the disk read bandwidth must be positive")
    if measure:
        compute, csource = measure_compute(store), "timed decode, every expert resident"
    else:
        from ..bench.roofline import ram_bandwidth

        compute, csource = estimate_compute(store, ram_bandwidth(256 << 20)), "bytes / RAM bandwidth"
    misses = (1 - hit) * k * L
    read = misses * blob / disk_read
    tps = 1 / (compute + read) if fits else 0.0
    return Plan(ram, (store.path / DENSE_FILE).stat().st_size, blob, L, E, k, fits, slots, slots * L * blob, hit,
                source, misses, compute, csource, disk_read, read, tps)
