"""A decode token's router in one kernel call: transformers' top-k routers are a product, a
softmax, a top-k and a division (~20 µs on the CPU, 70 µs a layer in a Qwen3-style decode whose
weights are cold), all of which the numba kernel does in one pass.

Any module whose class calls itself a TopKRouter, with a [experts, hidden] weight (and optionally
a bias), an integer top_k and a one-argument forward, takes this path for single-token fp32 calls.
On its first such call it runs its own forward too and keeps whichever variant of the kernel
(top-k weights divided by their sum or not) gives the same experts and weights; if neither does
(another gating: sigmoid scores, expert groups, a correction bias), it keeps its own forward.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .decode_path import close, jit, one_argument, take_forward


def install(model: nn.Module) -> int:
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter") and _shape_ok(module):
            _RouterPath(module)
            n += 1
    return n


def _shape_ok(module: nn.Module) -> bool:
    w, b, k = getattr(module, "weight", None), getattr(module, "bias", None), getattr(module, "top_k", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(k, int) and 0 < k <= w.shape[0]
            and (b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape[:1])) and one_argument(module))


class _RouterPath:
    def __init__(self, module: nn.Module):
        self.renorm: bool | None = None  # the variant that matched transformers' forward
        self.verified: bool | None = None
        self.arrays: tuple | None = None  # weight, bias (or empty), top_k; dropped when the tensors change
        self.wt: torch.Tensor | None = None  # the weight parameter they were read from
        take_forward(module, self, on_change=lambda: setattr(self, "arrays", None))

    def current(self) -> tuple | None:
        """(weight, bias or empty, top_k) as the kernel reads them; None if the stock forward must run."""
        a = self.arrays
        if a is None or self.module._parameters.get("weight") is not self.wt:  # also a weight replaced by assignment
            if self.verified is False:
                return None
            w, b = self.module.weight, getattr(self.module, "bias", None)
            self.wt = w
            if (w.dtype != torch.float32 or not w.is_cpu or w.requires_grad
                    or (b is not None and (b.dtype != torch.float32 or b.requires_grad))):
                return None
            a = self.arrays = (w.detach().numpy(), b.detach().numpy() if b is not None else np.zeros(0, np.float32),
                               self.module.top_k)
        return a

    def __call__(self, x: torch.Tensor):
        a = self.current()
        if a is None or x.numel() != a[0].shape[1] or x.dtype != torch.float32 or not x.is_cpu or x.requires_grad:
            return self.original(x)
        if self.verified is None:
            return self._check(x, a)
        return self._fast(x, a, self.renorm)

    @staticmethod
    def _fast(x: torch.Tensor, a: tuple, renorm: bool):
        w, b, k = a
        logits, scores, idx = np.empty((1, w.shape[0]), np.float32), np.empty((1, k), np.float32), np.empty((1, k), np.int64)
        xn = x.numpy().reshape(-1) if x.is_contiguous() else x.reshape(-1).contiguous().numpy()
        jit().topk_router(xn, w, b, k, renorm, logits[0], scores[0], idx[0])
        return torch.from_numpy(logits), torch.from_numpy(scores), torch.from_numpy(idx)

    def _check(self, x: torch.Tensor, a: tuple):
        ref = self.original(x)
        self.verified = False
        if isinstance(ref, tuple) and len(ref) == 3 and all(isinstance(t, torch.Tensor) for t in ref):
            for renorm in (True, False):
                got = self._fast(x, a, renorm)
                if (torch.equal(got[2], ref[2]) and got[1].dtype == ref[1].dtype
                        and all(close(g, r.reshape(g.shape), 1e-5) for g, r in zip(got[:2], ref[:2]))):
                    self.renorm, self.verified = renorm, True
                    return got  # the same floats on every call, whichever call checked
        self.arrays = None
        return ref
