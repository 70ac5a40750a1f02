"""rms_norm against RMSNorm.forward, the torch code it replaces.

Tolerances: float32 within 1e-6 relative (the sum of squares is reduced in another order and rsqrt differs in
the last bit); bfloat16 and float16 within 1 ulp of the dtype (those last-bit float32 differences can move a
value across a rounding boundary), with at most 3% of values off at all. The new residual (x + residual,
rounded in the model dtype) equals torch's exactly. The FP8 output equals quantize_fp8 of the kernel's own
model-dtype output exactly (torch's rounding, ties to even, although the interpreter's float8 cast rounds ties
away), and lies within 1 fp8 ulp of quantize_fp8 of torch's output."""

from __future__ import annotations

import pytest
import torch

from microscale.kernels.norm import rms_norm
from microscale.layers.norm import RMSNorm
from microscale.quant.fp8 import quantize_fp8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def _norm(hidden: int, dtype: torch.dtype, float32_weight: bool, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(hidden, EPS, dtype, float32_weight)
    gen = torch.Generator().manual_seed(seed)
    norm.weight.data.copy_(1 + 0.5 * torch.randn(hidden, generator=gen))
    return norm


def _inputs(T: int, hidden: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, so the normalisation matters.
    scale = torch.logspace(-2, 2, T)[:, None]
    x = (torch.randn(T, hidden, generator=gen) * scale).to(dtype)
    residual = (torch.randn(T, hidden, generator=gen) * scale).to(dtype)
    return x, residual


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at each value of x, as float32."""
    finfo = torch.finfo(x.dtype)
    exponent = torch.floor(torch.log2(x.float().abs().clamp(min=finfo.tiny)))
    return torch.exp2(exponent) * finfo.eps


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    else:
        diff = (out.float() - ref.float()).abs()
        assert (diff <= _ulp(ref)).all(), f"max error {(diff / _ulp(ref)).max():.1f} ulp"
        # Off-by-one-ulp results are rare: a missed rounding step (e.g. of the normalised x before a model-dtype
        # weight multiplies it) would change about a quarter of them.
        assert (out != ref).float().mean() <= 0.03


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("float32_weight", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_rmsnorm(dtype, float32_weight, with_residual):
    hidden = 96  # not a power of two: masked lanes must not count in the mean
    norm = _norm(hidden, dtype, float32_weight)
    x, residual = _inputs(13, hidden, dtype)
    if not with_residual:
        _assert_close(rms_norm(x, norm.weight, EPS, float32_weight), norm(x))
        return
    out, new_residual = rms_norm(x, norm.weight, EPS, float32_weight, residual=residual)
    ref, ref_residual = norm(x, residual)
    assert torch.equal(new_residual, ref_residual)
    _assert_close(out, ref)


def test_strided_rows():
    """x as a column slice of a wider tensor: rows are read with their stride."""
    norm = _norm(64, torch.bfloat16, False)
    wide, residual = _inputs(5, 200, torch.bfloat16)
    x = wide[:, 100:164]
    out, new_residual = rms_norm(x, norm.weight, EPS, residual=residual[:, :64])
    ref, ref_residual = norm(x, residual[:, :64])
    assert torch.equal(new_residual, ref_residual)
    _assert_close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("float32_weight", [False, True])
def test_fp8_output(dtype, float32_weight):
    hidden = 160
    norm = _norm(hidden, dtype, float32_weight)
    x, residual = _inputs(9, hidden, dtype)
    scale = torch.tensor(0.0123)  # with weights up to ~2.5, the largest outputs saturate at 448
    out, new_residual = rms_norm(x, norm.weight, EPS, float32_weight, residual=residual, fp8_scale=scale)
    plain, _ = rms_norm(x, norm.weight, EPS, float32_weight, residual=residual)
    ref, ref_residual = norm(x, residual)
    assert out.dtype == torch.float8_e4m3fn
    assert torch.equal(new_residual, ref_residual)
    assert torch.equal(out.view(torch.uint8), quantize_fp8(plain, scale).view(torch.uint8))
    ref_q = quantize_fp8(ref, scale)
    assert (out.float() - ref_q.float()).abs().le(_ulp(ref_q).clamp(min=2.0**-9)).all()
    assert (ref_q.float().abs() == 448).any(), "no value saturated"


def test_fp8_ties_round_to_even():
    """Outputs that are exact E4M3 midpoints (the weight makes them so): torch rounds those to even."""
    hidden = 8
    x = torch.ones(4, hidden)  # with eps = 0 the rows normalise to exactly 1: the output is the weight
    weight = torch.tensor([9.5, 17.0, 7.75, 15.5, 3 / 1024, -9.5, -17.0, 0.53125])
    out = rms_norm(x, weight, 0.0, fp8_scale=torch.tensor(1.0))
    ref = quantize_fp8(RMSNorm(hidden, 0.0, torch.float32)._norm(x) * weight, torch.tensor(1.0))
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    assert out[0].float().tolist() == [10.0, 16.0, 8.0, 16.0, 2 / 512, -10.0, -16.0, 0.5]


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        rms_norm(torch.randn(2, 3, 8), torch.ones(8), EPS)
    with pytest.raises(ValueError):
        rms_norm(torch.randn(2, 8), torch.ones(7), EPS)
