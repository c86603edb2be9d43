"""`moe-offload trace` and `moe-offload simulate`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import MoeOffloadError


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise MoeOffloadError(f"no prompts file at {path}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise MoeOffloadError(f"{path} has no prompts (one per line)")
    return prompts


def cmd_trace(args) -> None:
    from ..options import load_kwargs
    from .recorder import record

    prompts = read_prompts(args.prompts)
    trace = record(args.store, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed, depth=args.depth, progress=not args.quiet, **load_kwargs(args))
    path = trace.save(args.out)
    live = trace.meta["live_stats"]
    print(f"{trace.num_tokens} tokens ({int(trace.decode.sum())} generated) x {trace.num_layers} MoE layers "
          f"written to {path} ({path.stat().st_size / 1024:.0f} KiB); live hit rate {live['hit_rate']:.3f}, "
          f"prefetch precision {live['prefetch_precision']:.3f}, recall {live['prefetch_recall']:.3f}", file=sys.stderr)


def cmd_simulate(args) -> None:
    from tqdm.auto import tqdm

    from .policies import POLICIES
    from .report import HEAD, format_row, grid, parse_ints, parse_names
    from .simulate import Steps, simulate
    from .trace_format import load_trace

    trace = load_trace(args.trace)
    steps = Steps(trace)
    E = trace.num_experts
    settings = grid(parse_names(args.policy, POLICIES, "policy"), parse_ints(args.slots, [max(trace.meta["top_k"], E // 2)]),
                    parse_names(args.scope, ("layer", "global"), "scope"), parse_ints(args.prefetch, [0]),
                    parse_ints(args.lookahead, [1]), args.window)
    started = time.perf_counter()
    results = [simulate(steps, s) for s in tqdm(settings, desc="simulating", unit="setting",
                                                disable=args.quiet or len(settings) < 4)]
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps([r.row() for r in results], indent=1))
    else:
        print(f"{trace.num_tokens} tokens ({int(trace.decode.sum())} generated), {trace.num_layers} MoE layers x "
              f"{E} experts, top-{trace.meta['top_k']}; {len(results)} setting(s) in {seconds:.1f} s")
        print(HEAD)
        for r in results:
            print(format_row(r))
    if args.plot:
        from .plots import all_plots

        paths = all_plots(trace, steps, parse_names(args.policy, POLICIES, "policy"),
                          parse_names(args.scope, ("layer", "global"), "scope")[0],
                          [k for k in parse_ints(args.prefetch, [1, 2]) if k > 0] or [1, 2], args.plot)
        print("plots: " + ", ".join(map(str, paths)), file=sys.stderr)


def add_parser(sub) -> None:
    from ..options import add_budget_args

    p = sub.add_parser("trace", help="record which experts each token routes to, and the prefetcher's guesses",
                       description="Generate from each prompt (plain text, one per line) and record, per token and "
                       "MoE layer, the selected experts and weights, the ranking every later layer's router gives "
                       "on that hidden state (the prefetcher's guess for any K), and the live prefetcher's guesses. "
                       "The .npz format is described in moe_offload/routing/trace_format.py and the README.")
    p.add_argument("store")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed+i (default 0)")
    p.add_argument("--depth", type=int, default=3, help="lookahead layers whose guesses are recorded (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_budget_args(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("simulate", help="replay a trace through cache policies: hit rate, bytes, prefetch accuracy",
                       description="Replay a routing trace through a model of the expert cache for every "
                       "combination of the given settings; Belady (offline optimal) bounds what any policy "
                       "can reach. Comma-separated lists, e.g. --slots 2,4,6 --policy lru,belady.")
    p.add_argument("trace", help="a trace written by `moe-offload trace`")
    p.add_argument("--slots", help="cache slots per MoE layer (default: half the experts)")
    p.add_argument("--policy", default="lru,lfu,lfru,belady", help="lru, lfu, lfru, belady (default all)")
    p.add_argument("--scope", default="layer", help="layer, global or both (default layer)")
    p.add_argument("--prefetch", help="experts guessed per token and layer; 0 is off (default 0)")
    p.add_argument("--lookahead", help="layers ahead to guess (default 1)")
    p.add_argument("--window", type=int, default=16, help="lfru's window in steps (default 16)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="DIR", help="also write PNG plots into DIR")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_simulate)
