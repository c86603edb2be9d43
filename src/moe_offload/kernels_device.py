"""Stored formats on any device: dequantize where the weights are, then one matmul.

The CPU kernels (kernels.py) read layouts made for CPUs (torch's CPU int4pack layout, numba's
grouped and rowtile kernels); a GPU cannot run them. A store converted once loads on both: the
blob bytes are the same, and on a GPU each product turns the slot's tensors into a [N, K] weight in
the activation dtype on the device (gathers, shifts and multiply-adds: device-neutral torch ops),
then multiplies. That is the simple device path the issue allows next to the fused ones; on a GPU
the dequantization of one expert costs far less than copying it over PCIe.

`dequantize` must equal quant.dequantize (the reference) exactly, on every format: tests check it
on the CPU, where the same ops run, and on a GPU by tests/test_cuda.py (run once on an H200:
README, "GPU tier", which also says why this path is slow there).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .quant import QMatrix, _int4pack_source_index, dequantize as dequantize_reference


@lru_cache(maxsize=64)
def _int4pack_gather_index(n: int, k: int, device: torch.device) -> torch.Tensor:
    """For each element of [N, K] (flat), the nibble of torch's CPU int4pack layout that holds it.
    Probed on the CPU (the layout is the CPU op's), then kept on the device."""
    source = _int4pack_source_index(n, k)  # nibble -> element
    return torch.argsort(source).to(device)  # element -> nibble


def dequantize(m: QMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in `dtype`, on the device the matrix's tensors live on."""
    t = m.tensors
    some = next(iter(t.values()))
    if m.fmt == "dense":
        return t["weight"].to(dtype)
    if m.fmt == "int4pack":
        packed = t["packed"].reshape(-1)
        nibbles = torch.stack([packed & 15, packed >> 4], -1).reshape(-1)
        q = nibbles[_int4pack_gather_index(m.n, m.k, some.device)].float().reshape(m.n, m.k // m.group, m.group)
        sz = t["scales_zeros"].float().transpose(0, 1)  # [N, G, 2]
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(m.n, m.k).to(dtype)
    # int8, grouped and rowtile: the reference's own torch ops, with their index tensors made where
    # the weights are (torch.device as a context sets the default device of factory functions).
    with torch.device(some.device):
        return dequantize_reference(m).to(dtype)


def linear(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """y = x @ W.T for x [..., K] on the weights' device."""
    return F.linear(x, dequantize(m, x.dtype))
