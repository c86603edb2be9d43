"""The "rowtile" format and the one-call MoE layer kernel against their plain references, on fresh
random inputs, for every dot-step variant this CPU runs (VNNI, AVX2 and the portable fallback)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moe_offload import kernels_layer as kl
from moe_offload.errors import MoeOffloadError

pytest.importorskip("numba")
VARIANTS = kl.usable_variants()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The references run on one torch thread (on a shared 2-core machine a parallel torch op
    waits for a descheduled thread: 100x slower); the kernels are given 2 threads explicitly."""
    kl._threads()  # numba starts its OpenMP pool first: that resets torch's thread count
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _codes(n, k, bits, group):
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    s = (torch.rand(n, k // group) * 0.01 + 1e-3).half().float()
    mn = (torch.randn(n, k // group) * 0.05).half().float()
    return q, s, mn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (17, 96, 32), (48, 256, 64), (40, 384, 128)])
def test_pack_then_dequantize_is_exact(bits, n, k, group):
    q, s, mn = _codes(n, k, bits, group)
    m = kl.pack_rowtile(q, s, mn, bits, group)
    assert m.tensors["tiles"].shape == (-(-n // 16), k // group, kl.tile_bytes(bits, group))
    w = q.float().reshape(n, -1, group) * s.unsqueeze(-1) + mn.unsqueeze(-1)
    assert torch.equal(kl.dequantize_rowtile(m), w.reshape(n, k))


@pytest.mark.parametrize("bits,limit", [(2, 0.40), (3, 0.20), (4, 0.10), (8, 0.01)])
def test_quantize_error(bits, limit):
    # limits from the HQQ error table at group 64 (FACTS), with slack for min-max codes
    w = torch.randn(64, 512)
    m = kl.quantize_rowtile(w, bits, 64, optimize=bits == 4)
    err = ((kl.dequantize_rowtile(m) - w).norm() / w.norm()).item()
    assert err < limit


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,group", [(16, 32, 32), (33, 544, 32), (384, 512, 64), (200, 256, 128)])
def test_linear_matches_reference(variant, bits, n, k, group):
    m = kl.pack_rowtile(*_codes(n, k, bits, group), bits, group)
    x = torch.randn(3, k)
    x[1, :group] = 0  # an all-zero activation group (scale 0)
    y = kl.linear(x, m, variant)
    ref = kl.linear_reference(x, m, quantize=True)
    # same rounded activations, fp32 sums in another order
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    # against unrounded activations: each x moves by at most half a step, scale/2 of its group
    w = kl.dequantize_rowtile(m)
    _, sc = kl.quantize_activations(x, group)
    bound = w.abs() @ (sc.repeat_interleave(group, 1) / 2).T  # [n, 3]
    exact = x @ w.T
    assert ((y - exact).abs() <= bound.T * 1.001 + 1e-6).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rows_computed_together_equal_rows_alone(variant, bits):
    """Prefill's pass over a row block serves up to ROWS_AT_ONCE token rows: every batch size, full
    passes and a remainder, gives each row the floats it gets on its own."""
    m = kl.pack_rowtile(*_codes(48, 192, bits, 64), bits, 64)
    for B in range(1, 2 * kl._jit().ROWS_AT_ONCE + 2):  # full passes and single rows after them
        x = torch.randn(B, 192) * torch.rand(B, 1) * 4
        alone = torch.cat([kl.linear(x[b:b + 1], m, variant) for b in range(B)])
        assert torch.equal(kl.linear(x, m, variant), alone), B


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_largest_codes_and_activations_stay_exact(variant, bits, sign):
    """Every code at its largest and every activation at +-127: the largest integer sums a step
    makes (the AVX2 step adds a whole step's pair sums in 16 bits before widening)."""
    n, k, group = 32, 256, 64
    _, s, mn = _codes(n, k, bits, group)
    m = kl.pack_rowtile(torch.full((n, k), 2**bits - 1, dtype=torch.uint8), s, mn, bits, group)
    x = torch.full((2, k), sign)
    x[1, ::2] = -sign  # and a mixed pattern
    y = kl.linear(x, m, variant)
    ref = kl.linear_reference(x, m, quantize=True)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def _experts(H, inter, k, bits, group, optimize=False):
    return [(kl.quantize_rowtile(torch.randn(2 * inter, H) * 0.02, bits, group, optimize=optimize),
             kl.quantize_rowtile(torch.randn(H, inter) * 0.02, bits, group, optimize=optimize)) for _ in range(k)]


def _layer_error_ok(y, x, experts, weights):
    """Is y the layer output up to fp32 summation order? The kernel and the reference round the
    down input (silu(gate) * up) to int8 from fp32 values that differ in the last bits, so a code
    may differ by one where the value sits on a rounding boundary: those elements get one step of
    slack each (|W_down column| * step), every other element none."""
    ref = kl.moe_layer_reference(x, experts, weights, F.silu, quantize=True)
    slack = torch.zeros_like(ref)
    for (gu, dn), w in zip(experts, weights):
        gate, up = kl.linear_reference(x.unsqueeze(0), gu)[0].chunk(2)
        h = (F.silu(gate) * up).reshape(-1, dn.group)
        step = h.abs().amax(-1, keepdim=True) / 127
        frac = torch.where(step > 0, h / step, torch.zeros_like(h)).abs() % 1
        near = ((frac - 0.5).abs() < 1e-3).reshape(-1).float()
        slack += abs(w) * (kl.dequantize_rowtile(dn).abs() @ (near * step.expand_as(h).reshape(-1)))
    return bool(((y - ref).abs() <= 2e-5 * ref.abs().max() + slack * 1.01).all())


LAYERS = [  # H, I, top-k, bits, group
    (512, 192, 8, 4, 64), (512, 192, 1, 2, 32), (1024, 3584, 2, 4, 64), (544, 96, 3, 3, 32),
    (32, 32, 1, 4, 32), (256, 128, 5, 8, 128), (1056, 64, 4, 2, 32),
    (256, 1280, 3, 4, 32)]  # 120 phase-1 units: claims longer than a BATCH, claims that span two experts


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("H,inter,k,bits,group", LAYERS)
def test_layer_matches_reference(variant, H, inter, k, bits, group):
    if H * inter > 10**6 and variant != VARIANTS[0]:
        pytest.skip("the large shape runs on the fastest variant only (test time)")
    experts = _experts(H, inter, k, bits, group)
    x, weights = torch.randn(H), torch.rand(k).tolist()
    y = kl.moe_layer_decode(x, experts, weights, F.silu, variant_=variant, threads=2)
    assert y.shape == (H,) and y.dtype == torch.float32
    assert _layer_error_ok(y, x, experts, weights)
    # the int8 activations' cost against fp32 activations on the same weights (measured ~1.4%)
    ref = kl.moe_layer_reference(x, experts, weights, F.silu, quantize=False)
    assert ((y - ref).norm() / ref.norm()).item() < 0.04


def test_variants_agree_bitwise():
    """Integer dot products are exact and the fp32 steps run in the same order in every variant,
    whichever thread computes a unit."""
    for H, inter, k, group in ((512, 192, 4, 64), (256, 1280, 3, 32)):  # the second: claims of several batches
        experts = _experts(H, inter, k, 4, group)
        x, weights = torch.randn(H), torch.rand(k).tolist()
        ys = [kl.moe_layer_decode(x, experts, weights, "silu", variant_=v, threads=t) for v in VARIANTS
              for t in (1, 2)]
        assert all(torch.equal(ys[0], y) for y in ys[1:])  # also: one thread (no parallel launch) or two


def test_a_wrong_weight_ordering_is_caught():
    """The check the layer tests use fails on plausible layout mistakes."""
    H, inter, k = 256, 96, 3
    experts = _experts(H, inter, k, 4, 32)
    x, weights = torch.randn(H), torch.rand(k).tolist()
    y = kl.moe_layer_decode(x, experts, weights, F.silu)
    assert _layer_error_ok(y, x, experts, weights)
    swapped = []  # up rows first, then gate rows
    for gu, dn in experts:
        w = kl.dequantize_rowtile(gu)
        swapped.append((kl.quantize_rowtile(torch.cat([w[inter:], w[:inter]]), 8, 32, optimize=False), dn))
    assert not _layer_error_ok(kl.moe_layer_decode(x, swapped, weights, F.silu), x, experts, weights)
    assert not _layer_error_ok(kl.moe_layer_decode(x, experts, weights[::-1], F.silu), x, experts, weights)
    assert not _layer_error_ok(kl.moe_layer_decode(x, experts[:2], weights[:2], F.silu), x, experts, weights)


def test_batch_rows_use_their_own_experts():
    H, inter = 256, 64
    pool = _experts(H, inter, 5, 4, 32)
    rows = [[0, 3], [4], [1, 2, 3]]
    x = torch.randn(len(rows), H)
    experts = [[pool[i] for i in r] for r in rows]
    weights = [torch.rand(len(r)).tolist() for r in rows]
    y = kl.moe_layer_decode(x, experts, weights, F.silu)
    assert y.shape == x.shape
    for b in range(len(rows)):
        assert _layer_error_ok(y[b], x[b], experts[b], weights[b])
    ref = kl.moe_layer_reference(x, experts, weights, F.silu)
    assert torch.allclose(ref[1], kl.moe_layer_reference(x[1], experts[1], weights[1], F.silu))


def _assignments(T, E, k, seed):
    """Each token row picks k distinct experts of E with random weights -> (rows, weights, offsets)
    grouped by expert, and each row's (expert, weight) list."""
    g = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(E, generator=g)[:k].tolist() for _ in range(T)]
    weights = torch.rand(T, k, generator=g)
    rows, wts, offs, per_row = [], [], [0], [[] for _ in range(T)]
    for e in range(E):
        for t in range(T):
            if e in picks[t]:
                w = weights[t, picks[t].index(e)].item()
                rows.append(t), wts.append(w), per_row[t].append((e, w))
        offs.append(len(rows))
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(wts), offs, per_row


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("H,inter,T,E,k,bits,group", [
    (512, 192, 9, 6, 2, 4, 64), (256, 64, 1, 3, 1, 4, 32), (544, 96, 17, 8, 8, 3, 32), (32, 32, 5, 4, 3, 4, 32),
    (1056, 64, 3, 9, 2, 2, 32), (256, 128, 33, 5, 2, 8, 128)])
def test_layer_rows_match_reference(variant, H, inter, T, E, k, bits, group):
    """Prefill's one call per layer: every row equals its own experts' sum (the decode kernel's
    check), with experts no row uses (empty ranges) in the list."""
    experts = _experts(H, inter, E, bits, group)
    x = torch.randn(T, H)
    rows, wts, offs, per_row = _assignments(T, E, k, seed=H + T)
    y = kl.moe_layer_rows(x, experts, rows, wts, offs, variant_=variant)
    assert y.shape == (T, H) and y.dtype == torch.float32
    for t in range(T):
        mine = per_row[t]
        assert _layer_error_ok(y[t], x[t], [experts[e] for e, _ in mine], [w for _, w in mine]), t
    # chunks of experts added into one output give the same floats as one call
    out = torch.zeros(T, H)
    for lo, hi in ((0, E // 2), (E // 2, E)):
        kl.moe_layer_rows(x, experts[lo:hi], rows[offs[lo]:offs[hi]], wts[offs[lo]:offs[hi]],
                          [o - offs[lo] for o in offs[lo:hi + 1]], out=out, variant_=variant)
    assert torch.equal(out, y)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_rows_equal_each_row_alone(variant):
    """Experts with full passes of ROWS_AT_ONCE assignments and single ones after them: each token
    row gets the floats a one-row call gives it."""
    H, inter, E, k, T = 256, 64, 6, 3, 23
    experts = _experts(H, inter, E, 4, 32)
    x = torch.randn(T, H)
    rows, wts, offs, per_row = _assignments(T, E, k, seed=7)
    counts = [offs[e + 1] - offs[e] for e in range(E)]
    assert any(c > kl._jit().ROWS_AT_ONCE and c % kl._jit().ROWS_AT_ONCE for c in counts), counts
    y = kl.moe_layer_rows(x, experts, rows, wts, offs, variant_=variant)
    for t in range(T):
        mine = sorted(per_row[t])
        one = kl.moe_layer_rows(x[t:t + 1], [experts[e] for e, _ in mine], torch.zeros(len(mine), dtype=torch.int64),
                                torch.tensor([w for _, w in mine]), list(range(len(mine) + 1)), variant_=variant)
        assert torch.equal(y[t], one[0]), t


def test_layer_rows_catch_mistakes():
    H, inter, T, E = 256, 96, 6, 4
    experts = _experts(H, inter, E, 4, 32)
    x = torch.randn(T, H)
    rows, wts, offs, per_row = _assignments(T, E, 2, seed=0)
    y = kl.moe_layer_rows(x, experts, rows, wts, offs)
    wrong = kl.moe_layer_rows(x, experts, rows, wts.flip(0), offs)  # weights on the wrong rows
    assert not all(_layer_error_ok(wrong[t], x[t], [experts[e] for e, _ in per_row[t]], [w for _, w in per_row[t]])
                   for t in range(T))
    assert all(_layer_error_ok(y[t], x[t], [experts[e] for e, _ in per_row[t]], [w for _, w in per_row[t]])
               for t in range(T))
    with pytest.raises(MoeOffloadError, match="offsets"):
        kl.moe_layer_rows(x, experts, rows, wts, offs[:-1])
    with pytest.raises(MoeOffloadError, match="token rows"):
        kl.moe_layer_rows(x, experts, rows + T, wts, offs)


def test_rejects_what_it_cannot_compute():
    experts = _experts(64, 32, 2, 4, 32)
    x = torch.randn(64)
    with pytest.raises(MoeOffloadError, match="SwiGLU"):
        kl.moe_layer_decode(x, experts, [0.5, 0.5], F.gelu)
    with pytest.raises(MoeOffloadError, match="do not form"):
        kl.moe_layer_decode(x, [(experts[0][1], experts[0][0])], [1.0], F.silu)
    with pytest.raises(MoeOffloadError, match="must share shapes, bits"):
        kl.moe_layer_decode(x, [experts[0], (experts[1][0], kl.quantize_rowtile(torch.randn(64, 32), 2, 32))],
                            [0.5, 0.5], F.silu)
    with pytest.raises(MoeOffloadError):
        kl.quantize_rowtile(torch.randn(16, 48), 4, 32)  # input size not a multiple of 32


def test_dispatch_follows_the_cpu(monkeypatch):
    assert VARIANTS[-1] == "portable"
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "avx512_vnni" in flags:
        assert "vnni512" in VARIANTS and kl.variant() == "vnni512"
    elif " avx2" in flags and "avx_vnni" not in flags:
        assert kl.variant() == "avx2"
    monkeypatch.setenv("MOE_OFFLOAD_ROWTILE", "portable")
    assert kl.variant() == "portable"
    monkeypatch.setenv("MOE_OFFLOAD_ROWTILE", "nonsense")
    with pytest.raises(MoeOffloadError):
        kl.variant()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86 Linux build")
@pytest.mark.parametrize("cpu,features,usable", [
    ("haswell", "+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2,+lzcnt,+movbe,+cx16", ("avx2", "portable")),
    ("ivybridge", "+avx,+f16c,+sse4.2,+popcnt,+cx16", ("portable",)),  # AVX without AVX2 (F16C: the scales)
])
def test_a_cpu_without_vnni_runs_its_own_code(cpu, features, usable):
    """numba compiles for a CPU without VNNI (AVX2, or none): dispatch must pick the variants it
    can run, whose code must not need VNNI (LLVM would fail to select the instruction), each with
    the reference's results at every bit width (8-bit codes on AVX2 take the portable step). On one
    thread: the serial layer kernel runs the same step code and compiles in less than half the time."""
    code = (
        "import os, torch, torch.nn.functional as F\n"
        "from moe_offload import kernels_layer as kl\n"
        f"assert kl.usable_variants() == {usable!r}, kl.usable_variants()\n"
        "torch.manual_seed(0)\n"
        "e = [(kl.quantize_rowtile(torch.randn(2*64, 96), b, 32, optimize=False),"
        " kl.quantize_rowtile(torch.randn(96, 64), b, 32, optimize=False)) for b in (2, 3, 4, 8) for _ in range(1)]\n"
        "for v in kl.usable_variants():\n"
        "    for ex in e:\n"
        "        x = torch.randn(96)\n"
        "        y = kl.moe_layer_decode(x, [ex], [0.7], F.silu, variant_=v, threads=1)\n"
        "        r = kl.moe_layer_reference(x, [ex], [0.7], F.silu)\n"
        "        assert ((y - r).norm() / r.norm()).item() < 1e-4, (v, ((y - r).norm() / r.norm()).item())\n"
        "print('variants ok')\n")
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features,
               PYTHONPATH=os.pathsep.join(p for p in [os.path.join(os.path.dirname(__file__), "..", "src"),
                                                      os.environ.get("PYTHONPATH", "")] if p))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "variants ok" in r.stdout, r.stderr[-2000:]
