"""PNG plots of a trace and its simulations (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .simulate import Setting, Steps, simulate
from .trace_format import Trace


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def hit_rate_vs_slots(steps: Steps, policies, scope: str, out: Path) -> Path:
    plt = _plt()
    E, k = steps.trace.num_experts, steps.trace.meta["top_k"]
    sizes = list(range(k, E + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in sorted(policies, key=lambda p: p != "belady"):
        rates = [simulate(steps, Setting(policy, n, scope)).hit_rate for n in sizes]
        ax.plot(sizes, rates, marker="o", lw=2.5 if policy == "belady" else 1.5, label=policy)
    ax.set(xlabel="cache slots per MoE layer", ylabel="hit rate", ylim=(0, 1.02),
           title=f"expert cache hit rate ({scope} scope, no prefetch)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / "hit_rate_vs_slots.png")


def prefetch_vs_lookahead(steps: Steps, ks, out: Path) -> Path:
    plt = _plt()
    depth = steps.trace.lookahead_depth
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in ks:
        results = [simulate(steps, Setting("lru", steps.trace.num_experts, "layer", k, la)) for la in range(1, depth + 1)]
        ax.plot(range(1, depth + 1), [r.recall for r in results], marker="o", label=f"recall, K={k}")
        ax.plot(range(1, depth + 1), [r.precision for r in results], marker="s", ls="--", label=f"precision, K={k}")
    ax.set(xlabel="lookahead (layers)", ylabel="fraction", ylim=(0, 1.02), title="speculative guesses vs routing")
    ax.set_xticks(range(1, depth + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "prefetch_vs_lookahead.png")


def activation_heatmap(trace: Trace, out: Path, layers=None, tokens: int = 200) -> Path:
    plt = _plt()
    layers = list(range(min(trace.num_layers, 4))) if layers is None else layers
    decode = np.flatnonzero(trace.decode)[:tokens]
    idx = decode if len(decode) else np.arange(min(tokens, trace.num_tokens))
    fig, axes = plt.subplots(len(layers), 1, figsize=(9, 1.4 * len(layers) + 0.6), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        grid = np.zeros((trace.num_experts, len(idx)))
        for col, t in enumerate(idx):
            for e, w in zip(trace.experts[t, layer], trace.weights[t, layer]):
                grid[e, col] = float(w)
        ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
        ax.set_ylabel(f"layer {trace.meta['moe_layers'][layer]}\nexpert", fontsize=8)
    axes[-1, 0].set_xlabel("generated token")
    fig.suptitle("selected experts and routing weights over tokens", fontsize=10)
    return _save(fig, out / "activation_heatmap.png")


def expert_usage(trace: Trace, out: Path) -> Path:
    plt = _plt()
    counts = np.zeros((trace.num_layers, trace.num_experts))
    for layer in range(trace.num_layers):
        counts[layer] = np.bincount(trace.experts[:, layer].reshape(-1), minlength=trace.num_experts)
    share = counts / counts.sum(1, keepdims=True)
    fig, ax = plt.subplots(figsize=(6, 3 + 0.2 * trace.num_layers))
    im = ax.imshow(share, cmap="magma", aspect="auto")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"share of routed tokens (uniform = {1 / trace.num_experts:.3f})")
    fig.colorbar(im, ax=ax)
    return _save(fig, out / "expert_usage.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def all_plots(trace: Trace, steps: Steps, policies, scope: str, ks, out: str | Path) -> list[Path]:
    out = Path(out)
    return [hit_rate_vs_slots(steps, policies, scope, out), prefetch_vs_lookahead(steps, ks, out),
            activation_heatmap(trace, out), expert_usage(trace, out)]
