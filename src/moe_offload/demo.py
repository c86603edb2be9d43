"""`make demo`: the trained reference MoE (shipped in the package) converted with 4-bit experts, run
with half of its experts cached next to a run with all of them resident. Without the reference
checkpoint it falls back to a random Mixtral of a few hundred MB with a quarter of its experts cached."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import format_size

PROMPT = "Write the recipe for a chicken curry with coconut milk."
REFERENCE_PROMPT = "And it came to pass, when the king heard"
ROWS = [("decode tok/s", "decode_tokens_per_s", "{:.2f}"), ("prefill tok/s", "prefill_tokens_per_s", "{:.1f}"),
        ("hit rate", "hit_rate", "{:.3f}"), ("prefetch precision", "prefetch_precision", "{:.3f}"),
        ("prefetch recall", "prefetch_recall", "{:.3f}"), ("stall s", "stall_seconds", "{:.3f}"),
        ("cache slots", "cache_slots", "{}")]


def run_demo(workdir: str | Path = ".demo", max_new_tokens: int = 48) -> dict:
    from . import convert
    from .generate import generate_once
    from .store import Store
    from .reference import available, default_dir
    from .synthetic import build_random_mixtral

    workdir = Path(workdir)
    trained = available()
    if trained:
        src, store = default_dir(), workdir / "store-reference-4bit"
        prompt, chat = REFERENCE_PROMPT, False  # trained on plain text, not on a chat format
    else:
        src, store = workdir / "mixtral-small-random", workdir / "store-4bit"
        prompt, chat = PROMPT, True
    if not trained and not (src / "config.json").is_file():
        print(f"building a random Mixtral-architecture model (shape 'small') in {src} ...", file=sys.stderr)
        build_random_mixtral(src, "small", seed=0)
    if not (store / "manifest.json").is_file():
        started = time.perf_counter()
        convert(src, store, expert_bits=4, dense_bits=4, overwrite=True)
        print(f"converted in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    st = Store.open(store)
    experts = st.num_experts
    runs = {}
    offloaded = (("offloaded (1/2 of experts cached)", {"experts_per_layer": experts // 2}) if trained
                 else ("offloaded (1/4 of experts cached)", {}))
    for name, kwargs in (offloaded,
                         ("all experts resident", {"experts_per_layer": experts, "prefetch": 0})):
        print(f"\n=== {name} ===", file=sys.stderr)
        runs[name] = generate_once(store, prompt, chat=chat, max_new_tokens=max_new_tokens, echo_prompt=not chat,
                                   **kwargs)
        print(file=sys.stderr)
    if trained:
        print(f"\n(the reference MoE, trained on the King James Bible: {src})\n")
    else:
        print("\n(the weights are random, so the text is gibberish; the numbers are what matter)\n")
    names = list(runs)
    width = max(len(r[0]) for r in ROWS) + 2
    print(" " * width + "".join(f"{n:>36}" for n in names))
    def cell(stats, key, fmt):  # no guesses, no precision or recall to show
        return "-" if key.startswith("prefetch_") and not stats["prefetch_guesses"] else fmt.format(stats[key])

    for label, key, fmt in ROWS:
        print(f"{label:<{width}}" + "".join(f"{cell(runs[n]['stats'], key, fmt):>36}" for n in names))
    for label, fn in (("MiB read from disk", lambda s: f"{sum(s['bytes_read'].values()) / 2**20:.1f}"),
                      ("peak RSS", lambda s: format_size(s["peak_rss_bytes"]))):
        print(f"{label:<{width}}" + "".join(f"{fn(runs[n]['stats']):>36}" for n in names))
    same = runs[names[0]]["text"] == runs[names[1]]["text"]
    print(f"\nsame text from both runs (greedy): {same}; expert blob {format_size(st.blob_size)}, "
          f"{st.num_layers} layers x {experts} experts")
    return runs
