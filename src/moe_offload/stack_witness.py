"""What a stacked token's eligibility check read, kept to see on the next token that none of it changed.

StackRunner._inputs walks every decoder layer before each token: flags, hooks, the tensors each
kernel path planned from, the experts' table, the KV buffers. Most of that is Python objects that
the previous token's weights pushed out of the CPU's caches, so the walk cost ~20 µs a layer in
decode (0.57-0.77 ms a token on the quarter shape, 1.1-1.3 on qwen3-quarter), about three times
its cost in a loop. After a walk that passed, this keeps the objects it read, as flat lists; the
next token checks them with a few list passes (0.31-0.34 ms on quarter) and walks again on any
difference. Every condition of the walk has its check here:

- the token's own (its shape, mask, global hooks, the attention's inputs): checked by the caller
  and by the first layer's `_ready`, as the walk does;
- per layer, the flags the walk asks for (verified, fused, a plain MoE block, not training);
- every hook dictionary the walk finds empty (torch mutates these in place; it replaces them only
  in a module's __init__/__setstate__);
- the tensors the kernels read: the attention plan still current, the norms' and the router's
  weights still the parameters they were read from;
- the experts' resident table, still read at the cache's change count, with no prefetcher or
  hybrid tier since;
- each layer's KV buffer still the cache layer's (kv_buffer.current), all at the same length.
"""
from __future__ import annotations

from typing import NamedTuple

from . import kv_buffer


class Witness(NamedTuple):
    kv_cache: object  # the token's cache object
    expert_cache: object
    changes: int  # the expert cache's change count the tables were read at
    layers: list  # stack_decode._Layer, as the walk built them
    hook_dicts: list  # every forward (pre-)hook dictionary that must stay empty
    verified: list  # decode paths whose .verified must stay True
    paths: list  # the layer paths (fused, plain_block)
    modules: list  # the decoder layer modules (not training)
    runtimes: list  # the experts' runtimes (no prefetcher, no hybrid tier)
    plans: list  # (attention path, its plan)
    norms: list  # (norm path, the weight array the walk got)
    routers: list  # (router path, the arrays the walk got)
    kv: list  # (the layer's index in the cache, the cache layer, its KV buffer, the experts, their table)

    @classmethod
    def of(cls, kv_cache, layers: list, changes: int) -> "Witness":
        hook_dicts, verified = [], []
        for s in layers:
            p = s.path
            for m in (p.module, p.n1, p.attn, p.n2, p.mlp, p.router, p.experts):
                hook_dicts += [m._forward_hooks, m._forward_pre_hooks]
            verified += [p, p.attn._decode_path, p.n1._decode_path, p.n2._decode_path, p.router._decode_path]
        runtimes = list({id(s.experts.runtime): s.experts.runtime for s in layers}.values())
        return cls(kv_cache, layers[0].experts.runtime.cache, changes, layers, hook_dicts, verified,
                   [s.path for s in layers], [s.path.module for s in layers], runtimes,
                   [(s.path.attn._decode_path, s.plan) for s in layers],
                   [(s.path.n1._decode_path, s.n1w) for s in layers] + [(s.path.n2._decode_path, s.n2w) for s in layers],
                   [(s.path.router._decode_path, s.route) for s in layers],
                   [(s.path.attn._decode_path.layer_idx, s.cache_layer, s.buf, s.experts, s.table) for s in layers])

    def holds(self, kv_cache) -> int | None:
        """The layers' common KV length if nothing the walk read has changed, else None."""
        if kv_cache is not self.kv_cache or self.expert_cache.changes != self.changes:
            return None
        if any(self.hook_dicts) or any(m.training for m in self.modules):
            return None
        if not (all(o.verified is True for o in self.verified) and all(p.fused and p.plain_block for p in self.paths)
                and all(rt.prefetcher is None and rt.hybrid is None for rt in self.runtimes)):
            return None
        if not (all(a.plan is p and p.current(a.module) for a, p in self.plans)
                and all(n.w is w and n.module._parameters.get("weight") is n.wt for n, w in self.norms)
                and all(r.arrays is a and r.module._parameters.get("weight") is r.wt for r, a in self.routers)):
            return None
        cache_layers, n = kv_cache.layers, self.layers[0].buf.length
        current = kv_buffer.current
        for i, layer, buf, e, table in self.kv:  # (layer_call is fixed when the experts are made)
            if (e.table is not table or i >= len(cache_layers) or cache_layers[i] is not layer
                    or current(layer) is not buf or buf.length != n):
                return None
        return n
