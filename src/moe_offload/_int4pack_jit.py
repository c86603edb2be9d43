"""numba kernel that unpacks torch's CPU int4pack layout into bf16 W.T, for prefill batches.

Layout (probed by quant.int4pack_block): packed uint8 [N/BN, K, BN/2]; byte (b, k, j) holds the
code of row b*BN + j in its low nibble and of row b*BN + BN/2 + j in its high nibble. The inner
loops run along j, contiguous in both the codes and the output row, so they vectorize.
"""
import numpy as np
from numba import njit, prange

from ._jit_cache import install

install()  # before the first decorator: a change to any kernel file recompiles every kernel

_OPTS = dict(nogil=True, cache=True, fastmath={"contract"}, error_model="numpy", boundscheck=False)


@njit(parallel=True, **_OPTS)
def dequant_bf16(packed, scale, offset, out, parts):
    """out[k, n] = bf16 bits of q[n, k] * scale[g, n] + offset[g, n] (offset = zero - 8 * scale),
    rounded to nearest even like torch's .to(bfloat16); rows of out split over `parts` threads."""
    blocks, K, H = packed.shape
    G, N = scale.shape
    group = K // G
    for t in prange(parts):
        tmp = np.empty(N, np.float32)
        bits = tmp.view(np.uint32)
        for k in range(K * t // parts, K * (t + 1) // parts):
            s = scale[k // group]
            o = offset[k // group]
            for b in range(blocks):
                codes = packed[b, k]
                lo = 2 * H * b
                hi = lo + H
                for j in range(H):
                    tmp[lo + j] = np.float32(codes[j] & 15) * s[lo + j] + o[lo + j]
                for j in range(H):
                    tmp[hi + j] = np.float32(codes[j] >> 4) * s[hi + j] + o[hi + j]
            row = out[k]
            for n in range(N):
                v = np.int64(bits[n])
                row[n] = (v + 0x7FFF + ((v >> 16) & 1)) >> 16
