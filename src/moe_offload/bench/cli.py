"""The `bench` subcommand: its options, their checks, and the models --shape builds."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .mode import MODES, PROMPTS
from .report import format_report, plot


def add_parser(sub) -> None:
    from ..options import add_budget_args

    p = sub.add_parser(
        "bench", help="benchmark offloading modes side by side against accelerate and transformers",
        description="Run the seed protocol (4 chat prompts, greedy) in several modes side by side, each in "
        "its own process with a cold page cache, and print prefill/decode tokens/s, peak RSS, cache hit "
        "rate, prefetch precision/recall, bytes read from disk and stall time, next to a roofline built from "
        "the measured RAM and disk bandwidth.",
        epilog="Modes: " + ", ".join(MODES) + ", and llamacpp with --gguf. Example: moe-offload bench --shape quarter --json bench.json")
    p.add_argument("store", nargs="?", help="a store made by `moe-offload convert` (or use --shape)")
    p.add_argument("--shape", choices=["tiny", "small", "quarter", "qwen3-quarter"],
                   help="build a random model of this shape (quarter = Mixtral-8x7B at a quarter of its width; "
                   "qwen3-quarter = Qwen3-30B-A3B at a quarter of its width: 128 experts, top-8), "
                   "convert it with 4-bit experts and 4-bit dense weights, and benchmark it")
    p.add_argument("--dir", default=".bench", help="where --shape keeps its models, reused across runs "
                   "(default .bench)")
    p.add_argument("--source", help="the Hugging Face checkpoint the store came from, for the accelerate and "
                   "transformers modes (default: the one recorded in the store, if it still exists)")
    p.add_argument("--modes", nargs="+", metavar="MODE", help=f"modes to run, in order (default: all of "
                   f"{', '.join(MODES)}; commas work too)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), metavar="N",
                   help=f"how many of the {len(PROMPTS)} seed prompts to run (default {len(PROMPTS)})")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens generated per prompt "
                   "(exactly N: end-of-sequence is suppressed so every mode decodes the same count; default 128)")
    p.add_argument("--accelerate-tokens", type=int, default=8, metavar="N",
                   help="tokens per prompt in accelerate mode, which reads every offloaded weight for every token "
                   "(default 8)")
    add_budget_args(p, auto=False)  # the modes compare fixed budgets (default: a quarter of the experts)
    p.add_argument("--in-process", action="store_true", help="run every mode in this process: faster to start, "
                   "but peak RSS then also holds what earlier modes left behind")
    p.add_argument("--no-plan", action="store_true", help="skip the prediction of each mode's decode speed "
                   "(moe-offload plan's model) that is printed next to the measured one")
    p.add_argument("--gguf", metavar="FILE", help="a GGUF of the same model: adds a llamacpp column, llama.cpp's "
                   "own llama-bench on FILE with the same thread count, a prompt of the long prefill's length "
                   "and --max-new-tokens generated tokens, and each mode's ratio to it")
    p.add_argument("--llama-bench", metavar="PATH", help="the llama-bench binary for --gguf (default: the one on "
                   "PATH)")
    p.add_argument("--llama-bench-args", metavar="ARGS", default="", help="more arguments for llama-bench, "
                   "one string, e.g. '--repack 0' or '-r 5' (they come last, so they win)")
    p.add_argument("--memory-limit", metavar="SIZE", help="run every mode (llama.cpp too) in a memory cgroup "
                   "of SIZE, e.g. 1.5GB, page cache counted: a child of this process's cgroup (v1 or v2; "
                   "fails clearly where the system does not allow it). A mode killed for memory is reported "
                   "as such and the others still run")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="draw bars per mode into FILE.png (needs matplotlib)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    import shlex

    from ..config import parse_size
    from ..options import load_kwargs
    from ..errors import MoeOffloadError
    from .llamacpp import LLAMACPP, find_llama_bench
    from .run import run_bench

    modes = parse_modes(args.modes)
    llamacpp = None
    if args.gguf:
        if not Path(args.gguf).is_file():
            raise MoeOffloadError(f"--gguf {args.gguf}: no such file")
        llamacpp = dict(binary=find_llama_bench(args.llama_bench), gguf=args.gguf,
                        extra_args=shlex.split(args.llama_bench_args))
        if LLAMACPP not in modes:
            modes.append(LLAMACPP)
    elif LLAMACPP in modes:
        raise MoeOffloadError("the llamacpp mode needs a GGUF of the model: pass --gguf FILE")
    elif args.llama_bench or args.llama_bench_args:
        raise MoeOffloadError("--llama-bench and --llama-bench-args go with --gguf FILE")
    cgroup_limit = parse_size(args.memory_limit) if args.memory_limit else None
    if args.plot:
        _require_matplotlib()
    if args.prompts < 1 or args.prompts > len(PROMPTS):
        raise MoeOffloadError(f"--prompts must be between 1 and {len(PROMPTS)}, got {args.prompts}")
    if args.max_new_tokens < 1 or args.accelerate_tokens < 1:
        raise MoeOffloadError("--max-new-tokens and --accelerate-tokens must be at least 1")
    if args.shape and args.store:
        raise MoeOffloadError("give either a STORE or --shape, not both")
    if not args.shape and not args.store:
        raise MoeOffloadError("give a STORE to benchmark, or --shape tiny|small|quarter to build one")
    if "accelerate" in modes:
        _require("accelerate", "the accelerate mode needs accelerate: pip install 'accelerate>=1.0,<2'")

    if args.shape:
        source, store = prepare_shape(args.shape, Path(args.dir))
    else:
        store, source = Path(args.store), None
    source = Path(args.source) if args.source else source
    results = run_bench(store, source, modes, explicit_modes=args.modes is not None, prompts=args.prompts,
                        max_new_tokens=args.max_new_tokens, accelerate_tokens=args.accelerate_tokens,
                        load_kwargs=load_kwargs(args), in_process=args.in_process, shape=args.shape,
                        llamacpp=llamacpp, cgroup_limit=cgroup_limit,
                        forecast=not args.no_plan)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def parse_modes(given: list[str] | None) -> list[str]:
    from ..errors import MoeOffloadError

    if not given:
        return list(MODES)
    from .llamacpp import LLAMACPP

    modes = [m.strip() for item in given for m in item.split(",") if m.strip()]
    unknown = [m for m in modes if m not in (*MODES, LLAMACPP)]
    if unknown or not modes:
        raise MoeOffloadError(f"unknown mode {', '.join(unknown) or '(none)'}: choose from {', '.join(MODES)} "
                              f"(and {LLAMACPP}, with --gguf)")
    return list(dict.fromkeys(modes))  # keep the order, drop repeats


def _require(module: str, message: str) -> None:
    import importlib.util

    from ..errors import MoeOffloadError

    if importlib.util.find_spec(module) is None:
        raise MoeOffloadError(message)


def _require_matplotlib() -> None:
    _require("matplotlib", "--plot needs matplotlib: pip install 'matplotlib>=3.7,<4' "
             "(or pip install 'moe-offload[bench]')")


def prepare_shape(shape: str, root: Path) -> tuple[Path, Path]:
    """Build (or reuse) a random model of a named shape and its 4-bit store under root/shape."""
    from .. import convert
    from ..synthetic import build_shape

    source, store = root / shape / "source", root / shape / "store-e4-d4"
    if not (source / "config.json").is_file():
        print(f"building a random model of shape {shape!r} in {source} ...", file=sys.stderr)
        started = time.perf_counter()
        partial = source.with_name(source.name + ".partial")  # renamed when complete: a crash leaves no half model
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        build_shape(partial, shape, seed=0)
        os.rename(partial, source)
        print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not _current_store(store):
        print(f"converting it into {store} (4-bit experts, 4-bit dense) ...", file=sys.stderr)
        started = time.perf_counter()
        convert(source, store, expert_bits=4, dense_bits=4, overwrite=True)
        print(f"converted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return source, store


def _current_store(store: Path) -> bool:
    """A finished store in this version's format (an older one is converted again, not refused)."""
    from ..store import FORMAT_VERSION, MANIFEST

    try:
        return json.loads((store / MANIFEST).read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False
