"""Matrix products on stored weight formats: the fast path next to its plain reference.

The fast path must equal the reference up to the rounding of its activation dtype; tests compare
them on fresh random inputs. `use_reference()` forces the reference everywhere (for oracles).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from . import kernels_device, kernels_grouped, kernels_int4pack
from .quant import QMatrix, dequantize

_state = threading.local()


@contextlib.contextmanager
def use_reference(enabled: bool = True):
    """Run every quantized product through dequantize-then-fp32-matmul (slow, exact)."""
    old = reference_mode()
    _state.reference = enabled
    try:
        yield
    finally:
        _state.reference = old


def reference_mode() -> bool:
    return getattr(_state, "reference", False)


def linear_reference(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    return F.linear(x.float(), dequantize(m)).to(x.dtype)


def linear(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """y = x @ W.T for x [..., K] on any stored format."""
    if m.fmt == "dense":
        w = m.tensors["weight"]
        return F.linear(x.to(w.dtype), w).to(x.dtype)
    if x.device.type != "cpu":  # a GPU: the CPU layouts' kernels do not run there (kernels_device.py)
        return kernels_device.linear(x, m)
    if reference_mode():
        return linear_reference(x, m)
    if m.fmt == "int4pack":
        x2 = x.reshape(-1, m.k).to(torch.bfloat16).contiguous()
        return _int4pack_mm(x2, m).to(x.dtype).reshape(*x.shape[:-1], m.n)
    if m.fmt == "rowtile":
        from . import kernels_layer

        return kernels_layer.linear(x, m).to(x.dtype)
    if m.fmt == "int8":
        x2 = x.reshape(-1, m.k).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, m.tensors["codes"], m.tensors["scale"])
        return y.to(x.dtype).reshape(*x.shape[:-1], m.n)
    # "grouped": the numba kernel; without numba, dequantize in the activation dtype (slow).
    y = kernels_grouped.linear(x, m)
    return y if y is not None else F.linear(x, dequantize(m).to(x.dtype))


def expert_forward(x: torch.Tensor, gate_up: QMatrix, down: QMatrix, act=None, *, gate=None,
                   gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One gated expert: down(gate(gate_up(x))). `gate` maps the [T, 2I] gate_up output to [T, I]
    (a family's own gating, e.g. gpt-oss's clamped SwiGLU on interleaved columns); by default it is
    SwiGLU on concatenated halves, act(gate) * up, with `act`."""
    gate = gate or (lambda y: _swiglu(y, act))
    if (gate_up.fmt == down.fmt == "int4pack" and x.dim() == 2 and gate_up_bias is None and down_bias is None
            and not reference_mode() and x.device.type == "cpu"):
        return _int4pack_expert(x, gate_up, down, gate)
    y = linear(x, gate_up)
    if gate_up_bias is not None:
        y = y + gate_up_bias.to(y.dtype)
    y = linear(gate(y), down)
    return y if down_bias is None else y + down_bias.to(y.dtype)


def _swiglu(y: torch.Tensor, act) -> torch.Tensor:
    g, up = y.chunk(2, dim=-1)
    return act(g) * up


def _int4pack_expert(x: torch.Tensor, gate_up: QMatrix, down: QMatrix, gate) -> torch.Tensor:
    """expert_forward's arithmetic with one dtype round trip per matrix and no reshapes: in decode
    the expert's Python costs as much as a small matrix product."""
    h = gate(_int4pack_mm(x.to(torch.bfloat16).contiguous(), gate_up).float())
    return _int4pack_mm(h.to(torch.bfloat16), down).to(x.dtype)


def _int4pack_mm(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """x [B, K] bf16 @ W.T: torch's fused int4 GEMV (fast only with bf16 activations, FACTS: ~30x
    with fp32), or for prefill batches on CPUs with bf16 matrix units, unpack then bf16 matmul."""
    if kernels_int4pack.usable(m, x.shape[0]):
        return kernels_int4pack.matmul(x, m)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, m.tensors["packed"], m.group, m.tensors["scales_zeros"])
