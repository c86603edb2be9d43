#!/usr/bin/env bash
# The GPU tier's check, for a session that is lent a GPU (issue #13; README, "GPU tier").
# NOT RUN YET: prepared on machines without a GPU.
#
# Run from the repository root on the GPU machine, e.g. through the device tool:
#     bash tools/gpu_check.sh            (timeout_s 600; writes everything into $OUT)
# It runs (1) the CUDA test group, (2) one short bench on --shape quarter with a VRAM budget of 25% of
# the experts (2 of 8 per layer), modes offload and accelerate, JSON into $OUT. Each step has its own
# timeout so that the other still reports; the step times go to $OUT/steps.txt.
#
# Dependencies: the machine's python3 has CUDA torch, transformers, safetensors, tokenizers, numba,
# accelerate, pytest and hypothesis, and no registry. If its transformers is older than this project
# needs (>= 5.20; the experts seam), put wheels in shared/wheels/ (or $WHEELS) and they are installed
# with --no-index first.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BENCH_DIR=${BENCH_DIR:-/tmp/moe-offload-bench}
step() { echo "$(date -u +%T) $*" | tee -a "$OUT/steps.txt"; }

step "start"
WHEELS=${WHEELS:-$PWD/shared/wheels}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    step "installing carried wheels from $WHEELS"
    $PY -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl >"$OUT/pip.txt" 2>&1 || step "pip failed (see pip.txt)"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("transformers", "accelerate", "safetensors", "tokenizers", "numba", "pytest", "hypothesis"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", e)
EOF
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

step "cuda tests"
timeout 240 $PY -m pytest -m cuda tests/test_cuda.py -ra -q -s -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.txt" | tail -40
step "cuda tests done (exit ${PIPESTATUS[0]})"

# The bench: builds the random quarter model and its 4-bit store on first use (a few minutes on
# 16 cores), then offload (2 of 8 experts per layer in VRAM, all experts in pinned host RAM) and
# accelerate (a GPU device_map holding the same bytes, the rest in host RAM).
step "bench quarter (build/convert if needed)"
timeout 330 $PY -m moe_offload bench --shape quarter --dir "$BENCH_DIR" --device cuda \
    --experts-per-layer 2 --host-cache 4GiB --modes offload accelerate \
    --prompts 1 --max-new-tokens 32 --accelerate-tokens 8 \
    --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.txt" | tail -40
step "bench done (exit ${PIPESTATUS[0]})"
if [ -f "$OUT/bench_cuda.json" ]; then
    $PY - "$OUT/bench_cuda.json" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
modes = r.get("modes", r)
for name in ("offload", "accelerate"):
    m = modes.get(name) or {}
    print(name, {k: m.get(k) for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "pcie_bytes",
                                          "experts_cpu", "load_seconds")})
a, o = (modes.get("accelerate") or {}).get("decode_tokens_per_s"), (modes.get("offload") or {}).get("decode_tokens_per_s")
if a and o:
    print(f"offload / accelerate decode: {o / a:.2f}x (target >= 3x)")
EOF
fi
step "end"
