"""Time the one-call MoE layer kernel (kernels_layer, "rowtile") against the per-expert int4pack path.

    PYTHONPATH=src .venv/bin/python tools/bench_layer_kernel.py [--mb 400] [--calls 200] [--variant vnni512]

Batch 1, 4-bit, group 64, two shapes: the quarter-Mixtral expert (H=1024, I=3584, top-2) and a
Qwen3-style one (H=512, I=192, top-8 of 128). Each shape gets enough distinct experts (copies of
a few quantized ones at distinct addresses, in one buffer made as the expert cache makes its
slots: 2 MiB pages) to fill --mb MB, more than the caches, and the calls walk through them in
turn, so every call reads its weights from RAM. GB/s = bytes of the stored expert tensors the
call reads / median time; % of RAM bandwidth = that / the best bandwidth measured. "At kept
addresses" is the same kernel called as the offloaded model calls it (moe_layer_decode_at: tile
addresses kept per slot, the layer's shape checked once), without moe_layer_decode's checks. Cache-warm
rows (the same experts every call) show the compute ceiling, and the cost of a tiny call the
fixed cost (Python, dispatch, launch). The RAM bandwidth is measured here too (a 1 GiB torch sum,
two threads, on 2 MiB pages like the experts; the 4 KiB figure is printed beside it), and every
timing holds /tmp/cpu.lock (the machine is shared: the load average is printed with the
numbers). Also prints the error the int8 activations add (kernel vs the fp32 reference on the
same quantized weights).
"""
import argparse
import contextlib
import fcntl
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from moe_offload import kernels, kernels_layer, quant
from moe_offload.loader import aligned_buffer

SHAPES = {"quarter-mixtral": (1024, 3584, 2, 8), "qwen3-style": (512, 192, 8, 128)}  # H, I, top-k, experts


@contextlib.contextmanager
def cpu_lock():
    with open("/tmp/cpu.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ram_bandwidth(threads=2, reps=7, huge=False):
    """(best, median) GB/s of a 1 GiB torch sum; `huge`: in memory advised for 2 MiB pages, as the
    expert cache's slots are (loader.aligned_buffer), which streams faster than 4 KiB pages."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = aligned_buffer(1 << 30).view(torch.float32).fill_(1) if huge else torch.ones(1 << 28)  # 1 GiB fp32
    a.sum()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t)
    torch.set_num_threads(old)
    return a.nbytes / min(ts) / 1e9, a.nbytes / float(np.median(ts)) / 1e9


def make_experts(H, I, distinct, copies, fmt):
    """`copies` experts at distinct addresses, cycling through `distinct` independently quantized ones."""
    base = []
    for _ in range(distinct):
        gu, dn = torch.randn(2 * I, H) * 0.02, torch.randn(H, I) * 0.02
        if fmt == "rowtile":
            base.append((kernels_layer.quantize_rowtile(gu, 4, 64, optimize=False),
                         kernels_layer.quantize_rowtile(dn, 4, 64, optimize=False)))
        else:
            base.append((quant.quantize(gu, 4, 64, optimize=False, fmt="int4pack"),
                         quant.quantize(dn, 4, 64, optimize=False, fmt="int4pack")))

    # The copies live in one buffer made the way the expert cache makes its slots (huge pages).
    per = sum(t.nbytes for g, d in base[:1] for m in (g, d) for t in m.tensors.values())
    arena, used = aligned_buffer(per * copies + 64 * 2 * len(base[0][0].tensors) * copies), 0

    def clone(m):
        nonlocal used
        tensors = {}
        for k, v in m.tensors.items():
            used = -(-used // 64) * 64
            t = arena[used:used + v.nbytes].view(v.dtype).view(v.shape)
            t.copy_(v)
            tensors[k] = t
            used += v.nbytes
        return quant.QMatrix(m.fmt, m.n, m.k, m.bits, m.group, tensors)

    return [(clone(g), clone(d)) for g, d in (base[i % distinct] for i in range(copies))]


def per_expert_int4pack(x, experts, weights):
    """The current decode path (moe.py): one expert_forward per expert, scaled and summed."""
    out = None
    for (gu, dn), w in zip(experts, weights):
        y = kernels.expert_forward(x, gu, dn, F.silu).mul_(w)
        out = y if out is None else out.add_(y)
    return out


def at_addresses(experts, variant):
    """The call the offloaded model makes (moe.LayerExperts._one_call): moe_layer_decode_at on tile
    addresses kept per slot (here: per expert), the shape checked once."""
    addrs = {id(g): (g.tensors["tiles"].data_ptr(), d.tensors["tiles"].data_ptr()) for g, d in experts}
    shape, tag = kernels_layer.layer_shape(*experts[0]), kernels_layer._tag(variant)

    def fn(x, sel, w):
        a = [addrs[id(g)] for g, _ in sel]
        return kernels_layer.moe_layer_decode_at(x[0].numpy(), shape, [p for p, _ in a], [q for _, q in a], w, tag)
    return fn


def time_calls(fn, experts, k, calls, H):
    """Seconds per call over `calls` calls, each on the next k experts (wrapping around)."""
    x = torch.randn(1, H)
    w = torch.rand(k).tolist()
    n = len(experts)
    for i in range(3):
        fn(x, experts[i * k % n:i * k % n + k], w)
    ts = []
    for i in range(calls):
        j = (i * k) % (n - k + 1)
        sel = experts[j:j + k]
        t = time.perf_counter()
        fn(x, sel, w)
        ts.append(time.perf_counter() - t)
    return np.array(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400, help="MB of distinct experts per shape and format")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--variant", default=None, help=f"one of {kernels_layer.usable_variants()}")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--threads", type=int, default=2, help="threads of both paths (torch and the layer kernel)")
    a = ap.parse_args()
    torch.manual_seed(0)
    kernels_layer._threads()  # numba starts its OpenMP pool, shared with torch: that resets torch's thread count
    torch.set_num_threads(a.threads)
    variant = a.variant or kernels_layer.variant()
    with cpu_lock():
        load = os.getloadavg()
        bw_small, _ = ram_bandwidth()
        bw, bw_med = ram_bandwidth(huge=True)
    print(f"RAM read bandwidth (1 GiB torch sum, 2 threads, 2 MiB pages as the experts'): best {bw:.1f} GB/s, "
          f"median {bw_med:.1f} (4 KiB pages: best {bw_small:.1f}); load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}")
    print(f"rowtile variant: {variant} (usable here: {', '.join(kernels_layer.usable_variants())}), "
          f"threads {kernels_layer._threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    tiny = make_experts(32, 32, 8, 8, "rowtile")
    with cpu_lock():
        ts = time_calls(lambda x, sel, w: kernels_layer.moe_layer_decode(x[0], sel, w, F.silu, variant_=variant),
                        tiny, 8, 2000, 32)
    print(f"fixed cost of a call (8 experts of [64, 32] + [32, 32]): best {ts.min() * 1e6:.1f} us, "
          f"median {np.median(ts) * 1e6:.1f} us")
    with cpu_lock():
        ts = time_calls(at_addresses(tiny, variant), tiny, 8, 2000, 32)
    print(f"  the same at kept addresses (moe_layer_decode_at, as the model calls it): best {ts.min() * 1e6:.1f} us, "
          f"median {np.median(ts) * 1e6:.1f} us")
    for name in a.shapes.split(","):
        H, I, k, E = SHAPES[name]
        rt = make_experts(H, I, 8, 1, "rowtile")[0]
        per_expert = rt[0].nbytes + rt[1].nbytes
        copies = max(4 * k, a.mb * 10**6 // per_expert)
        results = {}
        for fmt in ("rowtile", "rowtile-at", "int4pack"):
            exps = make_experts(H, I, 8, copies, fmt.removesuffix("-at"))
            nbytes = sum(g.nbytes + d.nbytes for g, d in exps[:k])
            if fmt == "rowtile":
                fn = lambda x, sel, w: kernels_layer.moe_layer_decode(x[0], sel, w, F.silu, variant_=variant)
            elif fmt == "rowtile-at":
                fn = at_addresses(exps, variant)
            else:
                fn = per_expert_int4pack
            with cpu_lock():
                load = os.getloadavg()[0]
                ts = time_calls(fn, exps, k, a.calls, H)
            results[fmt] = (nbytes, ts, load)
            del exps
        print(f"\n{name}: H={H} I={I} top-{k} of {E}, 4-bit g64, {copies} distinct experts per format "
              f"({copies * per_expert / 1e6:.0f} MB rowtile)")
        print("  path                      bytes/call   best us  median us  GB/s(med)  % of RAM bw  load")
        for fmt, label in (("rowtile", "one call (rowtile)"), ("rowtile-at", "  at kept addresses"),
                           ("int4pack", "per expert (int4pack)")):
            nbytes, ts, load = results[fmt]
            best, med = ts.min(), float(np.median(ts))
            print(f"  {label:24s} {nbytes:11d} {best * 1e6:9.1f} {med * 1e6:10.1f} {nbytes / med / 1e9:10.1f}"
                  f" {100 * nbytes / med / 1e9 / bw:10.0f}%  {load:.2f}")
        for fmt, label in (("rowtile", "one call, cache-warm"), ("int4pack", "per expert, cache-warm")):
            exps = make_experts(H, I, k, k, fmt)  # the same k experts every call: no RAM traffic
            fn = (lambda x, sel, w: kernels_layer.moe_layer_decode(x[0], sel, w, F.silu, variant_=variant)) \
                if fmt == "rowtile" else per_expert_int4pack
            with cpu_lock():
                load = os.getloadavg()[0]
                ts = time_calls(fn, exps, k, a.calls, H)
            nbytes = sum(g.nbytes + d.nbytes for g, d in exps)
            print(f"  {label:24s} {nbytes:11d} {ts.min() * 1e6:9.1f} {np.median(ts) * 1e6:10.1f}"
                  f" {nbytes / np.median(ts) / 1e9:10.1f}    (cache)        {load:.2f}")
        r, p = results["rowtile"], results["int4pack"]
        print(f"  speed-up of the median: {np.median(p[1]) / np.median(r[1]):.2f}x; "
              f"best call: {100 * r[0] / r[1].min() / 1e9 / bw:.0f}% of the RAM bandwidth")
        exps = make_experts(H, I, k, k, "rowtile")
        errs = []
        for _ in range(5):
            x, w = torch.randn(H), torch.rand(k).tolist()
            y = kernels_layer.moe_layer_decode(x, exps, w, F.silu, variant_=variant)
            ref = kernels_layer.moe_layer_reference(x, exps, w, F.silu, quantize=False)
            errs.append(((y - ref).norm() / ref.norm()).item())
        print(f"  int8 activations: relative error of the layer output vs fp32 activations (same weights), "
              f"5 random x: mean {np.mean(errs):.4f}, max {np.max(errs):.4f}")


if __name__ == "__main__":
    main()
