"""The int4pack prefill path (unpack to bf16, then matmul) against the plain reference."""
import pytest
import torch

from moe_offload import kernels, kernels_int4pack, quant

BLOCK = quant._int4pack_block_size()
pytestmark = pytest.mark.skipif(BLOCK is None or kernels_int4pack._jit() is None,
                                reason="int4pack layout is not the blocked one, or numba is unavailable")


@pytest.mark.parametrize("blocks,k,bits,group", [(1, 32, 4, 32), (2, 64, 4, 64), (3, 96, 3, 32), (4, 512, 2, 128),
                                                 (1, 256, 4, 256), (16, 1024, 4, 64)])
def test_unpacked_weight_is_the_reference_rounded_to_bf16(blocks, k, bits, group):
    m = quant.quantize(torch.randn(blocks * BLOCK, k), bits, group, optimize=False, fmt="int4pack")
    assert kernels_int4pack.available(m)
    assert torch.equal(kernels_int4pack.weight_t(m), quant.dequantize(m).t().to(torch.bfloat16))


def test_product_matches_reference_on_both_sides_of_the_threshold():
    m = quant.quantize(torch.randn(2 * BLOCK, 128), 4, 64, fmt="int4pack")
    ref_w = quant.dequantize(m)
    t = kernels_int4pack.PREFILL_ROWS
    for rows in (1, t - 1, t, t + 1, 300, 512):
        x = torch.randn(rows, 128)
        ref = x @ ref_w.t()
        xb = x.to(torch.bfloat16)
        forced = kernels_int4pack.matmul(xb, m)  # rows padded to a power of two
        assert forced.shape == (rows, m.n)
        for y in (kernels.linear(x, m), forced.float()):
            assert (y - ref).abs().max() <= 2e-2 * ref.abs().max(), rows
        if rows >= t and kernels_int4pack.fast_bf16_matmul():  # prefill rows take the unpacking path here
            assert torch.equal(kernels.linear(xb, m), forced)


def test_matrices_outside_whole_blocks_keep_the_int4_op():
    m = quant.quantize(torch.randn(BLOCK + 16, 64), 4, 32, fmt="int4pack")
    assert m.fmt == "int4pack" and not kernels_int4pack.available(m)
    assert not kernels_int4pack.usable(m, 10_000)
    x = torch.randn(64, 64)
    ref = x @ quant.dequantize(m).t()
    assert (kernels.linear(x, m) - ref).abs().max() <= 2e-2 * ref.abs().max()
