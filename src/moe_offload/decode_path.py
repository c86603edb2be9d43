"""What the decode paths share (attention_decode, norm_decode, router_decode, layer_decode): their
numba kernels, the closeness their self-checks ask for, and how a path takes over a module's forward."""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def jit():
    """_decode_jit, imported on first use (numba is slow to import)."""
    return importlib.import_module("._decode_jit", __package__)


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Same shape, and |a - b| <= rel * max|b| everywhere."""
    b = b.float()
    return a.shape == b.shape and float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-6)


def take_forward(module: nn.Module, path, on_change: Callable[[], None] | None = None) -> None:
    """module.forward becomes path.__call__ (the module's own is kept as path.original, the path as
    module._decode_path). With on_change, .to(), .float() and the like call it first: they replace
    the tensors a path may keep arrays of."""
    path.module, path.original = module, module.forward
    if on_change is not None:
        apply = module._apply

        def _apply(fn, *args, **kwargs):
            on_change()
            return apply(fn, *args, **kwargs)
        module._apply = _apply
    module.forward = path.__call__
    module._decode_path = path


def rms_norm_eps(module: nn.Module) -> float | None:
    """The epsilon of a leaf norm with a one-dimensional weight (what the RMSNorm kernel reads), else None."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    w = getattr(module, "weight", None)
    leaf = not any(True for _ in module.children())
    return float(eps) if leaf and isinstance(eps, float) and isinstance(w, torch.Tensor) and w.dim() == 1 else None


def one_argument(module: nn.Module) -> bool:
    """Whether the module's forward takes exactly one argument (a path replaces only such forwards)."""
    try:
        return len(inspect.signature(module.forward).parameters) == 1
    except (TypeError, ValueError):
        return False
