"""Options shared by several commands (generate, chat, serve, bench): below the commands, so that
the engine and every command can use them without importing the CLI."""
from __future__ import annotations

import argparse

from .config import DEFAULT_PREFETCH


def add_budget_args(p: argparse.ArgumentParser, auto: bool = True) -> None:
    """The cache and prefetch options shared by generate, chat, serve and bench. `auto`: the cache
    defaults to --expert-cache auto; bench passes False, its modes compare fixed budgets."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--expert-cache", metavar="SIZE", default="auto" if auto else None,
                        help="byte budget of the expert cache, e.g. 2GiB, or auto: as many experts as the memory "
                        "available allows (the memory cgroup's limit or MemAvailable, less the dense part, a "
                        "runtime reserve and a 5%% margin; the choice is printed) " +
                        ("(default auto)" if auto else "(default: a quarter of the experts)"))
    budget.add_argument("--experts-per-layer", type=int, metavar="K", help="experts cached per layer")
    p.add_argument("--prefetch", type=int, default=None, metavar="K",
                   help=f"experts guessed ahead per layer; 0 turns speculative loading off (default "
                   f"{DEFAULT_PREFETCH}, or 0 when the cache holds every expert: nothing is left to load ahead)")
    p.add_argument("--lookahead", type=int, default=1, help="layers ahead to guess (default 1)")
    p.add_argument("--cache-scope", choices=["layer", "global"], default="layer",
                   help="one LRU pool per layer (the paper) or one global pool (default layer)")
    p.add_argument("--policy", choices=["lru", "lfu"], default="lru",
                   help="eviction: least recently or least frequently used (default lru)")
    # The GPU tier (README, "GPU tier"): --expert-cache is then the VRAM budget.
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N]: dense part, KV cache and expert cache "
                   "on the GPU, --expert-cache then being the VRAM budget (default cpu)")
    p.add_argument("--host-cache", metavar="SIZE", help="byte budget of a host-RAM cache of experts between "
                   "the disk and the expert cache (pinned on a GPU), e.g. 8GiB (default: none)")


def load_kwargs(args) -> dict:
    # --experts-per-layer replaces the default auto budget (argparse's mutual exclusion only sees given flags)
    expert_cache = None if args.experts_per_layer is not None and args.expert_cache == "auto" else args.expert_cache
    return dict(expert_cache=expert_cache, experts_per_layer=args.experts_per_layer,
                prefetch=args.prefetch, lookahead=args.lookahead, cache_scope=args.cache_scope,
                policy=getattr(args, "policy", "lru"), **_tier_kwargs(args))


def _tier_kwargs(args) -> dict:
    """--device and --host-cache, passed only when given (callers' defaults stay theirs)."""
    out = {}
    if getattr(args, "device", "cpu") != "cpu":
        out["device"] = args.device
    if getattr(args, "host_cache", None) is not None:
        out["host_cache"] = args.host_cache
    return out


def announce_cache(model) -> None:
    """Say on stderr how `--expert-cache auto` sized the cache (nothing for explicit budgets)."""
    import sys

    choice = model.offload_stats().cache_choice
    if choice:
        print(choice, file=sys.stderr, flush=True)


def announce_preload(model) -> None:
    """Read every expert into a cache that holds them all (OffloadRuntime.preload) and say so on
    stderr, with what it read and how long it took."""
    import sys
    import time

    from .config import format_size

    rt, started = model.offload_runtime, time.perf_counter()
    if rt.preload():
        size = rt.store.blob_size * rt.store.num_experts * len(rt.store.moe_layers)
        print(f"every expert read into the cache ({format_size(size)} in {time.perf_counter() - started:.1f} s)",
              file=sys.stderr, flush=True)
