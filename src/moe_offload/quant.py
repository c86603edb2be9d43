"""HQQ quantization, the storage formats of a weight matrix, and their plain reference dequantization.

A matrix W [N, K] (out, in) is stored in one of these formats, each a few flat tensors:
- "dense":    the weight itself, in the source dtype (16-bit stores).
- "rowtile":  3/4-bit codes in 16-row tiles with fp16 (scale, min) per group, read with int8
              activations by integer dot products (kernels_layer.py): the default on CPUs with VNNI.
- "int4pack": codes of 2-4 bits in torch's CPU int4 layout plus bf16 (scale, zero) pairs per
              group, W = (q - 8) * scale + zero: the layout `aten._weight_int4pack_mm_for_cpu` reads.
- "int8":     int8 codes with one bf16 scale per output channel, W = q * scale: the layout
              `aten._weight_int8pack_mm` reads (8-bit, the default group 0).
- "grouped":  bit-packed codes plus fp16 (scale, zero) per group, W = (q - zero) * scale: any bit
              width and group size (2-bit in groups of 16, 8-bit per group, shapes int4pack cannot take),
              laid out transposed for the fused kernel (see pack_codes).
Every format's parameters are refitted after rounding to their storage dtype, so what is stored
is what the error was measured on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .errors import MoeOffloadError

INT4PACK_GROUPS = (32, 64, 128, 256)


@dataclass
class QMatrix:
    fmt: str
    n: int
    k: int
    bits: int
    group: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def meta(self) -> dict:
        return {"fmt": self.fmt, "n": self.n, "k": self.k, "bits": self.bits, "group": self.group}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# ---------------------------------------------------------------- choosing a format

def int8pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def fused_grouped_available() -> bool:
    """numba is installed (kernels_grouped.py); found without importing it, which is slow."""
    return importlib.util.find_spec("numba") is not None


def effective_group(k: int, group: int) -> int:
    """The requested group, halved until it divides the input dimension."""
    g = group
    while k % g:
        g //= 2
    if g < 8:
        raise MoeOffloadError(f"cannot quantize a matrix with input size {k}: it must be a multiple of 8")
    return g


@lru_cache(maxsize=1)
def rowtile_fast() -> bool:
    """This CPU has integer dot products the "rowtile" kernels are fast with: VNNI, or AVX2's
    pmaddubsw. Measured (2 threads, one token, 4-bit): with AVX-512 VNNI 1.5-3.7x torch's int4 op
    at 3 and 4 bits and every shape of the quarter model, and no slower on 128-token batches; on an
    AVX2-only EPYC a quarter-Mixtral layer 2.5x and a Qwen3-style one 7x (tools/bench_layer_kernel.py).
    The portable step alone (no AVX2) was no faster than torch's op there."""
    if not fused_grouped_available():
        return False
    from .kernels_layer import usable_variants  # kernels_layer builds on this module

    return usable_variants()[0] != "portable"


def rowtile_fits(k: int, bits: int, group: int) -> bool:
    from .kernels_layer import GROUPS

    return bits in (3, 4) and k % 32 == 0 and effective_group(k, group) in GROUPS


def choose_format(n: int, k: int, bits: int, group: int, rowtile: bool = True) -> tuple[str, int]:
    """The format "auto" stores W [N, K] in; `rowtile=False` keeps to the formats whose products
    take bf16 or fp32 activations (the "int4pack" choice of convert)."""
    if bits == 16:
        return "dense", 0
    if rowtile and rowtile_fits(k, bits, group) and rowtile_fast():
        return "rowtile", effective_group(k, group)
    if bits == 8 and group == 0:
        return ("int8" if int8pack_available() else "grouped"), (0 if int8pack_available() else effective_group(k, 64))
    g = effective_group(k, group)
    if bits == 2 and fused_grouped_available():
        # int4pack would store 2-bit codes in 4-bit fields: "grouped" reads 40% fewer bytes and its
        # fused kernel is faster at batch 1 (tools/bench_grouped.py). 3-bit: same bytes, and
        # int4pack is faster on prefill batches, so it stays int4pack.
        return "grouped", g
    if bits <= 4 and g in INT4PACK_GROUPS and n % 16 == 0 and int4pack_available():
        return "int4pack", g
    return "grouped", g


# ---------------------------------------------------------------- quantizing

def hqq_codes(w: torch.Tensor, bits: int, group: int, *, iters: int = 10, lp_norm: float = 0.7,
              beta: float = 10.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ's half-quadratic optimizer -> codes [R, g], scale [R, 1], offset [R, 1] with W ~ q*scale + offset.

    The algorithm of hqq 0.2.8's `Quantizer.quantize(optimize=True, axis=1)`: min-max init, then up
    to `iters` proximal updates of the zero point under an l_p norm (hqq's
    `optimize_weights_proximal_legacy`: the scale and beta stay fixed; it stops when the mean
    absolute error stops falling, keeping that last step's zero). Rewritten in closed form so an
    iteration makes ~12 cheap passes over memory instead of ~25 (and no large allocations): with
    s the inverse scale, y = W*s + z - q the error in code units and c = s^(2-p) / beta per group,
        W - W_r = y / s,    s * shrink_p(y / s) = sign(y) * relu(|y| - c |y|^(p-1)),
        z_new = mean(q - (W - W_e) * s) = z - mean(sign(y) * min(|y|, c |y|^(p-1))),
    and |y|^(p-1) = 2^((p-1) log2|y|) (torch's pow by a fractional scalar is ~5x slower).
    Codes match hqq's except for rare float ties (tests/test_convert_speed.py). iters=10, not hqq's
    20: after refit() the stored error is the same to ~1e-4 relative on weights of LLM scale
    (std 0.02, normal or heavy-tailed), always below hqq's own, for half the optimizer's time."""
    W = w.float().reshape(-1, group)
    qmax = 2**bits - 1
    lo, hi = W.aminmax(dim=1, keepdim=True)
    denom = hi - lo
    s = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), qmax / denom).clamp(max=2e4)  # inverse scale
    z = -lo * s
    P, Q = torch.empty_like(W), torch.empty_like(W)
    if iters > 0:
        A = torch.empty_like(W)
        log2_c = (s.pow(2 - lp_norm) / beta).log2()
        best = math.inf
        for _ in range(iters):
            torch.addcmul(z, W, s, out=P)
            torch.round(P, out=Q).clamp_(0, qmax)
            P.sub_(Q)  # y
            torch.abs(P, out=A)
            err = (A.sum(1, keepdim=True) / s).double().sum().item() / W.numel()  # mean |W - W_r|
            torch.log2(A, out=Q)
            torch.add(log2_c, Q, alpha=lp_norm - 1, out=Q).exp2_()  # c |y|^(p-1)
            torch.minimum(A, Q, out=Q)
            z = z - torch.copysign(Q, P, out=Q).mean(1, keepdim=True)
            if err < best:
                best = err
            else:
                break  # like hqq: the zero of this last step is kept
        del A
    torch.addcmul(z, W, s, out=P)
    q = torch.round(P, out=Q).clamp_(0, qmax)
    scale = 1.0 / s
    return q, scale, -z * scale


def minmax_codes(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = w.float().reshape(-1, group)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    scale = torch.where(hi > lo, (hi - lo) / (2**bits - 1), torch.ones_like(hi))
    return ((g - lo) / scale).round().clamp(0, 2**bits - 1), scale, lo


def _round_int4pack(a, b):
    """Round (scale, offset) to what int4pack stores: bf16 scale and bf16 zero = offset + 8*scale."""
    s = a.to(torch.bfloat16).float()
    s = torch.where(s > 0, s, torch.full_like(s, 2.0**-20))
    z = (b + 8 * s).to(torch.bfloat16).float()
    return s, z - 8 * s


def _round_grouped(a, b):
    """Round (scale, offset) to what "grouped" stores: fp16 scale and fp16 code-domain zero."""
    s = a.to(torch.float16).float()
    s = torch.where(s > 0, s, torch.full_like(s, 2.0**-14))
    z = (-b / s).to(torch.float16).float()
    return s, -z * s


def refit(w, q, a, b, qmax, round_params, iters: int = 3):
    """Re-round codes against the storable parameters, then a few least-squares updates of
    (scale, offset); each group keeps its best fit, so the result is never worse than the start."""
    a, b = round_params(a, b)
    q = ((w - b) / a).round().clamp(0, qmax)
    best_q, best_a, best_b = q, a, b
    best_err = ((q * a + b - w) ** 2).sum(1, keepdim=True)
    for _ in range(iters):
        qm, wm = q.mean(1, keepdim=True), w.mean(1, keepdim=True)
        var = ((q - qm) ** 2).sum(1, keepdim=True)
        cov = ((q - qm) * (w - wm)).sum(1, keepdim=True)
        a_new = torch.where((var > 0) & (cov > 0), cov / var.clamp_min(1e-30), a)
        a, b = round_params(a_new, wm - a_new * qm)
        q = ((w - b) / a).round().clamp(0, qmax)
        err = ((q * a + b - w) ** 2).sum(1, keepdim=True)
        better = err < best_err
        best_q = torch.where(better, q, best_q)
        best_a, best_b = torch.where(better, a, best_a), torch.where(better, b, best_b)
        best_err = torch.minimum(err, best_err)
    return best_q, best_a, best_b


def quantize(w: torch.Tensor, bits: int, group: int, *, optimize: bool = True, fmt: str | None = None,
             rowtile: bool = True) -> QMatrix:
    """W [N, K] -> QMatrix in the fastest format its shape allows on this CPU (without "rowtile"
    if not `rowtile`), or in `fmt` ("rowtile", "grouped" or "int4pack", when the shape allows it)."""
    n, k = w.shape
    if fmt in ("grouped", "int4pack"):
        g = effective_group(k, group)
    elif fmt != "rowtile":
        fmt, g = choose_format(n, k, bits, group, rowtile)
    if fmt == "rowtile":
        from .kernels_layer import quantize_rowtile  # here: kernels_layer builds on this module

        return quantize_rowtile(w, bits, group, optimize=optimize)
    if fmt == "dense":
        return QMatrix("dense", n, k, 16, 0, {"weight": w.contiguous()})
    if fmt == "int8":
        return _quantize_int8(w)
    qmax = 2**bits - 1
    if bits <= 4 and optimize:
        q, a, b = hqq_codes(w, bits, g)
    else:
        q, a, b = minmax_codes(w, bits, g)
    wg = w.float().reshape(-1, g)
    if fmt == "int4pack":
        q, s, off = refit(wg, q, a, b, qmax, _round_int4pack)
        zero = off + 8 * s
        pairs = torch.stack([s.reshape(n, k // g), zero.reshape(n, k // g)], -1)  # [N, G, 2]
        codes = q.reshape(n, k).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        return QMatrix(fmt, n, k, bits, g, {"packed": packed.contiguous(),
                                            "scales_zeros": pairs.transpose(0, 1).contiguous().to(torch.bfloat16)})
    q, s, off = refit(wg, q, a, b, qmax, _round_grouped)
    zero = -off / s
    return QMatrix(fmt, n, k, bits, g, {
        "codes": pack_codes(q.reshape(n, k).to(torch.uint8), bits, g),
        "scale": s.reshape(n, k // g).t().contiguous().to(torch.float16),  # [G, N], like the codes
        "zero": zero.reshape(n, k // g).t().contiguous().to(torch.float16)})


def _quantize_int8(w: torch.Tensor) -> QMatrix:
    """Symmetric per-channel int8; the bf16 scale is refitted by least squares, best kept per row."""
    w = w.float()
    n, k = w.shape
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    best_s, best_q, best_err = None, None, None
    for s in (amax / 127, None):
        if s is None:  # least-squares scale for the codes of the first pass
            s = (best_q * w).sum(1, keepdim=True) / (best_q * best_q).sum(1, keepdim=True).clamp_min(1)
            s = torch.where(s > 0, s, amax / 127)
        s = s.to(torch.bfloat16).float()
        q = (w / s).round().clamp(-127, 127)
        err = ((q * s - w) ** 2).sum(1, keepdim=True)
        if best_err is None:
            best_s, best_q, best_err = s, q, err
        else:
            better = err < best_err
            best_s, best_q = torch.where(better, s, best_s), torch.where(better, q, best_q)
            best_err = torch.minimum(err, best_err)
    return QMatrix("int8", n, k, 8, 0, {"codes": best_q.to(torch.int8).contiguous(),
                                        "scale": best_s.reshape(n).to(torch.bfloat16)})


# ---------------------------------------------------------------- bit packing ("grouped" format)

def storage_bits(bits: int, group: int) -> int:
    """Field width in the 32-bit words: 3-bit codes take 4-bit fields (cheap to unpack), and a
    2-bit group must fill whole words of 16 codes, else it takes 4-bit fields too."""
    if bits == 2 and group % 16 == 0:
        return 2
    return 4 if bits <= 4 else 8


def pack_codes(codes: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 words [G, K/group * sb/32, N] (G = K / group).

    Word (g, j, n) holds the codes of row n at k = g*group + j*cpw + i, i = 0..cpw-1 (cpw = 32/sb),
    code i in bits sb*i.. of the word. Rows are innermost so that the kernel's vector lanes are 8
    output rows reading 8 consecutive words (_grouped_jit.py): packed once at convert time."""
    n, k = codes.shape
    group = group or k
    sb = storage_bits(bits, group)
    cpw = 32 // sb
    c = codes.reshape(n, k // group, group // cpw, cpw).permute(1, 2, 0, 3).to(torch.int64)
    words = (c << (torch.arange(cpw, dtype=torch.int64) * sb)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of pack_codes: -> uint8 codes [N, K]."""
    groups, wpg, n = packed.shape
    cpw = k // groups // wpg
    sb = 32 // cpw
    shifts = torch.arange(cpw, dtype=torch.int64) * sb
    c = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**sb - 1)  # [G, W, N, cpw]
    return c.permute(2, 0, 1, 3).reshape(n, k).to(torch.uint8)


# ---------------------------------------------------------------- torch's int4pack layout

@lru_cache(maxsize=64)
def _int4pack_source_index(n: int, k: int) -> torch.Tensor:
    """For each nibble of torch's packed layout, the flat [N, K] index of the code it holds.

    torch's CPU layout depends on the vector width it was built for, so it is probed, not assumed:
    pack the digits (base 16) of every element's own index and read them back."""
    flat = torch.arange(n * k, dtype=torch.int64)
    source = torch.zeros(n * k, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(n * k, 16)))):
        codes = ((flat >> (4 * digit)) & 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2).reshape(-1)
        nibbles = torch.stack([packed & 15, packed >> 4], -1).reshape(-1).to(torch.int64)
        source |= nibbles << (4 * digit)
    return source


def unpack_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nibbles = torch.stack([packed.reshape(-1) & 15, packed.reshape(-1) >> 4], -1).reshape(-1)
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[_int4pack_source_index(n, k)] = nibbles
    return codes.reshape(n, k)


@lru_cache(maxsize=1)
def _int4pack_block_size() -> int | None:
    """The row block of torch's int4pack layout on this machine, if it is the blocked layout the
    prefill unpacker reads (kernels_int4pack): bytes [N/BN, K, BN/2], byte (b, k, j) holding row
    b*BN + j in its low nibble and row b*BN + BN/2 + j in its high one. None for any other layout."""
    if not int4pack_available():
        return None
    for block in (64, 32, 16, 128):
        if all(torch.equal(_int4pack_source_index(n, k), _blocked_index(n, k, block)) for n, k in ((256, 64), (384, 96))):
            return block
    return None


def _blocked_index(n: int, k: int, block: int) -> torch.Tensor:
    b, kk, j = torch.meshgrid(torch.arange(n // block), torch.arange(k), torch.arange(block // 2), indexing="ij")
    rows = torch.stack([b * block + j, b * block + block // 2 + j], -1)  # low nibble, high nibble
    return (rows * k + kk.unsqueeze(-1)).reshape(-1)


def int4pack_block(n: int, k: int) -> int | None:
    """The row block of the int4pack layout if an [n, k] matrix is stored in whole blocks of it."""
    block = _int4pack_block_size()
    return block if block is not None and n % block == 0 else None


def int4pack_layout_id() -> str:
    """A fingerprint of this machine's int4pack layout: stores record it, loads check it."""
    if not int4pack_available():
        return "unavailable"
    h = hashlib.sha256()
    for n in (16, 48, 64, 128):
        codes = (torch.arange(n * 64, dtype=torch.int32).reshape(n, 64) * 7919 >> 3) % 16
        h.update(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- reference dequantization

def dequantize(m: QMatrix) -> torch.Tensor:
    """The plain reference: W [N, K] in fp32, exactly as the stored parameters define it."""
    t = m.tensors
    if m.fmt == "dense":
        return t["weight"].float()
    if m.fmt == "int8":
        return t["codes"].float() * t["scale"].float().unsqueeze(1)
    groups = m.k // m.group
    if m.fmt == "int4pack":
        q = unpack_int4pack(t["packed"], m.n, m.k).float().reshape(m.n, groups, m.group)
        sz = t["scales_zeros"].float().transpose(0, 1)  # [N, G, 2]
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(m.n, m.k)
    if m.fmt == "grouped":
        q = unpack_codes(t["codes"], m.bits, m.k).float().reshape(m.n, groups, m.group)
        s, z = t["scale"].float().t().unsqueeze(-1), t["zero"].float().t().unsqueeze(-1)
        return ((q - z) * s).reshape(m.n, m.k)
    if m.fmt == "rowtile":
        from .kernels_layer import dequantize_rowtile

        return dequantize_rowtile(m)
    raise MoeOffloadError(f"unknown weight format {m.fmt!r}")
