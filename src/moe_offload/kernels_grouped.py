"""The fused product of the "grouped" format: numba kernels (_grouped_jit.py), loaded on first use.

Small batches run the fused kernel (it decodes every weight once per token row); larger ones
dequantize once to fp32 and let torch's matmul amortize it (BATCH_THRESHOLD, measured with
`tools/bench_grouped.py --batches`). Both use the two cores (numba prange) by splitting
the output rows. Without a working numba, linear() returns None and the caller falls back to
dequantize-then-matmul, after one warning.
"""
from __future__ import annotations

import importlib
import threading
import warnings

import torch

from .quant import QMatrix

BATCH_THRESHOLD = 32  # token rows from which dequantize-then-matmul wins (measured crossover 16-64)

_jit = None
_failed = False
_lock = threading.Lock()
# numba's parallel launches are not reentrant across threads (the workqueue layer aborts the
# process); calls normally come from one thread, this makes a second caller wait instead.
launch_lock = threading.Lock()


def _load():
    """Import the numba kernels once; None (with one warning) if numba is missing or broken."""
    global _jit, _failed
    if _jit is None and not _failed:
        with _lock:
            if _jit is None and not _failed:
                try:
                    _jit = importlib.import_module("._grouped_jit", __package__)
                except Exception as e:  # ImportError, or numba/llvmlite failing to initialize
                    _failed = True
                    warnings.warn(f"numba is unavailable ({type(e).__name__}: {e}); the 'grouped' weight format "
                                  f"falls back to a much slower dequantize-then-matmul", RuntimeWarning, stacklevel=3)
    return _jit


def available() -> bool:
    return _load() is not None


def _threads(m: QMatrix) -> int:
    # below ~1M weights a parallel launch costs more than it saves
    return 1 if m.n * m.k < (1 << 20) or m.n < 64 else max(1, min(2, torch.get_num_threads()))


def linear(x: torch.Tensor, m: QMatrix, batch_threshold: int | None = None) -> torch.Tensor | None:
    """y = x @ W.T in fp32 arithmetic, rounded to x's dtype; None if the kernels are unavailable."""
    jit = _load()
    if jit is None:
        return None
    t = m.tensors
    words, s16, z16 = t["codes"].numpy(), t["scale"].view(torch.int16).numpy(), t["zero"].view(torch.int16).numpy()
    sb = 32 // (m.group // words.shape[1])
    x2 = x.reshape(-1, m.k)
    rows = x2.shape[0]
    bounds = jit.split_rows(m.n, _threads(m))
    if rows >= (BATCH_THRESHOLD if batch_threshold is None else batch_threshold):
        wt = torch.empty(m.k, m.n, dtype=torch.float32)
        with launch_lock:
            jit.dequant_par(words, s16, z16, wt.numpy(), bounds, sb)
        y = x2.float() @ wt
    else:
        xf = x2.float().contiguous().numpy()
        xsc = torch.empty(rows, m.k, dtype=torch.float32).numpy()
        xsum = torch.empty(rows, m.k // m.group, dtype=torch.float32).numpy()
        jit.prep(xf, m.group, sb, xsc, xsum)
        y = torch.empty(rows, m.n, dtype=torch.float32)
        if len(bounds) == 2:
            jit.ROWS[sb](words, s16, z16, xsc, xsum, y.numpy(), 0, m.n)
        else:
            with launch_lock:
                jit.PAR[sb](words, s16, z16, xsc, xsum, y.numpy(), bounds)
    return y.to(x.dtype).reshape(*x.shape[:-1], m.n)
