#!/usr/bin/env bash
# The GPU tier's check, for a session that is lent a GPU (issue #13; README, "GPU tier").
#
# Run from the repository root on the GPU machine, e.g. through the device tool:
#     bash tools/gpu_check.sh            (writes everything into $OUT)
# It (1) builds the random --shape quarter model and its 4-bit store in the background (CPU work),
# (2) runs the CUDA test group meanwhile, (3) runs one short bench on that store with a VRAM budget of
# 25% of the experts (2 of 8 per layer): modes offload, resident and accelerate, JSON into $OUT;
# (4) times the candidate GPU products for the stored formats (tools/gpu_kernels.py).
# Each step has its own timeout so that the others still report; step times go to $OUT/steps.txt.
#
# Dependencies: the machine's python3 has CUDA torch, safetensors, tokenizers, numba, accelerate,
# pytest and hypothesis, and no registry. Put what it lacks on PYTHONPATH first (transformers >= 5.20
# for the experts seam; fastapi, starlette, pydantic, uvicorn for the CLI), e.g. wheels unpacked with
# `pip install --no-index --no-deps --target /tmp/site WHEELS` (README, "GPU tier").
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
BENCH_DIR=${BENCH_DIR:-/tmp/moe-offload-bench}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
step() { echo "$(date -u +%T) $*" | tee -a "$OUT/steps.txt"; }

step "start"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/Flags:.*\(avx512_vnni\|amx_tile\).*/Flags: (has \1 ...)/'
    $PY - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("transformers", "accelerate", "safetensors", "tokenizers", "numba", "fastapi", "pytest", "hypothesis"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", e)
from moe_offload import quant
print("rowtile on this CPU:", quant.rowtile_fast())
PYEOF
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

step "building the quarter model and store in the background"
( timeout $((TEST_TIMEOUT + 60)) $PY -c "
import sys; from pathlib import Path
from moe_offload.bench import prepare_shape
prepare_shape('quarter', Path(sys.argv[1]))" "$BENCH_DIR" >"$OUT/prepare.txt" 2>&1; echo "prepare exit $?" >>"$OUT/prepare.txt" ) &
PREPARE=$!

step "cuda tests"
timeout "$TEST_TIMEOUT" $PY -m pytest -m cuda tests/test_cuda.py -ra -q -s -p no:cacheprovider --tb=short \
    >"$OUT/cuda_tests.txt" 2>&1
step "cuda tests done (exit $?)"
grep -E "passed|failed|error|max logit|measured at load" "$OUT/cuda_tests.txt" | tail -40

wait $PREPARE
step "prepare done: $(tail -1 "$OUT/prepare.txt")"
step "bench quarter"
timeout "$BENCH_TIMEOUT" $PY -m moe_offload bench "$BENCH_DIR/quarter/store-e4-d4" --device cuda \
    --experts-per-layer 2 --host-cache 4GiB --modes offload resident accelerate --no-plan \
    --prompts 1 --max-new-tokens 32 --accelerate-tokens 8 \
    --json "$OUT/bench_cuda.json" >"$OUT/bench.txt" 2>&1
step "bench done (exit $?)"
tail -45 "$OUT/bench.txt"
if [ -f "$OUT/bench_cuda.json" ]; then
    $PY - "$OUT/bench_cuda.json" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
modes = r.get("modes", r)
for name in ("offload", "resident", "accelerate"):
    m = modes.get(name) or {}
    print(name, {k: m.get(k) for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "pcie_bytes",
                                          "experts_cpu")})
a, o = (modes.get("accelerate") or {}).get("decode_tokens_per_s"), (modes.get("offload") or {}).get("decode_tokens_per_s")
if a and o:
    print(f"offload / accelerate decode: {o / a:.2f}x (target >= 3x)")
PYEOF
fi
step "candidate GPU products (tools/gpu_kernels.py)"
timeout "${KERNELS_TIMEOUT:-120}" $PY tools/gpu_kernels.py --json "$OUT/gpu_kernels.json" >"$OUT/gpu_kernels.txt" 2>&1
step "kernels done (exit $?)"
tail -12 "$OUT/gpu_kernels.txt"
step "end"
