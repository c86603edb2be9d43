"""OffloadedExperts: the module that replaces a model's experts.

It keeps transformers' call signature, `experts(hidden[T, H], top_k_index[T, k], top_k_weights[T, k])
-> [T, H]`, and computes each needed expert from the cache slot holding it.
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernels


class OffloadedExperts(nn.Module):
    def __init__(self, layer: int, num_experts: int, act, runtime):
        super().__init__()
        self.layer, self.num_experts, self.act_fn = layer, num_experts, act
        self.runtime = runtime  # not a submodule: the cache and loader are shared by all layers

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        residual = rt.residuals.pop(self.layer, None)
        if rt.prefetcher is not None and residual is not None:
            rt.prefetcher.guess(self.layer, residual)  # reads start before this layer computes
        decode = hidden_states.shape[0] == 1
        out = None if decode else torch.zeros_like(hidden_states)
        if decode:
            # One token: no gather/scatter. index_add_ costs ~30x a plain add at this size (measured).
            weight_of = dict(zip(top_k_index[0].tolist(), top_k_weights[0].tolist()))
            used = sorted(weight_of)
        else:
            used = torch.unique(top_k_index).tolist()
        if rt.prefetcher is not None:
            rt.prefetcher.score(self.layer, set(used))
        for expert, weights in rt.cache.stream(self.layer, used):
            if decode:
                y = kernels.expert_forward(hidden_states, weights["gate_up"], weights["down"], self.act_fn)
                y = y.mul_(weight_of[expert])
                out = y if out is None else out.add_(y)
                continue
            token_idx, k_pos = torch.where(top_k_index == expert)
            y = kernels.expert_forward(hidden_states[token_idx], weights["gate_up"], weights["down"], self.act_fn)
            y = y * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out if out is not None else torch.zeros_like(hidden_states)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"
