"""`moe-offload reference`: train the reference model (what `make reference` runs)."""
from __future__ import annotations

import json
import sys


def cmd_reference(args) -> None:
    from .model import default_dir
    from .train import train

    if args.write_held_out or args.write_prompts:
        from . import corpus

        _, held = corpus.load_split()
        for path, lines in ((args.write_held_out, held), (args.write_prompts, corpus.prompts(held))):
            if path:
                with open(path, "w", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
                print(f"{len(lines)} lines written to {path}", file=sys.stderr)
        return
    out = args.out or default_dir()
    report = train(out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   threads=args.threads, progress=not args.quiet)
    print(json.dumps(report, indent=1))
    print(f"reference model written to {out}", file=sys.stderr)


def add_parser(sub) -> None:
    p = sub.add_parser("reference", help="train the reference MoE (a small Mixtral) on the King James Bible",
                       description="Train the reference Mixtral-architecture MoE (4 layers, 8 experts, top-2) on "
                       "the King James Bible from the Debian package bible-kjv-text, every 20th chapter held out. "
                       "Seeded and resumable: OUT/train_state.pt is saved every 50 steps and picked up again.")
    p.add_argument("--out", help="where to write the model (default: the package's data/reference)")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--write-held-out", metavar="FILE", help="only write the held-out chapters (one per line) to FILE")
    p.add_argument("--write-prompts", metavar="FILE", help="only write the first 8 words of each held-out chapter "
                   "(prompts for `moe-offload trace`) to FILE")
    p.set_defaults(func=cmd_reference)
