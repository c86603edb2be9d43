"""Candidate GPU products for the stored formats, timed side by side (issue #13, item 2): the next
GPU session chooses the device kernel by these numbers. NOT RUN YET: written after the first GPU
run showed the per-call dequantization (kernels_device.py) to be what holds decode back there.

    PYTHONPATH=src python3 tools/gpu_kernels.py [--json FILE]

For each quarter-Mixtral matrix shape ([N, K]: expert gate_up and down, attention q and k/v,
lm_head), one token of bf16 activations (and 128 for prefill), 4-bit group 64:
  dequant-rowtile   kernels_device.linear on a rowtile matrix (today's path for the default store)
  dequant-int4pack  kernels_device.linear on an int4pack matrix
  bf16-cached       F.linear on the weight dequantized once (what a dense part kept in 16 bits costs)
  cuda-int4         torch's CUDA int4 op (_weight_int4pack_mm) on the codes repacked on the device,
                    the repack timed too (what filling a VRAM slot would cost)
Each product's error against the fp32 reference product on the same quantized weights is printed
next to its time (CUDA events, median of 50 after 5 warm-ups). Failures print and the rest go on.
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from moe_offload import kernels_device, kernels_layer, quant

SHAPES = {"expert gate_up": (7168, 1024), "expert down": (1024, 3584), "attention q": (1024, 1024),
          "attention k/v": (256, 1024), "lm_head": (32000, 1024)}
BITS, GROUP = 4, 64


def cuda_time(fn, reps: int = 50) -> float:
    """Median milliseconds of fn() on the GPU."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def on_device(m: quant.QMatrix) -> quant.QMatrix:
    return quant.QMatrix(m.fmt, m.n, m.k, m.bits, m.group, {k: v.cuda() for k, v in m.tensors.items()})


def cuda_int4(codes: torch.Tensor, scales_zeros: torch.Tensor):
    """(repack: codes [N, K] uint8 -> the CUDA op's layout, product: x -> y), gpt-fast's recipe."""
    packed = (codes[:, ::2].to(torch.int32) << 4 | codes[:, 1::2].to(torch.int32)).to(torch.uint8).cuda()
    repack = lambda: torch.ops.aten._convert_weight_to_int4pack(packed, 8)  # noqa: E731
    w = repack()
    sz = scales_zeros.to(torch.bfloat16).cuda()  # [K/group, N, 2]: w = (q - 8) * scale + zero
    return repack, lambda x: torch.ops.aten._weight_int4pack_mm(x, w, GROUP, sz)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the table here too")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        rowtile = kernels_layer.quantize_rowtile(w, BITS, GROUP, optimize=False)
        int4 = quant.quantize(w, BITS, GROUP, optimize=False, fmt="int4pack")
        reference_w = quant.dequantize(int4)
        for tokens in (1, 128):
            x32 = torch.randn(tokens, k)
            x = x32.to(torch.bfloat16).cuda()
            expected = (x.float().cpu() @ quant.dequantize(rowtile).t())
            expected_int4 = (x.float().cpu() @ reference_w.t())
            row = {"shape": name, "n": n, "k": k, "tokens": tokens}
            candidates = {
                "dequant-rowtile": lambda m=on_device(rowtile): kernels_device.linear(x, m),
                "dequant-int4pack": lambda m=on_device(int4): kernels_device.linear(x, m),
                "bf16-cached": lambda wb=reference_w.to(torch.bfloat16).cuda(): F.linear(x, wb),
            }
            try:
                repack, product = cuda_int4(quant.unpack_int4pack(int4.tensors["packed"], n, k),
                                            int4.tensors["scales_zeros"])
                candidates["cuda-int4"] = lambda: product(x)
                row["cuda-int4 repack ms"] = round(cuda_time(repack, reps=10), 4)
            except Exception as e:  # the op's availability and signature vary across torch builds
                row["cuda-int4 error"] = f"{type(e).__name__}: {e}"[:200]
            for label, fn in candidates.items():
                try:
                    got = fn().float().cpu()
                    truth = expected if label == "dequant-rowtile" else expected_int4
                    row[f"{label} ms"] = round(cuda_time(fn), 4)
                    row[f"{label} err"] = float((got - truth).abs().max() / truth.abs().max())
                except Exception as e:
                    row[f"{label} error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
