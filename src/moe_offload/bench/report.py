"""The bench's output: the table, the text report, the plot."""
from __future__ import annotations

from pathlib import Path

from .mode import LONG_PREFILL


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _num(fmt: str):
    return lambda v: "-" if v is None else fmt.format(v)


ROWS = [  # label, key, format
    ("decode tok/s", "decode_tokens_per_s", _num("{:.2f}")),
    ("prefill tok/s (prompts)", "prefill_tokens_per_s", _num("{:.1f}")),
    (f"prefill tok/s ({LONG_PREFILL} tokens)", "long_prefill_tokens_per_s", _num("{:.1f}")),
    ("tokens decoded", "decode_tokens", _num("{}")),
    ("peak RSS MiB", "peak_rss_bytes", _mib),
    ("  run peak: libraries MiB", "memory_baseline_bytes", _mib),  # the split of the prompts' peak RSS
    ("  run peak: dense part MiB", "memory_dense_bytes", _mib),
    ("  run peak: expert cache MiB", "memory_cache_bytes", _mib),
    ("  run peak: rest MiB", "memory_rest_bytes", _mib),
    ("hit rate", "hit_rate", _num("{:.3f}")),
    ("prefetch precision", "prefetch_precision", _num("{:.3f}")),
    ("prefetch recall", "prefetch_recall", _num("{:.3f}")),
    ("MiB read from disk", "disk_bytes_read", _mib),
    ("stall s", "stall_seconds", _num("{:.2f}")),
    ("RAM MiB / token", "ram_bytes_per_token", _mib),
    ("disk MiB / decode token", "decode_disk_bytes_per_token", _mib),
    ("disk MiB/s while decoding", "decode_disk_bytes_per_s", _mib),
    ("RAM GB/s around the mode", "roofline_ram_bytes_per_s", lambda v: "-" if v is None else f"{v / 1e9:.1f}"),
    ("roofline tok/s", "roofline_tokens_per_s", _num("{:.2f}")),
    ("% of roofline", "roofline_ratio", lambda v: "-" if v is None else f"{100 * v:.0f}%"),
    ("plan decode tok/s", "plan_decode_tokens_per_s", _num("{:.2f}")),
    ("plan hit rate", "plan_hit_rate", _num("{:.3f}")),
    ("measured / plan", "measured_over_plan", _num("{:.2f}")),
    ("tokens = transformers", "match_transformers", _num("{:.2f}")),
    ("tokens = resident", "match_resident", _num("{:.2f}")),
    ("decode / llama.cpp", "llamacpp_decode_ratio", _num("{:.2f}x")),
    (f"prefill ({LONG_PREFILL}) / llama.cpp", "llamacpp_prefill_ratio", _num("{:.2f}x")),
    ("peak MiB in the cgroup", "cgroup_peak_bytes", _mib),
]


def _cells(r: dict) -> list[str]:
    """A mode's column; one that did not finish says why in its first cell."""
    if r.get("failed"):
        return [r["failed"]] + ["-"] * (len(ROWS) - 1)
    notes = r.get("cell_notes") or {}
    return [notes.get(key) or fmt(r.get(key)) for _, key, fmt in ROWS]


def format_table(results: dict) -> str:
    """A Markdown table (readable as is in a terminal): one row per metric, one column per mode."""
    modes = results["modes"]
    columns = [_cells(r) for r in modes.values()]
    rows = [(label, [col[i] for col in columns]) for i, (label, key, _) in enumerate(ROWS)
            if i == 0 or any(key in r for r in modes.values())]
    header = ["", *modes]
    widths = [max(len(header[0]), *(len(label) for label, _ in rows))]
    widths += [max(len(m), *(len(vals[i]) for _, vals in rows)) for i, m in enumerate(modes)]

    def line(cells):
        return "| " + " | ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"]
    out += [line([label, *vals]) for label, vals in rows]
    return "\n".join(out)


def format_report(results: dict) -> str:
    from ..config import format_size

    m, s, roof = results["model"], results["settings"], results["roofline"]
    lines = [
        f"store {results['store']}: {m['moe_layers']} MoE layers x {m['experts']} experts (top-{m['top_k']}), "
        f"expert blob {format_size(m['expert_blob_bytes'])}, experts {m['quant']['expert_bits']}-bit, "
        f"dense {m['quant']['dense_bits']}-bit",
        f"{s['prompts']} prompt(s) x {s['max_new_tokens']} new tokens (accelerate: {s['accelerate_tokens']}), "
        f"greedy; expert cache {format_size(s['expert_cache_bytes'])}; accelerate's memory limit "
        f"{format_size(s['memory_limit_bytes'])} (dense part + expert cache); {s['isolation']}, "
        f"{s['torch_threads']} torch threads; load average {s['load_average'][0]:.1f} before, "
        f"{s['load_average'][1]:.1f} after",
        f"roofline: RAM read {roof['ram_bytes_per_s'] / 1e9:.1f} GB/s up front (torch sum, 1 GiB, 2 threads; measured "
        f"again after each mode, whose roofline takes the mean of the measures just before and after it), disk read "
        f"{roof['disk_bytes_per_s'] / 1e9:.2f} GB/s (the better of a cold sequential read of experts.bin, "
        f"{roof['disk_sequential_bytes_per_s'] / 1e9:.2f}, and cold expert blobs in random order on the loader's "
        f"threads, {roof['disk_blob_bytes_per_s'] / 1e9:.2f})",
    ]
    cg, llama = s.get("memory_cgroup"), s.get("llamacpp")
    if cg:
        lines.append(f"every mode in its own memory cgroup (v{cg['cgroup_version']}) limited to "
                     f"{cg['limit_bytes'] / 1e9:.2f} GB ({format_size(cg['limit_bytes'])}), page cache counted, "
                     f"swap {'capped too' if cg['swap_limited'] else 'not capped (the kernel does not let us)'}")
    if llama:
        lines.append(f"llamacpp: llama.cpp's llama-bench on {llama['gguf']['path']} "
                     f"({format_size(llama['gguf']['bytes'] or 0)}), {llama['threads']} threads, pp{llama['n_prompt']} "
                     f"(the {LONG_PREFILL}-token prefill row) and tg{llama['n_gen']} (decode), "
                     f"{llama['repetitions']} repetitions{' ' + ' '.join(llama['extra_args']) if llama['extra_args'] else ''}")
    lines += [
        "",
        format_table(results),
        "",
        "RAM MiB / token: weights a decode token reads from memory (dense part + top-k experts per layer);",
        "disk MiB / decode token: what the mode read from disk per decode token; roofline tok/s = 1 / (RAM "
        "bytes / RAM bandwidth around the mode + disk bytes / disk bandwidth);",
        "above 100% of the roofline, the disk delivered more while decoding than in the up-front measurement.",
    ]
    if any("plan" in r for r in results["modes"].values()):
        lines += ["plan: `moe-offload plan`'s prediction, made before each mode ran: the bench's turns timed with every "
                  "expert resident, plus the misses the simulator expects on their routing at each mode's cache size, "
                  "read at the rate blobs came back through the cache and loader, a layer's misses at a time, "
                  "sampled again just before the mode (prefetch off: offload = lru-only)."]
    if results["targets"]:
        lines += ["", "targets (issue #4" + ("; llama.cpp and memory limits: issue #11" if llama or cg else "") + "):"]
        for t in results["targets"]:
            if t["unit"] == "min":
                value, goal = f"{t['value']:.1f} min", f"<= {t['goal']:g} min"
            elif t["unit"] == "ratio":
                value, goal = f"{100 * t['value']:.0f}%", f">= {100 * t['goal']:.0f}%"
            else:
                value, goal = f"{t['value']:.2f}x", f">= {t['goal']:g}x"
            lines.append(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {value} (goal {goal})")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Bars per mode: decode and prefill tokens/s, and the share of each mode's roofline."""
    from .cli import _require_matplotlib  # here, not at the top: cli.py imports this module

    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    panels = [("decode tok/s", "decode_tokens_per_s", 1), (f"prefill tok/s ({LONG_PREFILL} tokens)",
              "long_prefill_tokens_per_s", 1), ("% of roofline (decode)", "roofline_ratio", 100)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, key, scale) in zip(axes, panels):
        values = [(results["modes"][m].get(key) or 0) * scale for m in modes]
        bars = ax.bar(modes, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35)
    fig.suptitle(f"moe-offload bench: {results.get('shape') or Path(results['store']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
