"""Kernels against the reference dequantization; our HQQ against the hqq library; quantized models
against transformers running our dequantized weights."""
import pytest
import torch

import moe_offload
from families import dequantized_reference
from moe_offload import kernels, kernels_layer, quant

# (N, K, bits, group): every format, edge sizes, N not a multiple of 16, K not a multiple of the group.
SHAPES = [(64, 128, 4, 64), (48, 96, 3, 64), (32, 64, 2, 16), (128, 256, 2, 32), (1003, 96, 4, 64),
          (64, 80, 8, 64), (64, 80, 8, 0), (1003, 96, 8, 0), (16, 32, 4, 32), (17, 40, 3, 64), (256, 512, 4, 128), (96, 64, 2, 64), (32, 2048, 4, 256)]


# int4pack and int8 compute with bf16 activations, rowtile with int8 ones: relative errors of a few
# 1e-3 (rowtile's exact arithmetic on its rounded activations is tested in test_layer_kernel.py);
# the others are exact.
TOLERANCE = {"int4pack": 2e-2, "int8": 2e-2, "rowtile": 3e-2}


@pytest.mark.parametrize("rowtile", [True, False], ids=["auto", "no-rowtile"])
@pytest.mark.parametrize("n,k,bits,group", SHAPES)
def test_kernel_matches_reference(n, k, bits, group, rowtile):
    w = torch.randn(n, k)
    m = quant.quantize(w, bits, group, rowtile=rowtile)
    assert m.group == 0 or m.k % m.group == 0
    assert rowtile or m.fmt != "rowtile"
    w_ref = quant.dequantize(m)
    for batch in (1, 3, 33):
        x = torch.randn(batch, k)
        y, ref = kernels.linear(x, m), x @ w_ref.t()
        tol = TOLERANCE.get(m.fmt, 1e-5)
        assert (y - ref).abs().max() <= tol * ref.abs().max(), (m.fmt, batch)
        with kernels.use_reference():
            assert torch.allclose(kernels.linear(x, m), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rowtile", [True, False], ids=["auto", "no-rowtile"])
@pytest.mark.parametrize("hidden,ffn,bits,group", [(64, 96, 4, 64), (128, 64, 2, 16), (64, 48, 3, 64), (64, 80, 8, 0)])
def test_expert_forward_matches_reference(hidden, ffn, bits, group, rowtile):
    """The whole SwiGLU expert (int4pack has its own one-conversion path) against the reference."""
    gate_up = quant.quantize(torch.randn(2 * ffn, hidden), bits, group, rowtile=rowtile)
    down = quant.quantize(torch.randn(hidden, ffn), bits, group, rowtile=rowtile)
    act = torch.nn.functional.silu
    for batch in (1, 3, 33):
        x = torch.randn(batch, hidden)
        y = kernels.expert_forward(x, gate_up, down, act)
        with kernels.use_reference():
            ref = kernels.expert_forward(x, gate_up, down, act)
        tol = 1.5 * TOLERANCE.get(gate_up.fmt, 1e-5 / 1.5)  # rounded activations twice
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert (y - ref).abs().max() <= tol * ref.abs().max(), (gate_up.fmt, batch)
        assert torch.equal(kernels.expert_forward(x, gate_up, down, act), y)  # the same every time


def test_format_choice():
    pick = lambda *shape: quant.choose_format(*shape, rowtile=False)  # noqa: E731
    assert pick(64, 128, 4, 64) == ("int4pack", 64)
    assert pick(1003, 128, 4, 64) == ("grouped", 64)  # int4pack needs N % 16 == 0
    assert pick(64, 96, 4, 64) == ("int4pack", 32)  # group halves until it divides K
    assert pick(64, 128, 2, 16) == ("grouped", 16)
    assert pick(64, 128, 8, 64) == ("grouped", 64)  # an explicit group keeps 8-bit grouped
    assert pick(64, 128, 8, 0) == ("int8", 0)
    assert pick(64, 128, 16, 64) == ("dense", 0)
    # 2-bit: the fused "grouped" kernel beats int4pack's 4-bit fields when numba is there
    assert pick(64, 128, 2, 32) == ("grouped" if quant.fused_grouped_available() else "int4pack", 32)
    assert pick(64, 128, 3, 64) == ("int4pack", 64)


def test_auto_picks_rowtile_where_the_cpu_has_vnni():
    fast = quant.rowtile_fast()
    assert fast == (kernels_layer.usable_variants()[0] != "portable")
    for shape, group in [((64, 128, 4, 64), 64), ((1003, 128, 4, 64), 64), ((64, 96, 3, 64), 32),
                         ((64, 2048, 4, 128), 128)]:
        assert quant.choose_format(*shape) == (("rowtile", group) if fast else quant.choose_format(*shape, rowtile=False))
    # shapes and widths rowtile does not take keep their formats
    for shape in [(64, 128, 2, 16), (64, 128, 8, 0), (64, 128, 8, 64), (64, 40, 4, 64), (64, 2048, 4, 256), (64, 128, 16, 64)]:
        assert quant.choose_format(*shape) == quant.choose_format(*shape, rowtile=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (13, 64), dtype=torch.uint8)
    assert torch.equal(quant.unpack_codes(quant.pack_codes(codes, bits), bits, 64), codes)


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (64, 128), (80, 256), (1024, 64)])
def test_int4pack_unpack_roundtrip(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    assert torch.equal(quant.unpack_int4pack(packed, n, k), codes.to(torch.uint8))


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 64), (2, 16), (2, 32), (4, 32)])
def test_hqq_error_no_worse_than_hqq_library(bits, group):
    from hqq.core.quantize import Quantizer

    torch.manual_seed(bits * 100 + group)
    w = torch.randn(256, 512)
    ours = quant.dequantize(quant.quantize(w, bits, group))
    wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, axis=1, device="cpu",
                                  compute_dtype=torch.float32)
    theirs = Quantizer.dequantize(wq, meta).reshape(w.shape).float()
    err_ours = ((ours - w).norm() / w.norm()).item()
    err_theirs = ((theirs - w).norm() / w.norm()).item()
    assert err_ours <= err_theirs, (err_ours, err_theirs)


@pytest.mark.parametrize("expert_bits,dense_bits", [(4, 4), (3, 8), (2, 4), (8, 16), (8, 8)])
def test_quantized_model_matches_transformers_on_dequantized_weights(tiny_src, tmp_path, expert_bits, dense_bits):
    store = moe_offload.convert(tiny_src, tmp_path / "s", expert_bits=expert_bits, dense_bits=dense_bits,
                                progress=False)
    model = moe_offload.load(store, experts_per_layer=2)
    try:
        # torch's AVX-512 int8 kernel crashes on weights that are not 64-byte aligned
        assert all(b.data_ptr() % 64 == 0 for m in model.modules() if type(m).__name__ == "QuantLinear"
                   for b in m.buffers())
        ref = dequantized_reference(tiny_src, store, model)
        ids = torch.randint(0, 1000, (1, 9))
        with torch.no_grad():
            expected = ref(ids).logits
            with kernels.use_reference():
                exact = model(ids).logits
            fast = model(ids).logits
        assert (exact - expected).abs().max() <= 1e-4
        # The fast kernels round activations to bf16: close, not bit-equal; a near-tie in a router can
        # flip an expert choice for a token, so the bound holds for the typical position.
        per_position = (fast - expected).abs().amax(-1).flatten()
        assert per_position.median() <= 1e-2 * expected.abs().max()
    finally:
        model.close()


def test_quantized_store_is_smaller(tiny_store16, tiny_store4):
    size16 = (tiny_store16 / "experts.bin").stat().st_size
    size4 = (tiny_store4 / "experts.bin").stat().st_size
    assert size4 * 3 < size16
