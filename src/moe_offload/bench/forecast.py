"""What `moe-offload plan` predicts for each of our modes, made before they run, to print next to
what they measure.

One timed decode with every expert resident gives the compute per token and a routing trace;
each mode's expected hit rate is the simulator's on that trace at the mode's cache size (resident:
every expert; no-cache: none), and its reads go at the disk's measured blob-read bandwidth. The
plan predicts for prefetch off, so `offload` gets the same prediction as `lru-only`.
"""
from __future__ import annotations

import gc

from ..plan.predict import decode_rate, time_decode, trace_hit_rate


def forecast_modes(st, modes: list[str], load_kwargs: dict, disk_read: float) -> dict[str, dict]:
    from .mode import OURS
    from .run import cache_slots_per_pool

    ours = [m for m in modes if m in OURS]
    if not ours or disk_read <= 0:
        return {}
    timing = time_decode(st)
    gc.collect()
    policy = load_kwargs.get("policy") or "lru"
    scope = load_kwargs.get("cache_scope") or "layer"
    out = {}
    for mode in ours:
        if mode == "resident":
            hit = 1.0
        elif mode == "no-cache":
            hit = 0.0  # every use is read: the pools are emptied after each layer
        else:
            hit = trace_hit_rate(timing.steps, cache_slots_per_pool(st, load_kwargs), policy, scope)
        misses, read, tps = decode_rate(st, hit, timing.seconds_per_token, disk_read)
        out[mode] = {"decode_tokens_per_s": round(tps, 3), "hit_rate": round(hit, 4),
                     "compute_seconds_per_token": timing.seconds_per_token,
                     "read_seconds_per_token": read, "expert_reads_per_token": misses}
    return out


def attach(results: dict[str, dict], forecast: dict[str, dict]) -> None:
    """Each mode's prediction and measured / predicted decode tokens/s."""
    for mode, f in forecast.items():
        r = results.get(mode)
        if r is None:
            continue
        r["plan"] = f
        r["plan_decode_tokens_per_s"] = f["decode_tokens_per_s"]
        r["plan_hit_rate"] = f["hit_rate"]
        measured = r.get("decode_tokens_per_s")
        r["measured_over_plan"] = round(measured / f["decode_tokens_per_s"], 3) if measured else None
