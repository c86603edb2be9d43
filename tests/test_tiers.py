"""The three tiers (disk -> host RAM -> device slots) on the CPU stand-in, the device-neutral kernels,
and the hybrid decision: everything of the GPU tier that is not CUDA-specific (tests/test_cuda.py
has the rest, run where a GPU is)."""
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import MixtralForCausalLM

import moe_offload
from conftest import CONFIGS, run_cli
from moe_offload import kernels, kernels_device
from moe_offload.cache import ExpertCache
from moe_offload.errors import MoeOffloadError
from moe_offload.quant import dequantize, quantize
from moe_offload.stats import OffloadStats
from moe_offload.store import Store
from moe_offload.tiers import MIN_HOST_SLOTS, HostCache, HostCopy, Hybrid, TierCosts, compute_on_cpu

BLOB = 4096


class StampLoader:
    """The disk tier's stand-in: completes reads at once, stamping the blob with its key."""

    def __init__(self, delay=0.0):
        self.reads, self.delay, self.closed = [], delay, False
        self.pool = ThreadPoolExecutor(2)

    def submit(self, layer, expert, dest):
        self.reads.append((layer, expert))
        if not self.delay:
            dest[0], dest[1] = layer, expert
            f = Future()
            f.set_result(None)
            return f
        return self.pool.submit(self._slow, layer, expert, dest)

    def _slow(self, layer, expert, dest):
        time.sleep(self.delay)
        dest[0], dest[1] = layer, expert

    def close(self):
        self.closed = True


class CountingCopy(HostCopy):
    def __init__(self):
        self.copies = []

    def copy(self, src, dest):
        self.copies.append((int(src[0]), int(src[1])))
        super().copy(src, dest)


def three_tiers(device_slots_per_layer=2, host_slots=4, layers=(0, 1), delay=0.0, scope="layer"):
    stats = OffloadStats(list(layers))
    disk = StampLoader(delay)
    copy = CountingCopy()
    host = HostCache(disk, host_slots, BLOB, stats, copy)
    device = ExpertCache(list(layers), device_slots_per_layer, BLOB, host, stats, scope,
                         allocate=copy.allocate_device)
    return stats, disk, copy, host, device


def test_hits_and_misses_in_each_tier_and_bytes_per_hop():
    stats, disk, copy, host, device = three_tiers()
    for e, blob in device.stream(0, [1, 2]):
        assert (int(blob[0]), int(blob[1])) == (0, e)
    assert (sum(stats.misses), stats.host_misses, stats.host_hits) == (2, 2, 0)
    assert disk.reads == [(0, 1), (0, 2)] and sum(stats.hits) == 0
    assert stats.bytes_to_device == 2 * BLOB
    list(device.stream(0, [1]))  # a device hit: nothing moves
    assert (sum(stats.hits), stats.host_hits, stats.bytes_to_device) == (1, 0, 2 * BLOB)
    list(device.stream(0, [3]))  # evicts (0, 2) from the device (LRU), still in host RAM
    assert not device.contains(0, 2) and (0, 2) in host.resident()
    got = [(e, int(b[1])) for e, b in device.stream(0, [2])]  # device miss, host hit: one copy, no read
    assert got == [(2, 2)]
    assert stats.host_hits == 1 and disk.reads[-1] == (0, 3) and len(disk.reads) == 3
    assert stats.bytes_to_device == 4 * BLOB
    # the first two copies follow two reads made in parallel: either may finish first
    assert sorted(copy.copies[:2]) == [(0, 1), (0, 2)] and copy.copies[2:] == [(0, 3), (0, 2)]
    host.check_invariants()
    device.check_invariants()


def test_host_tier_evicts_least_recently_used():
    stats, disk, copy, host, device = three_tiers(device_slots_per_layer=1, host_slots=MIN_HOST_SLOTS)
    for e in range(MIN_HOST_SLOTS):
        list(device.stream(0, [e]))
    assert stats.host_evictions == 0
    list(device.stream(0, [0]))  # host hit: (0, 0) becomes the most recent
    list(device.stream(0, [MIN_HOST_SLOTS]))  # evicts the least recent: (0, 1)
    assert stats.host_evictions == 1
    assert (0, 1) not in host.resident() and (0, 0) in host.resident()
    list(device.stream(0, [1]))  # read from disk again
    assert disk.reads.count((0, 1)) == 2
    assert stats.host_misses == len(disk.reads)
    host.check_invariants()


def test_prefetch_fills_both_hops_and_spills_into_the_host_tier():
    stats, disk, copy, host, device = three_tiers(device_slots_per_layer=2, host_slots=8)
    list(device.stream(1, [0, 1]))  # layer 1's pool holds its latest step: a guess may evict nothing there
    assert device.prefetch(0, [4, 5]) == 2  # disk -> host -> device
    for key in ((0, 4), (0, 5)):
        device.residency[key].future.result()
    assert device.contains(0, 4) and device.contains(0, 5)
    assert {(0, 4), (0, 5)} <= set(host.resident()) and stats.bytes_to_device == 4 * BLOB
    assert device.prefetch(1, [6, 7]) == 0  # no device slot may go: the guess warms the host only
    assert stats.host_prefetch_loads == 2 and {(1, 6), (1, 7)} <= set(host.resident())
    assert not device.contains(1, 6)
    reads = len(disk.reads)
    got = [(e, int(b[1])) for e, b in device.stream(1, [6])]  # a host hit: no disk read
    assert got == [(6, 6)] and len(disk.reads) == reads and stats.host_hits == 1
    assert stats.host_misses + stats.host_prefetch_loads == len(disk.reads)


def test_a_failed_disk_read_is_raised_and_forgotten_in_both_tiers():
    class Failing(StampLoader):
        def submit(self, layer, expert, dest):
            if expert == 9:
                f = Future()
                f.set_exception(OSError("disk gone"))
                return f
            return super().submit(layer, expert, dest)

    stats = OffloadStats(1)
    host = HostCache(Failing(), 4, BLOB, stats)
    device = ExpertCache([0], 2, BLOB, host, stats)
    with pytest.raises(OSError, match="disk gone"):
        list(device.stream(0, [9]))
    assert not device.residency and (0, 9) not in host.resident()
    assert [e for e, _ in device.stream(0, [1])] == [1]
    host.check_invariants()
    device.check_invariants()


@settings(max_examples=40, deadline=None)
@given(requests=st.lists(st.tuples(st.integers(0, 1), st.sets(st.integers(0, 5), min_size=1, max_size=4)),
                         min_size=1, max_size=25),
       host_slots=st.integers(MIN_HOST_SLOTS, 10), guesses=st.lists(st.sets(st.integers(0, 5)), min_size=25,
                                                                   max_size=25))
def test_random_streams_keep_both_tiers_consistent(requests, host_slots, guesses):
    stats, disk, copy, host, device = three_tiers(device_slots_per_layer=4, host_slots=host_slots, delay=0.0005)
    try:
        for (layer, experts), guess in zip(requests, guesses):
            device.prefetch(1 - layer, guess)
            for e, blob in device.stream(layer, sorted(experts)):
                assert (int(blob[0]), int(blob[1])) == (layer, e)
            host.check_invariants()
            device.check_invariants()
        host.pool.shutdown(wait=True)
        # Every device load came through the host tier; every host miss or warm-up was one disk read.
        assert stats.bytes_to_device == BLOB * (sum(stats.misses) + stats.prefetch_loads)
        assert stats.host_hits + stats.host_misses == sum(stats.misses) + stats.prefetch_loads
        assert stats.host_misses + stats.host_prefetch_loads == len(disk.reads)
        assert len(host.resident()) <= max(host_slots, MIN_HOST_SLOTS)
    finally:
        host.pool.shutdown(wait=True)
        disk.pool.shutdown(wait=True)


def test_more_misses_at_once_than_host_slots():
    """A layer needing more experts than the host tier holds: each blob passes through, none fails."""
    stats, disk, copy, host, device = three_tiers(device_slots_per_layer=8, host_slots=MIN_HOST_SLOTS,
                                                  layers=(0,), delay=0.02)
    got = sorted(e for e, _ in device.stream(0, range(8)))
    assert got == list(range(8)) and stats.host_evictions >= 8 - MIN_HOST_SLOTS
    host.close()
    assert disk.closed


# ---------------------------------------------------------------- the hybrid decision (a pure function)

def test_hybrid_decision_on_injected_numbers():
    pcie4 = dict(copy_bytes_per_s=25e9, copy_latency_s=10e-6)
    # A quarter-width expert (6.2 MB) over PCIe 4 (0.26 ms) beats the CPU's 0.5 ms: copy it.
    assert not compute_on_cpu(6_200_000, 1, TierCosts(**pcie4, cpu_seconds_per_expert=0.5e-3))
    # A full Mixtral expert at 4 bits (~88 MB, 3.5 ms) against 5.5 ms on the CPU: copy it.
    assert not compute_on_cpu(88_000_000, 1, TierCosts(**pcie4, cpu_seconds_per_expert=5.5e-3))
    # The same over a slow link (PCIe 3 x4, ~3 GB/s: 29 ms): the CPU wins at one token...
    slow = TierCosts(copy_bytes_per_s=3e9, copy_latency_s=10e-6, cpu_seconds_per_expert=5.5e-3)
    assert compute_on_cpu(88_000_000, 1, slow)
    # ... but not for a prefill batch routed to it: CPU time grows with tokens, the copy's does not.
    assert not compute_on_cpu(88_000_000, 16, slow)
    # The fixed cost of a copy counts: tiny experts stay on the CPU when launches dominate.
    assert compute_on_cpu(4096, 1, TierCosts(copy_bytes_per_s=25e9, copy_latency_s=1e-3,
                                             cpu_seconds_per_expert=0.1e-3))


def test_hybrid_takes_only_host_experts_that_miss_the_device_and_pins_them():
    stats, disk, copy, host, device = three_tiers(device_slots_per_layer=2, host_slots=6, layers=(0,))
    for e in range(4):
        list(device.stream(0, [e]))  # host holds 0..3, the device 2 and 3
    cpu = Hybrid(host, TierCosts(copy_bytes_per_s=1.0, copy_latency_s=1.0, cpu_seconds_per_expert=1e-6), stats)
    gpu = Hybrid(host, TierCosts(copy_bytes_per_s=1e12, copy_latency_s=0.0, cpu_seconds_per_expert=1.0), stats)
    assert gpu.take(device, 0, [0, 1, 5], tokens=1) == {}
    taken = cpu.take(device, 0, [0, 1, 2, 5], tokens=1)  # 2 is on the device, 5 nowhere
    assert sorted(taken) == [0, 1] and stats.experts_cpu == 2
    assert all(int(views[1]) == e for e, (_, views) in taken.items())
    assert all(slot.pins == 1 for slot, _ in taken.values())
    cpu.release(taken)
    assert all(slot.pins == 0 for slot, _ in taken.values())
    host.check_invariants()


# ---------------------------------------------------------------- device-neutral kernels (the reference on CPU)

FORMATS = [("int4pack", 4, 64), ("int4pack", 3, 64), ("int4pack", 2, 32), ("grouped", 2, 16), ("grouped", 3, 64),
           ("grouped", 8, 64), ("int8", 8, 0), ("rowtile", 4, 64), ("rowtile", 3, 64), ("rowtile", 2, 32),
           ("rowtile", 8, 64), ("dense", 16, 0)]


@pytest.mark.parametrize("fmt,bits,group", FORMATS)
def test_device_dequantize_equals_the_reference(fmt, bits, group):
    torch.manual_seed(bits * 7 + group)
    w = torch.randn(96, 128)
    if fmt == "dense":
        m = quantize(w, 16, 0)
    elif fmt == "int8":
        m = quantize(w, 8, 0)
    else:
        m = quantize(w, bits, group, optimize=False, fmt=fmt)
    assert m.fmt == fmt
    assert torch.equal(kernels_device.dequantize(m), dequantize(m))
    x = torch.randn(3, 128)
    torch.testing.assert_close(kernels_device.linear(x, m), kernels.linear_reference(x, m), rtol=1e-5, atol=1e-5)
    assert kernels_device.dequantize(m, torch.bfloat16).dtype == torch.bfloat16


def test_a_stored_blob_turns_into_device_weights(tiny_store4):
    """What a GPU slot holds: the blob's bytes as stored, read through the layout's views, dequantized by
    the device path to the reference's weights, for every matrix of an expert."""
    from moe_offload.store import EXPERTS_FILE

    st_ = Store.open(tiny_store4)
    b = st_.blob(st_.moe_layers[0], 1)
    with open(st_.path / EXPERTS_FILE, "rb") as f:
        f.seek(b["offset"])
        blob = torch.frombuffer(bytearray(f.read(b["size"])), dtype=torch.uint8)
    for name, m in st_.layout.views(blob).items():
        if hasattr(m, "fmt"):
            assert torch.equal(kernels_device.dequantize(m), dequantize(m)), name


# ---------------------------------------------------------------- load(): three tiers on the CPU stand-in

@pytest.fixture(scope="module")
def reference(tiny_src):
    ref = MixtralForCausalLM.from_pretrained(tiny_src, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIGS["gqa"]["vocab_size"], (1, 11))
    with torch.no_grad():
        prefill = ref(ids).logits
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return ids, prefill, expected


def _check_equal(model, ids, prefill, expected):
    with torch.no_grad():
        assert (model(ids).logits - prefill).abs().max().item() <= 1e-4
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("prefetch,host_slots", [(0, 6), (2, 6), (2, 8)])
def test_logits_equal_transformers_with_a_host_cache_in_front(tiny_store16, reference, prefetch, host_slots):
    cfg = CONFIGS["gqa"]
    store = Store.open(tiny_store16)
    every = cfg["num_local_experts"] * cfg["num_hidden_layers"]  # 8: with 6 slots the host tier evicts too
    model = moe_offload.load(tiny_store16, experts_per_layer=cfg["num_experts_per_tok"], prefetch=prefetch,
                             host_cache=host_slots * store.blob_size)
    try:
        _check_equal(model, *reference)
        s = model.offload_stats().as_dict()
        assert s["host_slots"] == host_slots and s["host_misses"] > 0
        assert (s["host_evictions"] > 0) == (host_slots < every)
        if host_slots == every:  # everything fits the host tier: each expert read from disk at most once
            assert s["host_hits"] > 0 and s["loads"] <= every
        device_loads = s["misses"] + s["prefetch_loads"]
        assert s["bytes_to_device"] == device_loads * store.blob_size  # host -> device
        assert s["bytes_read"]["disk"] == s["loads"] * store.blob_size  # disk -> host
        assert s["loads"] == s["host_misses"] + s["host_prefetch_loads"]
        assert s["host_hits"] + s["host_misses"] == device_loads  # every device load passed the host tier
        assert s["experts_cpu"] == 0  # no hybrid on the stand-in unless costs are given
        assert "host tier:" in model.offload_stats().summary()
    finally:
        model.close()


def test_hybrid_computes_host_experts_on_the_cpu_with_the_same_logits(tiny_store16, reference):
    cfg = CONFIGS["gqa"]
    store = Store.open(tiny_store16)
    always_cpu = TierCosts(copy_bytes_per_s=1.0, copy_latency_s=1.0, cpu_seconds_per_expert=1e-6)
    model = moe_offload.load(tiny_store16, experts_per_layer=cfg["num_experts_per_tok"], prefetch=0,
                             host_cache=cfg["num_local_experts"] * cfg["num_hidden_layers"] * store.blob_size,
                             _tier_costs=always_cpu)
    try:
        _check_equal(model, *reference)
        s = model.offload_stats().as_dict()
        assert s["experts_cpu"] > 0
        # Experts computed on the CPU never crossed to the device.
        assert s["bytes_to_device"] == (s["misses"] + s["prefetch_loads"] - s["experts_cpu"]) * store.blob_size
    finally:
        model.close()


def test_tier_options_and_no_cuda(tiny_store16):
    if not torch.cuda.is_available():
        with pytest.raises(MoeOffloadError, match="no CUDA device"):
            moe_offload.load(tiny_store16, device="cuda")
    with pytest.raises(MoeOffloadError):
        moe_offload.load(tiny_store16, device="tpu")
    r = run_cli("generate", tiny_store16, "--prompt", "hello", "--max-new-tokens", "3", "--host-cache", "1MiB",
                "--json")
    assert r.returncode == 0, r.stderr
    import json

    stats = json.loads(r.stdout)["stats"]
    assert stats["host_slots"] >= MIN_HOST_SLOTS and stats["bytes_to_device"] > 0


def test_cuda_code_is_never_imported_on_the_cpu_path():
    code = ("import moe_offload, moe_offload.model, moe_offload.tiers, moe_offload.kernels, sys; "
            "assert 'moe_offload.transport_cuda' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
