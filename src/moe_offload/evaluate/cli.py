"""`moe-offload eval`: held-out perplexity of a store, or the fidelity table of a checkpoint."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MoeOffloadError


def cmd_eval(args) -> None:
    from .perplexity import read_text, store_perplexity

    text = read_text(args.text)
    path = Path(args.model)
    if args.table:
        from .fidelity import fidelity_table

        if not (path / "config.json").is_file():
            raise MoeOffloadError(f"--table needs a Hugging Face checkpoint folder; {path} has no config.json")
        table = fidelity_table(path, text, window=args.window, max_tokens=args.max_tokens, progress=not args.quiet)
        if args.json:
            print(json.dumps(table, indent=1))
            return
        print(f"held-out perplexity of {path} ({args.text}, windows of {args.window} tokens)\n")
        print("| experts | dense 16-bit | dense 4-bit |\n|---|---|---|")
        for e in (16, 8, 4, 3, 2):
            cells = [table["stores"].get(f"experts {e}-bit, dense {d}-bit") for d in (16, 4)]
            print(f"| {e}-bit | " + " | ".join(f"{c:.3f}" if c else "-" for c in cells) + " |")
        print("\n| experts (dense 16-bit) | round-to-nearest | HQQ (ours) |\n|---|---|---|")
        for b in (4, 3, 2):
            print(f"| {b}-bit | {table['quantizers'][f'rtn {b}-bit']:.3f} | {table['quantizers'][f'hqq {b}-bit']:.3f} |")
        return
    if not (path / "manifest.json").is_file():
        raise MoeOffloadError(f"{path} is not a store (no manifest.json); for a checkpoint, pass --table")
    result = store_perplexity(path, text, window=args.window, max_tokens=args.max_tokens, progress=not args.quiet)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{path}: perplexity {result['perplexity']:.3f} over {result['tokens']} tokens")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a store on a text; --table: the fidelity table of a checkpoint",
                       description="Perplexity over consecutive windows of a text (one document per line, "
                       "joined by the end-of-sequence token), every expert resident. With --table, MODEL is a "
                       "checkpoint: it is converted at 16/8/4/3/2-bit experts with 16- and 4-bit dense weights "
                       "and each store evaluated, then our HQQ is compared with plain round-to-nearest.")
    p.add_argument("model", help="a store (or, with --table, a Hugging Face checkpoint folder)")
    p.add_argument("--text", required=True, help="text file to evaluate on (e.g. the reference model's held-out split)")
    p.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--max-tokens", type=int, help="evaluate on at most this many tokens")
    p.add_argument("--table", action="store_true", help="the fidelity table (MODEL is a checkpoint)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
