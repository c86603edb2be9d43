"""`moe-offload plan`: will it fit, how big a cache, what hit rate, how many tokens/s."""
from __future__ import annotations

import json

from ..config import format_size, parse_size
from ..errors import MoeOffloadError


def cmd_plan(args) -> None:
    from .predict import plan

    disk = parse_size(args.disk_read) if args.disk_read else None
    p = plan(args.store, parse_size(args.ram), disk_read=disk, trace=args.trace, measure=not args.no_measure)
    if args.json:
        print(json.dumps(p.as_dict(), indent=1))
        return
    print(f"RAM budget {format_size(p.ram)}: dense weights {format_size(p.dense_bytes)}, "
          f"{p.moe_layers} MoE layers x {p.num_experts} experts of {format_size(p.blob_size)}, top-{p.top_k}")
    if not p.fits:
        need = p.dense_bytes + p.top_k * p.moe_layers * p.blob_size
        raise MoeOffloadError(f"does not fit: the cache needs at least top-{p.top_k} experts per layer; "
                              f"that takes about {format_size(need)} plus the runtime")
    print(f"fits: cache of {p.slots_per_layer} experts per layer ({format_size(p.cache_bytes)}), "
          f"--experts-per-layer {p.slots_per_layer}")
    print(f"expected hit rate {p.hit_rate:.3f} ({p.hit_rate_source}); {p.misses_per_token:.2f} expert reads per token")
    print(f"compute {p.compute_seconds * 1000:.1f} ms/token ({p.compute_source}); reads "
          f"{p.read_seconds * 1000:.1f} ms/token at {format_size(p.disk_bytes_per_s)}/s")
    print(f"predicted decode: {p.decode_tokens_per_s:.2f} tokens/s (prefetch off)")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict whether a store fits a RAM budget, its cache size, hit rate and tokens/s",
                       description="Predict from the store's byte counts and measured bandwidths: whether the "
                       "model fits in --ram, how many experts per layer the cache gets, the expected hit rate "
                       "(from a trace if given, else from the routing of the timed decode) and decode tokens/s. Times "
                       "four 32-token chat turns (bench's seed prompts) with every expert resident, and measures how "
                       "fast expert blobs come back through the loader, a layer's misses at a time (unless "
                       "--disk-read).")
    p.add_argument("store")
    p.add_argument("--ram", required=True, help="memory for the whole process, e.g. 8GiB")
    p.add_argument("--disk-read", metavar="SPEED", help="disk read bandwidth per second, e.g. 2GB (default: measured through the loader)")
    p.add_argument("--trace", help="a routing trace (moe-offload trace) for the hit rate")
    p.add_argument("--no-measure", action="store_true", help="estimate compute from the RAM bandwidth instead of timing it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
