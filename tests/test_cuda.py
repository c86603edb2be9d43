"""The GPU tier on a real GPU: the CUDA transport, equivalence with transformers on the GPU, the
offload path on quantized stores, hybrid CPU compute. Marked `cuda`: run them with `pytest -m cuda`
(tools/gpu_check.sh); without a CUDA device every test here is skipped, saying why.

Run once on an H200 (README, "GPU tier"); the same logic with the "device" in host memory is
tested on the CPU in tests/test_tiers.py.
"""
import json

import pytest
import torch

import moe_offload
from conftest import CONFIGS, run_cli
from moe_offload import kernels
from moe_offload.cache import ExpertCache
from moe_offload.stats import OffloadStats
from moe_offload.store import Store
from moe_offload.synthetic import build_random_mixtral
from moe_offload.tiers import HostCache, TierCosts

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device (torch.cuda.is_available() is False): the GPU tier's tests need one"),
]

DECODE_STEPS = 12


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matmuls in fp32 (not TF32), so fp32 comparisons mean what they say."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _transport():
    from moe_offload.transport_cuda import CudaTransport

    return CudaTransport("cuda")


def test_transport_copies_a_pinned_blob_into_vram_and_measures_the_link():
    t = _transport()
    src = t.allocate_host(1 << 20)
    assert src.is_pinned()
    src.copy_(torch.randint(0, 256, (1 << 20,), dtype=torch.uint8))
    dest = t.allocate_device(1 << 20)
    t.copy(src, dest)
    assert dest.is_cuda and torch.equal(dest.cpu(), src)
    bandwidth, latency = t.measure(1 << 22)
    assert bandwidth > 1e8 and 0 <= latency < 0.1, (bandwidth, latency)


def test_three_tiers_with_vram_slots(tiny_store4):
    """disk -> pinned host slots -> VRAM slots: contents, hits and bytes per hop."""
    from moe_offload.loader import DiskLoader

    st = Store.open(tiny_store4)
    stats = OffloadStats(st.moe_layers)
    t = _transport()
    host = HostCache(DiskLoader(st, stats), 4, st.blob_size, stats, t, st.layout.views)
    assert host.buffer.is_pinned()
    device = ExpertCache(st.moe_layers, 2, st.blob_size, host, stats, allocate=t.allocate_device)
    assert device.buffer.is_cuda
    layer = st.moe_layers[0]
    with open(st.path / "experts.bin", "rb") as f:
        b = st.blob(layer, 1)
        f.seek(b["offset"])
        expected = torch.frombuffer(bytearray(f.read(b["size"])), dtype=torch.uint8)
    for e, views in device.stream(layer, [1]):
        assert torch.equal(device.residency[(layer, 1)].buffer.cpu(), expected)
    device.forget(layer)
    list(device.stream(layer, [1]))  # a host hit
    assert (stats.host_misses, stats.host_hits, stats.bytes_to_device) == (1, 1, 2 * st.blob_size)
    host.close()


def _reference(src, dtype, ids, experts_implementation="eager"):
    """transformers' logits on the GPU. "eager" is its plain loop over experts (the semantics we
    match); its GPU default, "grouped_mm", sums in another order, which bf16 rounding can show."""
    from transformers import MixtralForCausalLM

    ref = MixtralForCausalLM.from_pretrained(src, dtype=dtype,
                                             experts_implementation=experts_implementation).to("cuda").eval()
    with torch.no_grad():
        prefill = ref(ids).logits
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_STEPS, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return prefill, expected


def _logits(model, ids):
    with torch.no_grad():
        prefill = model(ids).logits
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_STEPS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return prefill, got


def _max_diff(prefill, got, ref_prefill, expected) -> float:
    """The largest logit difference over the prompt and every decode step."""
    diffs = [(prefill - ref_prefill).abs().max().item()]
    diffs += [(a - b).abs().max().item() for a, b in zip(got.logits, expected.logits)]
    return max(diffs)


def _compare(model, ids, ref_prefill, expected, tol):
    prefill, got = _logits(model, ids)
    diff = _max_diff(prefill, got, ref_prefill, expected)
    assert diff <= tol, f"logits differ by {diff}"
    assert torch.equal(got.sequences, expected.sequences)
    return prefill, got


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-3)])
def test_16bit_logits_equal_transformers_on_the_gpu(tmp_path, dtype, tol):
    cfg = CONFIGS["gqa"]
    src = build_random_mixtral(tmp_path / "src", cfg, seed=3, tokenizer=False, dtype=dtype)
    store = moe_offload.convert(src, tmp_path / "store", expert_bits=16, dense_bits=16, progress=False)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (1, 11), device="cuda")
    prefill, expected = _reference(src, dtype, ids)
    grouped = _reference(src, dtype, ids, None)  # transformers' default on this GPU: reported, not asserted
    blob = Store.open(store).blob_size
    for k in (cfg["num_experts_per_tok"], cfg["num_local_experts"]):
        for prefetch in (0, 2):
            for host in (None, 3 * blob):
                model = moe_offload.load(store, device="cuda", dtype=dtype, experts_per_layer=k, prefetch=prefetch,
                                         host_cache=host)
                try:
                    assert model.offload_runtime.cache.buffer.is_cuda
                    assert next(model.parameters()).is_cuda
                    ours = _compare(model, ids, prefill, expected, tol)
                    print(f"{dtype} k={k} prefetch={prefetch} host={host}: max logit difference "
                          f"{_max_diff(*ours, prefill, expected):.3g} from eager, "
                          f"{_max_diff(*ours, *grouped):.3g} from transformers' default experts")
                    s = model.offload_stats().as_dict()
                    assert s["bytes_to_device"] == (s["misses"] + s["prefetch_loads"] - s["experts_cpu"]) * blob
                finally:
                    model.close()


@pytest.mark.parametrize("bits,fmt", [(4, "rowtile"), (3, "rowtile"), (2, "rowtile"), (8, "rowtile"),
                                      (4, "int4pack"), (3, "int4pack"), (2, "int4pack"), (8, "int4pack")])
def test_quantized_store_on_the_gpu_equals_the_cpu_reference(tiny_src, tmp_path, bits, fmt):
    """One store, converted once, loads on the CPU and on the GPU: the GPU's dequantize-then-matmul
    path gives the CPU reference path's logits (both dequantize the same stored weights in fp32), for
    each stored format (int4pack's 3/2-bit matrices are the "grouped" format)."""
    store = moe_offload.convert(tiny_src, tmp_path / "store", expert_bits=bits, dense_bits=4, progress=False,
                                expert_format=fmt)
    ids = torch.randint(0, CONFIGS["gqa"]["vocab_size"], (1, 9))
    cpu = moe_offload.load(store)
    try:
        with kernels.use_reference(), torch.no_grad():
            expected = cpu(ids).logits
    finally:
        cpu.close()
    gpu = moe_offload.load(store, device="cuda", experts_per_layer=CONFIGS["gqa"]["num_experts_per_tok"],
                           host_cache="1MiB")
    try:
        with torch.no_grad():
            got = gpu(ids.cuda()).logits.cpu()
        assert (got - expected).abs().max().item() <= 1e-4
        out = gpu.generate(ids.cuda(), attention_mask=torch.ones_like(ids.cuda()), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + 8
        assert gpu.offload_stats().as_dict()["bytes_to_device"] > 0
    finally:
        gpu.close()


def test_hybrid_cpu_compute_on_the_gpu_path(tmp_path):
    cfg = CONFIGS["gqa"]
    src = build_random_mixtral(tmp_path / "src", cfg, seed=3, tokenizer=False)
    store = moe_offload.convert(src, tmp_path / "store", expert_bits=16, dense_bits=16, progress=False)
    ids = torch.randint(0, cfg["vocab_size"], (1, 11), device="cuda")
    prefill, expected = _reference(src, torch.float32, ids)
    blob = Store.open(store).blob_size
    always_cpu = TierCosts(copy_bytes_per_s=1.0, copy_latency_s=1.0, cpu_seconds_per_expert=1e-6)
    model = moe_offload.load(store, device="cuda", experts_per_layer=cfg["num_experts_per_tok"], prefetch=0,
                             host_cache=8 * blob, _tier_costs=always_cpu)
    try:
        _compare(model, ids, prefill, expected, 1e-4)
        assert model.offload_stats().as_dict()["experts_cpu"] > 0
    finally:
        model.close()
    measured = moe_offload.load(store, device="cuda", host_cache=8 * blob)  # the costs measured at load
    try:
        costs = measured.offload_runtime.hybrid.costs
        assert costs.copy_bytes_per_s > 1e8 and costs.cpu_seconds_per_expert > 0, costs
        print(f"measured at load: {costs}")
    finally:
        measured.close()


def test_generate_cli_on_the_gpu(tiny_store4):
    r = run_cli("generate", tiny_store4, "--prompt", "hello", "--max-new-tokens", "4", "--device", "cuda",
                "--host-cache", "1MiB", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["bytes_to_device"] > 0 and stats["host_slots"] >= 4
