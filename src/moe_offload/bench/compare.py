"""What the modes' numbers say side by side: tokens equal to the references', and the issue's targets."""
from __future__ import annotations

from .mode import LONG_PREFILL


def _compare_tokens(results: dict) -> None:
    """For every mode, the share of its tokens equal to the reference's before the first difference
    (transformers: the fp model; resident: the same quantized weights without offloading)."""
    for ref in ("transformers", "resident"):
        if ref not in results:
            continue
        for r in results.values():
            same = total = 0
            for mine, theirs in zip(r["tokens"], results[ref]["tokens"]):
                n = min(len(mine), len(theirs))
                k = next((i for i in range(n) if mine[i] != theirs[i]), n)
                same, total = same + k, total + n
            r[f"match_{ref}"] = round(same / total, 4) if total else None


def targets(results: dict, manifest: dict | None = None, memory_limited: bool = False) -> list[dict]:
    """The issues' targets, from this run's numbers (only those whose modes ran), and the store's
    conversion time as its manifest recorded it. With llama.cpp in the run, issue #11's ratios to it
    and its 70% of the roofline (under a memory limit: offload decode >= 2x llama.cpp's)."""
    out = []

    def ratio(a: str, b: str, key: str = "decode_tokens_per_s"):
        if a in results and b in results and results[b][key]:
            return results[a][key] / results[b][key]
        return None

    def add(name, value, goal, unit="x"):
        if value is not None:
            met = value <= goal if unit == "min" else value >= goal
            out.append({"target": name, "value": round(value, 3), "goal": goal, "met": met, "unit": unit})

    if "resident" in results:
        add("resident decode / its roofline", results["resident"]["roofline_ratio"], 0.5, "ratio")
    add("offload / accelerate decode", ratio("offload", "accelerate"), 3.0)
    add("offload / no-cache decode", ratio("offload", "no-cache"), 1.3)
    add("offload / lru-only decode (prefetch gain; paper 1.05-1.34)", ratio("offload", "lru-only"), 1.0)
    for mode in ("offload", "resident"):
        if mode in results and results[mode]["decode_tokens_per_s"]:
            add(f"{mode} prefill ({LONG_PREFILL} tokens) / decode",
                results[mode]["long_prefill_tokens_per_s"] / results[mode]["decode_tokens_per_s"], 10.0)
    if "llamacpp" in results:
        if not memory_limited:
            add("resident decode / llama.cpp decode", ratio("resident", "llamacpp"), 1.0)
            if "resident" in results:  # the in-RAM comparison's own bar (issue #11), beside issue #4's above
                add("resident decode / its roofline, beside llama.cpp", results["resident"]["roofline_ratio"], 0.7,
                    "ratio")
            add(f"resident prefill / llama.cpp prefill ({LONG_PREFILL} tokens)",
                ratio("resident", "llamacpp", "long_prefill_tokens_per_s"), 1.0)
        else:
            add("offload decode / llama.cpp decode under the memory limit", ratio("offload", "llamacpp"), 2.0)
    if manifest and manifest.get("convert_seconds") is not None and manifest["quant"]["expert_bits"] == 4:
        workers = manifest.get("convert_workers", 1)
        add(f"conversion at 4-bit experts ({workers} worker(s), "
            f"{manifest.get('convert_seconds_per_expert', '?')} s/expert)", manifest["convert_seconds"] / 60, 10.0, "min")
    return out
