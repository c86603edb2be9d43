"""Record a routing trace while a loaded (offloaded) model generates.

Hooks, all read-only: the model's forward marks a new step; each MoE block's forward brackets its
router call, so the router hook records only the block's own routing (the prefetcher calls later
layers' routers from inside a block, and those calls are guesses, not routing); the norm before
each MoE block sees the hidden state the prefetcher guesses from, and every later layer's router
ranks all its experts on it; lm_head's logits give the first layer's guess for the next step.
The norms are also called by guesses (the prefetcher's and ours) on other hidden states; only the
forward pass's own calls count: one per MoE layer, in order, outside any MoE block.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from ..model import router_call
from .trace_format import VERSION, Trace


class TraceRecorder:
    def __init__(self, model, depth: int = 2):
        self.model = model
        rt = model.offload_runtime
        self.store = rt.store
        self.layers = list(self.store.moe_layers)
        self.depth = max(1, min(depth, len(self.layers) - 1)) if len(self.layers) > 1 else 1
        self.k, self.E = self.store.top_k, self.store.num_experts
        spec = model.offload_spec
        self.router_modules = {layer.index: model.get_submodule(layer.router) for layer in spec.layers}
        self.routers = {layer.index: router_call(model, layer) for layer in spec.layers}  # as their blocks call them
        self.norms = {layer.index: model.get_submodule(layer.norm) for layer in spec.layers}
        self.blocks = {layer.index: model.get_submodule(layer.router.rpartition(".")[0]) for layer in spec.layers}
        self.embed = model.get_input_embeddings()
        self.rows: list[dict] = []  # one per step
        self.live: list[list[int]] = []
        self.prompt = 0
        self._inside: int | None = None  # the MoE layer whose block is running
        self._expect = 0  # the MoE layer whose norm runs next in this step's forward
        self._busy = False  # inside one of our own router calls
        self._next_first: torch.Tensor | None = None  # layer 0's ranking for the next step
        self._handles = []
        self._install()
        if rt.prefetcher is not None:
            rt.prefetcher.listeners.append(self._on_guess)

    # ------------------------------------------------------------------ hooks

    def _install(self) -> None:
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._on_step, with_kwargs=True))
        for pos, i in enumerate(self.layers):
            block = self.blocks[i]
            h.append(block.register_forward_pre_hook(lambda m, a, pos=pos: setattr(self, "_inside", pos)))
            h.append(block.register_forward_hook(lambda m, a, o: setattr(self, "_inside", None)))
            h.append(self.router_modules[i].register_forward_hook(lambda m, a, o, pos=pos: self._on_route(pos, o)))
            h.append(self.norms[i].register_forward_pre_hook(lambda m, a, pos=pos: self._on_residual(pos, a[0])))
        h.append(self.model.get_output_embeddings().register_forward_hook(self._on_logits))

    def _on_step(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        T = ids.shape[-1]
        self._expect = 0
        first = np.full((T, self.E), -1, np.int8)
        decode = T == 1 and bool(self.rows) and self.rows[-1]["prompt"] == self.prompt
        if decode and self._next_first is not None:
            first[:] = self._next_first.numpy()
        self.rows.append(dict(prompt=self.prompt, decode=decode, token_ids=ids.reshape(-1).tolist(),
                              experts=np.zeros((T, len(self.layers), self.k), np.int16),
                              weights=np.zeros((T, len(self.layers), self.k), np.float16),
                              spec=np.full((T, len(self.layers), self.depth, self.E), -1, np.int8),
                              first=first))

    def _on_route(self, pos: int, output) -> None:
        if self._inside != pos or not self.rows:
            return  # a guess computed from another layer's hidden state, not this layer's routing
        _, weights, index = output
        row = self.rows[-1]
        row["experts"][:, pos] = index.reshape(-1, self.k).numpy()
        row["weights"][:, pos] = weights.reshape(-1, self.k).float().numpy()

    @torch.no_grad()
    def _on_residual(self, pos: int, residual: torch.Tensor) -> None:
        if self._busy or self._inside is not None or pos != self._expect or not self.rows:
            return  # a guess on some other hidden state, not the forward pass's own call
        self._expect += 1
        h = residual.reshape(-1, residual.shape[-1])
        row = self.rows[-1]
        self._busy = True
        try:
            for d in range(1, self.depth + 1):
                if pos + d >= len(self.layers):
                    break
                target = self.layers[pos + d]
                logits = self.routers[target](self.norms[target](h))
                logits = logits[0] if isinstance(logits, tuple) else logits
                row["spec"][:, pos, d - 1] = logits.float().argsort(-1, descending=True).numpy()
        finally:
            self._busy = False

    @torch.no_grad()
    def _on_logits(self, module, args, logits) -> None:
        token = logits[:, -1].argmax(-1)
        first = self.layers[0]
        self._busy = True
        try:
            out = self.routers[first](self.norms[first](self.embed(token)))
        finally:
            self._busy = False
        out = out[0] if isinstance(out, tuple) else out
        self._next_first = out.float().argsort(-1, descending=True)[0]

    def _on_guess(self, target: int, experts, read: bool) -> None:
        experts = list(experts)[: self.E]
        self.live.append([len(self.rows) - 1, self.layers.index(target), int(read), len(experts)]
                         + experts + [-1] * (self.E - len(experts)))

    # ------------------------------------------------------------------ result

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        pf = self.model.offload_runtime.prefetcher
        if pf is not None and self._on_guess in pf.listeners:
            pf.listeners.remove(self._on_guess)

    def trace(self, meta: dict) -> Trace:
        rows = self.rows
        steps = np.concatenate([np.full(len(r["token_ids"]), s, np.int32) for s, r in enumerate(rows)]) \
            if rows else np.zeros(0, np.int32)
        cat = lambda key, shape, dtype: (np.concatenate([r[key] for r in rows]) if rows
                                         else np.zeros((0, *shape), dtype))
        L = len(self.layers)
        return Trace(
            experts=cat("experts", (L, self.k), np.int16), weights=cat("weights", (L, self.k), np.float16),
            step=steps,
            prompt=np.concatenate([np.full(len(r["token_ids"]), r["prompt"], np.int32) for r in rows]) if rows else np.zeros(0, np.int32),
            decode=np.concatenate([np.full(len(r["token_ids"]), r["decode"]) for r in rows]) if rows else np.zeros(0, bool),
            token_ids=np.array([t for r in rows for t in r["token_ids"]], np.int32),
            spec_rank=cat("spec", (L, self.depth, self.E), np.int8), first_rank=cat("first", (self.E,), np.int8),
            live_guess=np.array(self.live, np.int16).reshape(-1, 4 + self.E),
            meta={"version": VERSION, "store": str(self.store.path), "num_experts": self.E, "top_k": self.k,
                  "moe_layers": self.layers, "blob_size": self.store.blob_size, **meta})


def record(store, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
           depth: int = 2, progress: bool = True, **load_kwargs) -> Trace:
    """Generate from each prompt (plain text, no chat template) and return the trace."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..engine import SamplingParams, generate_text
    from ..model import load

    model = load(store, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(store, local_files_only=True)
    recorder = TraceRecorder(model, depth)
    texts = []
    try:
        for i, prompt in enumerate(tqdm(prompts, desc="tracing", unit="prompt", disable=not progress)):
            recorder.prompt = i
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
            texts.append(generate_text(model, tokenizer, tokenizer(prompt).input_ids, params).text)
        stats = model.offload_stats().as_dict()
    finally:
        recorder.close()
        model.close()
    live = {k: stats[k] for k in ("hits", "misses", "hit_rate", "hits_per_layer", "misses_per_layer",
                                  "prefetch_precision", "prefetch_recall", "cache_slots")}
    return recorder.trace({"load": {k: v for k, v in load_kwargs.items()}, "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "seed": seed, "live_stats": live,
                           "texts": texts[:50]})
