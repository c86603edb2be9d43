"""numba kernels of a decode token outside the experts: attention on "rowtile" projections
(attention_decode.py), RMSNorm (norm_decode.py) and top-k routers (router_decode.py); loaded lazily. The attention kernels reuse the
rowtile row-block step and activation rounding of _layer_jit.py, so the q/k/v/o products are the
same floats as kernels_layer.linear gives.
"""
import numpy as np
from numba import njit, prange

from ._jit_cache import install
from ._layer_jit import (_OPTS, _claim, _down_units, _gate_up_units, _views, atomic_add, atomic_load, layer,
                         layer_serial, quant_groups, rowblock, yield_cpu)

install()  # before the first decorator: a change to any kernel file recompiles every kernel


@njit(inline="always", error_model="numpy", boundscheck=False)
def _quantized(x, group):
    ng = x.shape[0] // group
    xq = np.empty(x.shape[0], np.int8)
    xs = np.empty(ng, np.float32)
    xsum = np.empty(ng, np.float32)
    quant_groups(x, group, xq, xs, xsum)
    return xq, xs, xsum


@njit(inline="always", error_model="numpy", boundscheck=False)
def _rms_norm(v, w, eps):
    """v = w * v / rms(v), in place (transformers' RMSNorm: fp32 mean of squares, then scale)."""
    ss = np.float32(0)
    for i in range(v.shape[0]):
        ss += v[i] * v[i]
    r = np.float32(1) / np.sqrt(ss / np.float32(v.shape[0]) + eps)
    for i in range(v.shape[0]):
        v[i] = w[i] * (v[i] * r)


@njit(**_OPTS)
def rms_norm_rows(x, w, eps, y):
    """y[r] = w * x[r] / rms(x[r]) for every row of x [R, H] (fp32)."""
    for r in range(x.shape[0]):
        y[r] = x[r]
        _rms_norm(y[r], w, eps)


@njit(inline="always", error_model="numpy", boundscheck=False)
def _rope(v, cos, sin):
    """Rotary embedding of one head in place, rotate-half convention over the first len(cos) dims."""
    half = cos.shape[0] // 2
    for i in range(half):
        a, b = v[i], v[i + half]
        v[i] = a * cos[i] - b * sin[i]
        v[i + half] = b * cos[i + half] + a * sin[i + half]


@njit(inline="always", error_model="numpy", boundscheck=False)
def _finish(y, bias, norm, eps, heads, hd, cos, sin):
    """A projection's first heads*hd outputs: bias (empty: none), RMSNorm (weights of length hd: per
    head; of heads*hd: the whole projection; empty: none), rotary embedding (empty cos: none)."""
    for j in range(bias.shape[0]):
        y[j] += bias[j]
    n = norm.shape[0]
    if n:
        for h in range(heads * hd // n):
            _rms_norm(y[h * n:(h + 1) * n], norm, eps)
    if cos.shape[0]:
        for h in range(heads):
            _rope(y[h * hd:(h + 1) * hd], cos, sin)


@njit(parallel=True, **_OPTS)
def qkv(tag, x, bits, group, tq, tk, tv, yq, yk, yv, heads, kv_heads, hd, bq, bk, bv, qn, kn, eps, cos, sin):
    """x [H] fp32 -> yq, yk, yv (rows padded to 16): the three products from one rounding of x,
    then bias, q/k RMSNorm and the rotary embedding of q and k (_finish)."""
    xq, xs, xsum = _quantized(x, group)
    nq, nk, nv = tq.shape[0], tk.shape[0], tv.shape[0]
    for r in prange(nq + nk + nv):
        if r < nq:
            t, y, i = tq, yq, r
        elif r < nq + nk:
            t, y, i = tk, yk, r - nq
        else:
            t, y, i = tv, yv, r - nq - nk
        rowblock(tag, t.ctypes.data + i * t.shape[1] * t.shape[2], t.shape[2], bits, 0, t.shape[1], group,
                 xq.ctypes.data, xs.ctypes.data, xsum.ctypes.data, y.ctypes.data + i * 64, 1)
    none = cos[:0]
    _finish(yq, bq, qn, eps, heads, hd, cos, sin)
    _finish(yk, bk, kn, eps, kv_heads, hd, cos, sin)
    _finish(yv, bv, none, eps, kv_heads, hd, none, none)


@njit(fastmath=True, error_model="numpy", boundscheck=False)
def _dot(a, b):
    """sum a * b in any order (fastmath lets LLVM vectorize the reduction)."""
    s = np.float32(0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(inline="always", error_model="numpy", boundscheck=False)
def _axpy(o, w, v):
    for d in range(o.shape[0]):
        o[d] += w * v[d]


@njit(inline="always", error_model="numpy", boundscheck=False)
def _head(q, keys, values, S, scale, out, h):
    """Query head h: softmax(q_h k^T * scale) v into out[h * hd:(h + 1) * hd] (it reads KV head h // (heads / KV))."""
    kvh, hd = keys.shape[0], keys.shape[2]
    kv = h // (q.shape[0] // hd // kvh)
    qh = q[h * hd:(h + 1) * hd]
    p = np.empty(S, np.float32)
    m = np.float32(-np.inf)
    for j in range(S):
        s = _dot(qh, keys[kv, j]) * scale
        p[j] = s
        m = max(m, s)
    tot = np.float32(0)
    for j in range(S):
        p[j] = np.exp(p[j] - m)
        tot += p[j]
    o = out[h * hd:(h + 1) * hd]
    o[:] = 0
    for j in range(S):
        _axpy(o, p[j] / tot, values[kv, j])


@njit(inline="always", error_model="numpy", boundscheck=False)
def _topk_of(logits, k, renorm, scores, idx):
    """topk_router's steps after its products: softmax of logits, the k largest, renormalized."""
    E = logits.shape[0]
    m = np.float32(-np.inf)
    for e in range(E):
        m = max(m, logits[e])
    p = np.empty(E, np.float32)
    tot = np.float32(0)
    for e in range(E):
        p[e] = np.exp(logits[e] - m)
        tot += p[e]
    for e in range(E):
        p[e] /= tot
    taken = np.zeros(E, np.bool_)
    s = np.float32(0)
    for j in range(k):
        best = -1
        for e in range(E):
            if not taken[e] and (best < 0 or p[e] > p[best]):
                best = e
        taken[best] = True
        idx[j] = best
        scores[j] = p[best]
        s += p[best]
    if renorm:
        for j in range(k):
            scores[j] /= s


@njit(parallel=True, **_OPTS)
def attend_o(tag, q, keys, values, S, scale, to, bits, group, bo, out, y):
    """One query token against the first S cached keys/values [KV, >= S, hd]: out = softmax(q k^T *
    scale) v for every head (head h reads KV head h // (heads / KV), transformers' repeat_kv), then
    the output projection of out (tiles `to`, bias bo or empty) into y [N16]."""
    for h in prange(q.shape[0] // keys.shape[2]):
        _head(q, keys, values, S, scale, out, h)
    xq, xs, xsum = _quantized(out, group)
    nb = to.shape[0]
    for r in prange(nb):
        rowblock(tag, to.ctypes.data + r * to.shape[1] * to.shape[2], to.shape[2], bits, 0, to.shape[1], group,
                 xq.ctypes.data, xs.ctypes.data, xsum.ctypes.data, y.ctypes.data + r * 64, 1)
    for j in range(bo.shape[0]):
        y[j] += bo[j]


@njit(**_OPTS)
def topk_router(x, w, bias, k, renorm, logits, scores, idx):
    """logits = w x (+ bias); softmax; the k largest probabilities (the lower expert first among
    equals) in scores/idx, divided by their sum with `renorm`."""
    for e in range(w.shape[0]):
        v = _dot(w[e], x)
        if bias.shape[0]:
            v += bias[e]
        logits[e] = v
    _topk_of(logits, k, renorm, scores, idx)


# ---------------------------------------------------------------- a decoder layer in two calls
# layer_decode.py's fused step: the same inline steps in the same order as the calls above, so the
# same floats, with two dispatches a layer instead of five and no Python between them.

@njit(**_OPTS)
def norm_qkv(tag, x, nw, neps, h, bits, group, tq, tk, tv, yq, yk, yv, heads, kv_heads, hd, bq, bk, bv, qn, kn,
             eps, cos, sin):
    """h = RMSNorm(x) (rms_norm_rows), then qkv() of h."""
    h[:] = x
    _rms_norm(h, nw, neps)
    qkv(tag, h, bits, group, tq, tk, tv, yq, yk, yv, heads, kv_heads, hd, bq, bk, bv, qn, kn, eps, cos, sin)


@njit(**_OPTS)
def attend_route(tag, q, keys, values, S, scale, to, bits, group, bo, att, y, x, x2, nw, neps, h, rw, rb, k, renorm,
                 logits, scores, idx):
    """attend_o() into y, the residual x2 = x + y, h = RMSNorm(x2), then topk_router() of h."""
    attend_o(tag, q, keys, values, S, scale, to, bits, group, bo, att, y)
    for i in range(x.shape[0]):
        x2[i] = x[i] + y[i]
        h[i] = x2[i]
    _rms_norm(h, nw, neps)
    topk_router(h, rw, rb, k, renorm, logits, scores, idx)


@njit(inline="always", error_model="numpy", boundscheck=False)
def _pick(idx, scores, table, wts, addrs):
    """The routed experts in expert order (so summed in that order): their weights into wts, their
    gate_up and down tile addresses from table [2, E] into addrs."""
    order = np.argsort(idx)
    for j in range(idx.shape[0]):
        i = order[j]
        wts[j] = scores[i]
        addrs[0, j] = table[0, idx[i]]
        addrs[1, j] = table[1, idx[i]]


@njit(**_OPTS)
def attend_route_experts(tag, q, keys, values, S, scale, to, bits, group, bo, att, y, x, x2, nw, neps, h, rw, rb, k,
                         renorm, logits, scores, idx, table, wts, meta, inter, bbuf, fbuf, counters, addrs, nthreads):
    """attend_route(), then the routed experts of h added into x2: the experts' tile addresses taken
    from table [2, E] (every expert of the layer, resident), summed in expert order by the one-call
    layer kernel (the floats of kernels_layer.moe_layer_decode_at and x2 += its output)."""
    attend_route(tag, q, keys, values, S, scale, to, bits, group, bo, att, y, x, x2, nw, neps, h, rw, rb, k, renorm,
                 logits, scores, idx)
    _pick(idx, scores, table, wts, addrs)
    if nthreads == 1:
        layer_serial(tag, h, wts, addrs, meta, inter, bbuf, fbuf, counters)
    else:
        layer(tag, h, wts, addrs, meta, inter, bbuf, fbuf, counters, nthreads)
    off = fbuf.shape[0] - ((x.shape[0] + 15) // 16) * 16
    for i in range(x.shape[0]):
        x2[i] += fbuf[off + i]


# ---------------------------------------------------------------- every decoder layer in one region
# The stack used to make the calls above layer after layer: four parallel regions a layer (q/k/v rows,
# attention heads, o rows, the experts), each a fork and join of the thread pool (3-4 us measured),
# with the router's products on one thread. Here one region runs the whole token: its first thread
# (the driver) computes the serial steps and publishes each parallel phase; every thread, the driver
# too, claims the phase's units with an atomic counter, and the driver waits until every claimed unit
# is done. A helper that starts late, or never (a pool that runs the iterations one after another),
# only takes fewer units: nothing waits on a thread that did not claim. The units and serial steps
# are the calls' own, in the same order, so the floats are the same.

_QKV, _HEADS, _O, _ROUTE, _GATE_UP, _DOWN = 0, 1, 2, 3, 4, 5
_KINDS = 6
_LINE = 8  # int64s a cache line: each counter of `sync` on its own line
_ROUTE_UNIT = 16  # experts whose router products one unit computes


@njit(**_OPTS)
def _phase(ph, role, sync, nthreads, tag, S, scale, heads, hd, tq, tk, tv, to, bits_groups, knp, vnp, rw, rb, yq, yk,
           yv, y, att, h2, logits, xqh, xsh, xsumh, xqa, xsa, xsuma, wts, addrs, meta, inter, exq, hq, exs, exsum, hs,
           hsum, hbuf, yexp):
    """Claim and compute units of phase `ph` (1 + layer * _KINDS + kind) until none are left;
    returns the phase's unit count. `role`: the thread's row of hbuf."""
    kind, layer = (ph - 1) % _KINDS, (ph - 1) // _KINDS
    bg = bits_groups[layer]
    if kind == _QKV:
        total = tq[layer].shape[0] + tk[layer].shape[0] + tv[layer].shape[0]
    elif kind == _HEADS:
        total = heads
    elif kind == _O:
        total = to[layer].shape[0]
    elif kind == _ROUTE:
        total = (rw[layer].shape[0] + _ROUTE_UNIT - 1) // _ROUTE_UNIT
    elif kind == _GATE_UP:
        total = addrs.shape[1] * (inter // meta[4])
    else:
        total = (h2.shape[0] + 15) // 16
    c = _claim(total, nthreads)
    while True:
        u0 = atomic_add(sync, ph * 2 * _LINE, c)
        if u0 >= total:
            break
        u1 = min(u0 + c, total)
        if kind == _QKV:
            nq, nk = tq[layer].shape[0], tk[layer].shape[0]
            for r in range(u0, u1):
                if r < nq:
                    t, out, i = tq[layer], yq, r
                elif r < nq + nk:
                    t, out, i = tk[layer], yk, r - nq
                else:
                    t, out, i = tv[layer], yv, r - nq - nk
                rowblock(tag, t.ctypes.data + i * t.shape[1] * t.shape[2], t.shape[2], bg[0], 0, t.shape[1], bg[1],
                         xqh.ctypes.data, xsh.ctypes.data, xsumh.ctypes.data, out.ctypes.data + i * 64, 1)
        elif kind == _HEADS:
            for hh in range(u0, u1):
                _head(yq[:heads * hd], knp[layer], vnp[layer], S, scale, att, hh)
        elif kind == _O:
            t = to[layer]
            for r in range(u0, u1):
                rowblock(tag, t.ctypes.data + r * t.shape[1] * t.shape[2], t.shape[2], bg[2], 0, t.shape[1], bg[3],
                         xqa.ctypes.data, xsa.ctypes.data, xsuma.ctypes.data, y.ctypes.data + r * 64, 1)
        elif kind == _ROUTE:
            w, bias = rw[layer], rb[layer]
            for e in range(u0 * _ROUTE_UNIT, min(u1 * _ROUTE_UNIT, w.shape[0])):
                v = _dot(w[e], h2)
                if bias.shape[0]:
                    v += bias[e]
                logits[e] = v
        elif kind == _GATE_UP:
            _gate_up_units(tag, addrs, meta, inter, exq, hq, exs, exsum, hs, hsum, hbuf[role], h2.shape[0], u0, u1)
        else:
            _down_units(tag, wts, addrs, meta, inter, hq, hs, hsum, hbuf[role][:16], yexp, u0, u1)
        atomic_add(sync, ph * 2 * _LINE + _LINE, u1 - u0)
    return total


@njit(parallel=True, **_OPTS)
def stack(tag, x, cos, sin, n, n1w, n1eps, tq, tk, tv, bq, bk, bv, qn, kn, bits_groups, qk_eps, to, bo, scale,
          heads, kv_heads, hd, n2w, n2eps, rw, rb, k, renorm, tables, meta, inter, bbuf, fbuf, counters, addrs,
          nthreads, knp, vnp, idx_out):
    """Every decoder layer of one decode token, in order, as layer_decode's fused step computes each
    with its experts resident (norm_qkv, the new key and value written at position n of the layer's
    buffers, attend_route_experts), in one parallel region (see above): x [H] is the first layer's
    input and becomes the last one's output. Per layer l: the lists' l-th arrays, n1eps/n2eps/qk_eps[l],
    bits_groups[l] = (q/k/v bits, group, o bits, group); idx_out[l] = the layer's top-k experts."""
    L, H = len(tq), x.shape[0]
    yq = np.empty(tq[0].shape[0] * 16, np.float32)
    yk = np.empty(tk[0].shape[0] * 16, np.float32)
    yv = np.empty(tv[0].shape[0] * 16, np.float32)
    y = np.empty(to[0].shape[0] * 16, np.float32)
    att = np.empty(heads * hd, np.float32)
    h = np.empty_like(x)
    h2 = np.empty_like(x)
    x2 = np.empty_like(x)
    logits = np.empty(rw[0].shape[0], np.float32)
    scores = np.empty(k, np.float32)
    idx = np.empty(k, np.int64)
    wts = np.empty(k, np.float32)
    xqh, xsh, xsumh = np.empty(H, np.int8), np.empty(H // 32, np.float32), np.empty(H // 32, np.float32)
    xqa, xsa, xsuma = (np.empty(heads * hd, np.int8), np.empty(heads * hd // 32, np.float32),
                       np.empty(heads * hd // 32, np.float32))
    exq, hq, exs, exsum, hs, hsum, hbuf, yexp = _views(h2, addrs, meta, inter, bbuf, fbuf, nthreads)
    sync = np.zeros((L * _KINDS + 2) * 2 * _LINE, np.int64)  # [0]: the published phase, [_LINE]: arrivals
    done = L * _KINDS + 1
    S = n + 1
    for t in prange(nthreads):
        role = atomic_add(sync, _LINE, 1)  # the first thread to arrive drives
        if role == 0:
            for layer in range(L):
                bg = bits_groups[layer]
                h[:] = x
                _rms_norm(h, n1w[layer], n1eps[layer])
                quant_groups(h, bg[1], xqh, xsh, xsumh)
                for kind in range(_KINDS):
                    ph = 1 + layer * _KINDS + kind
                    if kind == _HEADS:
                        none = cos[:0]
                        _finish(yq, bq[layer], qn[layer], qk_eps[layer], heads, hd, cos, sin)
                        _finish(yk, bk[layer], kn[layer], qk_eps[layer], kv_heads, hd, cos, sin)
                        _finish(yv, bv[layer], none, qk_eps[layer], kv_heads, hd, none, none)
                        keys, values = knp[layer], vnp[layer]
                        for a in range(kv_heads):
                            for d in range(hd):
                                keys[a, n, d] = yk[a * hd + d]
                                values[a, n, d] = yv[a * hd + d]
                    elif kind == _O:
                        quant_groups(att, bg[3], xqa, xsa, xsuma)
                    elif kind == _ROUTE:
                        b = bo[layer]
                        for j in range(b.shape[0]):
                            y[j] += b[j]
                        for i in range(H):
                            x2[i] = x[i] + y[i]
                            h2[i] = x2[i]
                        _rms_norm(h2, n2w[layer], n2eps[layer])
                    elif kind == _GATE_UP:
                        _topk_of(logits, k, renorm, scores, idx)
                        _pick(idx, scores, tables[layer], wts, addrs)
                        quant_groups(h2, meta[1], exq, exs, exsum)
                    atomic_add(sync, 0, 1)  # publish phase ph
                    total = _phase(ph, 0, sync, nthreads, tag, S, scale, heads, hd, tq, tk, tv, to, bits_groups, knp,
                                   vnp, rw, rb, yq, yk, yv, y, att, h2, logits, xqh, xsh, xsumh, xqa, xsa, xsuma, wts,
                                   addrs, meta, inter, exq, hq, exs, exsum, hs, hsum, hbuf, yexp)
                    while atomic_load(sync, ph * 2 * _LINE + _LINE) < total:
                        yield_cpu()
                for i in range(H):
                    x2[i] += yexp[i]
                idx_out[layer] = idx
                x[:] = x2
            atomic_add(sync, 0, 1)  # done
        else:
            seen = 0
            while True:
                ph = atomic_load(sync, 0)
                if ph >= done:
                    break
                if ph > seen:
                    seen = ph
                    _phase(ph, role, sync, nthreads, tag, S, scale, heads, hd, tq, tk, tv, to, bits_groups, knp, vnp,
                           rw, rb, yq, yk, yv, y, att, h2, logits, xqh, xsh, xsumh, xqa, xsa, xsuma, wts, addrs, meta,
                           inter, exq, hq, exs, exsum, hs, hsum, hbuf, yexp)
                else:
                    yield_cpu()
