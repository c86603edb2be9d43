"""Time the fused "grouped" kernel against int4pack and dequantize-then-matmul, side by side.

    flock /tmp/cpu.lock .venv/bin/python tools/bench_grouped.py [--quick]
GB/s = bytes of the stored weight tensors / time (what a cache miss must read from disk).
"""
import argparse
import time

import torch

from moe_offload import kernels, kernels_grouped, quant


def int4pack_fits(n, k, g):
    return quant.int4pack_available() and n % 16 == 0 and quant.effective_group(k, g) in quant.INT4PACK_GROUPS


def best_ms(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3, sorted(ts)[len(ts) // 2] * 1e3


def batch1(shapes, configs):
    print("shape        bits g   format    bytes       best ms  median ms  GB/s")
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k)
        for bits, g in configs:
            fmts = ["grouped"] + (["int4pack"] if int4pack_fits(n, k, g) else [])
            for fmt in fmts:
                m = quant.quantize(w, bits, g, optimize=False, fmt=fmt)
                xx = x.to(torch.bfloat16) if fmt == "int4pack" else x  # int4pack wants bf16 (FACTS)
                best, med = best_ms(lambda: kernels.linear(xx, m), reps=10 if n * k > 5e7 else 30)
                print(f"[{n},{k}]".ljust(13), bits, str(g).ljust(3), fmt.ljust(9), str(m.nbytes).ljust(11),
                      f"{best:7.3f}  {med:8.3f}  {m.nbytes / best / 1e6:5.1f}")


def batches(n, k, bits, g):
    w = torch.randn(n, k) * 0.02
    m = quant.quantize(w, bits, g, optimize=False, fmt="grouped")
    m4 = quant.quantize(w, bits, g, optimize=False, fmt="int4pack") if int4pack_fits(n, k, g) else None
    print(f"[{n},{k}] {bits}-bit g{g}: ms of fused / dequant+fp32 matmul (fp32 x) / int4pack (bf16 x)")
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        x = torch.randn(b, k)
        fused, _ = best_ms(lambda: kernels_grouped.linear(x, m, batch_threshold=10**9), reps=10)
        deq, _ = best_ms(lambda: kernels_grouped.linear(x, m, batch_threshold=0), reps=10)
        i4 = best_ms(lambda: kernels.linear(x.to(torch.bfloat16), m4), reps=10)[0] if m4 else float("nan")
        print(f"  batch {b:4d}: fused {fused:8.3f}  dequant {deq:8.3f}  int4pack {i4:8.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.batches:
        batches(7168, 1024, 2, 16)
        batches(7168, 1024, 2, 32)
        batches(1024, 3584, 3, 64)
    else:
        shapes = [(7168, 1024)] if a.quick else [(7168, 1024), (1024, 3584), (28672, 4096)]
        batch1(shapes, [(2, 16), (2, 32), (3, 64)])
