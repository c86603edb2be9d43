"""The single command-line entry point: each subcommand only calls the public API."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import MoeOffloadError
from .options import add_budget_args, load_kwargs


def cmd_convert(args) -> None:
    from . import convert

    path = convert(args.src, args.dst, expert_bits=args.expert_bits, dense_bits=args.dense_bits,
                   group_size=args.group_size, overwrite=args.force, progress=not args.quiet,
                   workers=args.workers, expert_format=args.expert_format)
    print(f"store written to {path}", file=sys.stderr)


def cmd_verify(args) -> None:
    from tqdm.auto import tqdm

    from .store import Store

    store = Store.open(args.store)
    with tqdm(total=store.num_layers * store.num_experts, unit="expert", desc="verifying") as bar:
        store.verify(progress=bar.update)
    print(f"{args.store}: all {store.num_layers * store.num_experts} expert blobs and the dense weights check out")


def cmd_generate(args) -> None:
    from .generate import generate_once

    result = generate_once(args.store, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           stream=not args.json, **load_kwargs(args))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("\n\n" + result["summary"], file=sys.stderr)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.dir, max_new_tokens=args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="moe-offload", description="Run Mixture-of-Experts models with "
                                     "offloaded experts, a budgeted expert cache and speculative prefetch.")
    parser.add_argument("--version", action="version", version=f"moe-offload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint into a store",
                       description="Convert a Hugging Face MoE checkpoint folder (config.json + safetensors) "
                       "into a store: quantized dense part, one aligned blob per expert.")
    p.add_argument("src", help="checkpoint folder")
    p.add_argument("dst", help="store folder to create")
    p.add_argument("--expert-bits", type=int, choices=[2, 3, 4, 8, 16], default=4,
                   help="bits per expert weight; 16 keeps the source dtype (default 4)")
    p.add_argument("--dense-bits", type=int, choices=[4, 8, 16], default=4,
                   help="bits per weight of attention projections and lm_head (default 4)")
    p.add_argument("--group-size", type=int, help="quantization group size (default: 64; 16 for 2-bit; 8-bit: per output channel)")
    p.add_argument("--expert-format", choices=["auto", "rowtile", "int4pack"], default="auto",
                   help="auto (default): the fastest format for each shape on this CPU, i.e. rowtile for 3/4-bit "
                   "matrices where the CPU has VNNI; rowtile: int8 activations on integer dot products, one call "
                   "per MoE layer at decode, for the experts on any CPU; int4pack: no rowtile anywhere (torch's "
                   "int4 op with bf16 activations, experts and dense part)")
    p.add_argument("--workers", type=int, help="matrices quantized at once, one thread each (default: one per "
                   "core, as many as fit in half the free memory); the store is the same whatever the number")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text from a prompt, then print the statistics",
                       description="Generate text, streaming tokens as they come, then print tokens/s, "
                       "cache hit rate, prefetch accuracy, bytes read and peak memory.")
    p.add_argument("store")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object with text and statistics")
    add_budget_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("verify", help="check every checksum of a store",
                       description="Check the dense weights and every expert blob against the manifest.")
    p.add_argument("store")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="convert the shipped reference MoE and generate with offloaded experts",
                       description="The built-in demonstration: the shipped reference MoE (trained on the King "
                       "James Bible) converted with 4-bit experts, run with half of the experts cached next to a "
                       "run with all experts resident (without the reference checkpoint: a random Mixtral of a "
                       "few hundred MB with a quarter of the experts cached).")
    p.add_argument("--dir", default=".demo", help="where to keep the model and the store (default .demo)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)

    from . import bench, chat, evaluate, plan, reference, routing, server  # their own modules: each adds its subcommand

    for mod in (server, chat, bench, reference, routing, evaluate, plan):
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MoeOffloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit now: worker threads still finishing a matrix would otherwise hold the process open.
        os._exit(130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
