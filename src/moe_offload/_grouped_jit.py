"""numba kernels of the "grouped" format; imported lazily by kernels_grouped.py (numba is slow to import).

Layout (quant.pack_codes): codes int32 [G, W, N], word (g, j, n) holding the codes of row n at
k = g*group + j*cpw + i in field i (sb bits each, cpw = 32 // sb); scale and zero fp16 [G, N].
The innermost loop runs across output rows n (8 rows per AVX2 vector): no horizontal reductions,
and one word load feeds cpw FMAs. Field i is isolated with a mask, not a shift: its value
q * 2^(sb*i) is exact in fp32, so x is pre-scaled by 2^-(sb*i) (exact) and each code costs
and + convert + FMA. The top field is shifted instead (its mask would set the sign bit).
Per group, sum_k w_k x_k = s * (sum_k q_k x_k - z * sum_k x_k): the zero leaves the inner loop.
Everything is fp32 with the reference's rounding, up to summation order.
"""
import numpy as np
from numba import njit, prange

from ._jit_cache import install

install()  # before the first decorator: a change to any kernel file recompiles every kernel

NB = 2048  # rows per block: 8 KiB contiguous per word row (page-sized streams), accumulators in L1
_OPTS = dict(nogil=True, cache=True, fastmath={"contract"}, error_model="numpy", boundscheck=False)
# fastmath only contracts a*b+c to FMA: "reassoc" would fold the four FMA chains back into one.


@njit(inline="always", **{k: v for k, v in _OPTS.items() if k not in ("nogil", "cache")})
def _half_bits(h):
    """fp16 bits -> fp32 bits of the value / 2^112 (exact for normals and subnormals; no inf/nan stored)."""
    h = np.int32(h)
    return ((h & 0x7FFF) << 13) | ((h & 0x8000) << 16)


@njit(inline="always", fastmath={"contract"}, error_model="numpy", boundscheck=False)
def _rows(words, s16, z16, xsc, xsum, y, n0, n1, sb):
    """y[:, n0:n1] = x @ W[n0:n1].T for every row of x; sb is a compile-time constant (2, 4 or 8)."""
    cpw = 32 // sb
    fm = (1 << sb) - 1
    top = sb * (cpw - 1)
    G, WPG, N = words.shape
    B = xsc.shape[0]
    acc = np.empty(NB, np.float32)
    si = np.empty(NB, np.int32)
    zi = np.empty(NB, np.int32)
    sf = si.view(np.float32)
    zf = zi.view(np.float32)
    magic = np.float32(2.0 ** 112)
    for nb in range(n0, n1, NB):
        m = min(NB, n1 - nb)
        for b in range(B):
            yb = y[b, nb:nb + m]
            for n in range(m):
                yb[n] = 0
            for g in range(G):
                for n in range(m):
                    acc[n] = 0
                for j in range(WPG):
                    base = (g * WPG + j) * cpw
                    xv = xsc[b, base:base + cpw]
                    wr = words[g, j, nb:nb + m]
                    for n in range(m):
                        w = wr[n]
                        # four independent FMA chains (one chain is latency bound)
                        a0 = acc[n]
                        a1 = np.float32(0)
                        a2 = np.float32(0)
                        a3 = np.float32(0)
                        for i in range(0, cpw - 4, 4):
                            a0 += np.float32(w & np.int32(fm << (sb * i))) * xv[i]
                            a1 += np.float32(w & np.int32(fm << (sb * (i + 1)))) * xv[i + 1]
                            a2 += np.float32(w & np.int32(fm << (sb * (i + 2)))) * xv[i + 2]
                            a3 += np.float32(w & np.int32(fm << (sb * (i + 3)))) * xv[i + 3]
                        i = cpw - 4
                        a0 += np.float32(w & np.int32(fm << (sb * i))) * xv[i]
                        a1 += np.float32(w & np.int32(fm << (sb * (i + 1)))) * xv[i + 1]
                        a2 += np.float32(w & np.int32(fm << (sb * (i + 2)))) * xv[i + 2]
                        a3 += np.float32(np.int32((w >> top) & fm)) * xv[cpw - 1]
                        acc[n] = (a0 + a1) + (a2 + a3)
                xs = xsum[b, g]
                sr = s16[g, nb:nb + m]
                zr = z16[g, nb:nb + m]
                for n in range(m):
                    si[n] = _half_bits(sr[n])
                    zi[n] = _half_bits(zr[n])
                for n in range(m):
                    yb[n] += (sf[n] * magic) * (acc[n] - (zf[n] * magic) * xs)


@njit(**_OPTS)
def prep(x, group, sb, xsc, xsum):
    """xsc = x pre-scaled by 2^-(sb * field) (top field unscaled); xsum = per-group sums of x."""
    cpw = 32 // sb
    B, K = x.shape
    for b in range(B):
        for k in range(K):
            i = k % cpw
            f = np.float32(1.0) if i == cpw - 1 else np.float32(1.0 / (1 << (sb * i)))
            xsc[b, k] = x[b, k] * f
        for g in range(K // group):
            s = np.float32(0)
            for k in range(g * group, (g + 1) * group):
                s += x[b, k]
            xsum[b, g] = s


@njit(**_OPTS)
def rows2(words, s16, z16, xsc, xsum, y, n0, n1):
    _rows(words, s16, z16, xsc, xsum, y, n0, n1, 2)


@njit(**_OPTS)
def rows4(words, s16, z16, xsc, xsum, y, n0, n1):
    _rows(words, s16, z16, xsc, xsum, y, n0, n1, 4)


@njit(**_OPTS)
def rows8(words, s16, z16, xsc, xsum, y, n0, n1):
    _rows(words, s16, z16, xsc, xsum, y, n0, n1, 8)


def split_rows(N, parts):
    """Row bounds for `parts` threads: equal shares, on multiples of 8 (one vector of rows)."""
    return np.array([min(N, (N * t // parts + 7) // 8 * 8) for t in range(parts)] + [N], dtype=np.int64)


@njit(parallel=True, **_OPTS)
def par2(words, s16, z16, xsc, xsum, y, bounds):
    for t in prange(len(bounds) - 1):
        _rows(words, s16, z16, xsc, xsum, y, bounds[t], bounds[t + 1], 2)


@njit(parallel=True, **_OPTS)
def par4(words, s16, z16, xsc, xsum, y, bounds):
    for t in prange(len(bounds) - 1):
        _rows(words, s16, z16, xsc, xsum, y, bounds[t], bounds[t + 1], 4)


@njit(parallel=True, **_OPTS)
def par8(words, s16, z16, xsc, xsum, y, bounds):
    for t in prange(len(bounds) - 1):
        _rows(words, s16, z16, xsc, xsum, y, bounds[t], bounds[t + 1], 8)


@njit(inline="always", fastmath={"contract"}, error_model="numpy", boundscheck=False)
def _dequant(words, s16, z16, wt, n0, n1, sb):
    """wt[k, n] = (q - z) * s for rows n0:n1: W transposed, in fp32, for a batched matmul."""
    cpw = 32 // sb
    fm = (1 << sb) - 1
    G, WPG, N = words.shape
    si = np.empty(NB, np.int32)
    zi = np.empty(NB, np.int32)
    sf = si.view(np.float32)
    zf = zi.view(np.float32)
    magic = np.float32(2.0 ** 112)
    for nb in range(n0, n1, NB):
        m = min(NB, n1 - nb)
        for g in range(G):
            for n in range(m):
                si[n] = _half_bits(s16[g, nb + n])
                zi[n] = _half_bits(z16[g, nb + n])
            for n in range(m):
                sf[n] *= magic
                zf[n] *= magic
            for j in range(WPG):
                wr = words[g, j, nb:nb + m]
                for i in range(cpw):
                    out = wt[(g * WPG + j) * cpw + i, nb:nb + m]
                    for n in range(m):
                        out[n] = (np.float32((wr[n] >> (sb * i)) & fm) - zf[n]) * sf[n]


@njit(parallel=True, **_OPTS)
def dequant_par(words, s16, z16, wt, bounds, sb):
    # One body for every bit width: a copy per constant width took 16 s to compile against 3 s for
    # this one, and was no faster (3584 x 1024 at 64 rows: 3.1 ms against 2.6-2.7 ms).
    for t in prange(len(bounds) - 1):
        _dequant(words, s16, z16, wt, bounds[t], bounds[t + 1], sb)


ROWS = {2: rows2, 4: rows4, 8: rows8}
PAR = {2: par2, 4: par4, 8: par8}
