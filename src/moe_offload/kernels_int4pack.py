"""Prefill batches on the int4pack format: unpack the codes once to bf16 and let torch's bf16
matmul (AMX / AVX512-BF16 through oneDNN) amortize that over the batch.

torch's int4 op costs about one GEMV per token row: on [7168, 1024] at 4 bits it took 3.4 ms for
32 rows and 53 ms for 512, where unpacking took 1.3 ms and the bf16 matmul 0.7 and 3.4 ms
(Xeon with AMX, 2 cores). CPUs without bf16 matrix units keep the int4 op: there a bf16 matmul
is emulated and slower. The result is exact up to bf16 rounding of the weight, which is the int4
op's arithmetic as well.
"""
from __future__ import annotations

import functools
import importlib

import torch

from . import kernels_grouped
from .quant import QMatrix, int4pack_block

PREFILL_ROWS = 32  # token rows from which unpacking wins (a whole expert measured: even at 16 rows, 1.3x at 32)


@functools.lru_cache(maxsize=1)
def fast_bf16_matmul() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


@functools.lru_cache(maxsize=1)
def _jit():
    """The numba kernel, or None (numba missing or broken: the int4 op is used, nothing is lost)."""
    try:
        return importlib.import_module("._int4pack_jit", __package__)
    except Exception:
        return None


def available(m: QMatrix) -> bool:
    """The unpacker can read this matrix: numba works and it is stored in whole row blocks."""
    return int4pack_block(m.n, m.k) is not None and _jit() is not None


def usable(m: QMatrix, rows: int) -> bool:
    return rows >= PREFILL_ROWS and fast_bf16_matmul() and available(m)


def weight_t(m: QMatrix) -> torch.Tensor:
    """W.T [K, N] in bf16, from int4pack codes and their (scale, zero) pairs."""
    block = int4pack_block(m.n, m.k)
    sz = m.tensors["scales_zeros"].float()  # [G, N, 2], W = (q - 8) * scale + zero
    scale = sz[..., 0].contiguous()
    offset = (sz[..., 1] - 8 * sz[..., 0]).contiguous()
    out = torch.empty(m.k, m.n, dtype=torch.bfloat16)
    packed = m.tensors["packed"].reshape(m.n // block, m.k, block // 2).numpy()
    with kernels_grouped.launch_lock:
        _jit().dequant_bf16(packed, scale.numpy(), offset.numpy(), out.view(torch.uint16).numpy(),
                            max(1, min(2, torch.get_num_threads())))
    return out


def matmul(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """x [B, K] bf16 @ W.T. Rows are padded to a power of two: oneDNN builds a kernel for every new
    row count (12-34 ms each, measured), so a handful of shapes, built once, serve every prompt."""
    rows = x.shape[0]
    padded = 1 << (rows - 1).bit_length()
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    return (x @ weight_t(m))[:rows]


def warm_up(shapes: set[tuple[int, int]]) -> None:
    """Load the unpacker (about a second) and build the bf16 matmul kernels of every padded row count
    for these (n, k) matrix shapes, so that the first prompt does not pay for either."""
    block = int4pack_block(128, 64)  # every block size the layout probe knows divides 128
    if not (block and fast_bf16_matmul() and _jit() is not None):
        return
    from .quant import quantize

    weight_t(quantize(torch.zeros(block, 64), 4, 64, optimize=False, fmt="int4pack"))
    for n, k in shapes:
        if int4pack_block(n, k):
            w = torch.zeros(k, n, dtype=torch.bfloat16)
            for rows in (32, 64, 128, 256, 512):
                torch.zeros(rows, k, dtype=torch.bfloat16) @ w
