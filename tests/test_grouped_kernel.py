"""The fused "grouped" kernel (numba) against the plain reference, on fresh random inputs."""
import sys
import warnings

import pytest
import torch

from moe_offload import kernels, kernels_grouped, quant

pytestmark = pytest.mark.skipif(not kernels_grouped.available(), reason="numba unavailable")

# (n, k, group): n = 1, odd n, k == group, k not a multiple of 64, n across row blocks and threads.
SHAPES = [(1, 64, 16), (17, 48, 16), (33, 32, 32), (64, 64, 64), (37, 96, 32), (129, 80, 16),
          (2100, 512, 32), (4099, 320, 64)]


def _check(y, ref, dtype):
    # fp32: only the summation order differs; bf16: both round the same fp32 value, one bf16 ulp (2^-7 relative) apart at most
    tol = 1e-5 * ref.float().abs().max() + (2**-7 * ref.float().abs() if dtype == torch.bfloat16 else 0)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert ((y.float() - ref.float()).abs() <= tol).all()


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(bits, n, k, group, dtype):
    m = quant.quantize(torch.randn(n, k), bits, group, fmt="grouped", optimize=False)
    assert m.fmt == "grouped" and m.group == group
    for batch in (1, 2, 5):
        x = torch.randn(batch, k).to(dtype)
        _check(kernels.linear(x, m), kernels.linear_reference(x, m), dtype)


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 64), (2, 8), (4, 32)])
def test_both_sides_of_the_batch_threshold(bits, group):
    m = quant.quantize(torch.randn(300, 128), bits, group, fmt="grouped")
    t = kernels_grouped.BATCH_THRESHOLD
    for batch in (t - 1, t, t + 3):
        x = torch.randn(batch, 128)
        _check(kernels.linear(x, m), kernels.linear_reference(x, m), torch.float32)
    x = torch.randn(2, 3, 128)  # leading dims are kept; both paths forced
    ref = kernels.linear_reference(x, m)
    for threshold in (0, 10**9):
        _check(kernels_grouped.linear(x, m, batch_threshold=threshold), ref, torch.float32)


def test_missing_numba_falls_back_with_one_warning(monkeypatch):
    m = quant.quantize(torch.randn(48, 64), 2, 16)
    x = torch.randn(3, 64)
    monkeypatch.setattr(kernels_grouped, "_jit", None)
    monkeypatch.setattr(kernels_grouped, "_failed", False)
    monkeypatch.setitem(sys.modules, "moe_offload._grouped_jit", None)  # makes the import fail
    with pytest.warns(RuntimeWarning, match="numba is unavailable"):
        y = kernels.linear(x, m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.linear(x, m)
    _check(y, kernels.linear_reference(x, m), torch.float32)
