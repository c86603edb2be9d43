"""RMSNorm in one kernel call: transformers' RMSNorm is seven torch operations (~19 µs on a
1024-wide row, 64 of them a decode token on the quarter shape); the numba kernel takes ~3 µs.

Any leaf module with a one-dimensional weight, an epsilon and a one-argument forward whose class
calls itself an RMSNorm takes this path, and checks itself on its first call against its own
forward (a family that scales by 1 + weight, or computes in another dtype, keeps the stock path
after that first call). Inputs that are not fp32 on the CPU, or that need gradients, always go to
the stock forward.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .decode_path import close, jit, one_argument, rms_norm_eps, take_forward


def install(model: nn.Module) -> int:
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and rms_norm_eps(module) is not None and one_argument(module):
            _NormPath(module)
            n += 1
    return n


class _NormPath:
    """Kept lean: at decode every attribute read costs a cache miss (the experts' weights stream
    through the caches between two calls), so the weight's array is kept here, not looked up."""

    def __init__(self, module: nn.Module):
        self.eps = rms_norm_eps(module)
        self.verified: bool | None = None
        self.w: np.ndarray | None = None  # the weight as an fp32 array; dropped when the module's tensors change
        self.wt: torch.Tensor | None = None  # the parameter it was read from
        take_forward(module, self, on_change=lambda: setattr(self, "w", None))

    def weight(self) -> np.ndarray | None:
        """The weight as the kernel reads it, None if the stock forward must run."""
        w = self.w
        if w is None or self.module._parameters.get("weight") is not self.wt:  # also a weight replaced by assignment
            wt = self.wt = self.module.weight
            if self.verified is False or wt.dtype != torch.float32 or not wt.is_cpu or wt.requires_grad:
                return None  # (a weight that wants gradients: training, not decode)
            w = self.w = wt.detach().numpy()
        return w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if (w is None or x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != w.shape[0] or not x.is_contiguous()
                or x.requires_grad):
            return self.original(x)
        xn = x.numpy()
        y = np.empty(xn.shape, np.float32)
        jit().rms_norm_rows(xn.reshape(-1, w.shape[0]), w, self.eps, y.reshape(-1, w.shape[0]))
        y = torch.from_numpy(y)
        if self.verified is None:
            ref = self.original(x)
            self.verified = close(y, ref, 1e-5)
            if not self.verified:
                self.w = None
            return y if self.verified else ref  # the same floats on every call, whichever call checked
        return y
