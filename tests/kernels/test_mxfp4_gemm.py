"""The MXFP4 W4A16 GEMM (run through Triton's interpreter on CPU) against its oracle
F.linear(x, unpack_mxfp4(blocks, scales, x.dtype), bias), both variants (decode split-K GEMV, prefill tl.dot)
on the same inputs.

Tolerance, per output element: rtol * (|x| @ |W|^T + |bias|) + the dtype's smallest subnormal, W the oracle's
dequantised weights. That bounds summation-order error (and one rounding of the output) relative to the
element's own scale, so rows of tiny or huge weights are checked as tightly as ordinary ones. rtol: float32 1e-5
(~K * eps would be the worst case; the order differs, the products are exact), bfloat16 1e-2 and float16 2e-3
(about two units in the last place of the output: torch may round the matmul and the bias add separately).
Dequantisation itself is checked exactly with x = identity, every scale byte (0xFF = NaN included) and code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microscale.kernels import mxfp4_gemm
from microscale.kernels.mxfp4_gemm import choose_variant, mxfp4_linear
from microscale.quant.mxfp4 import pack_mxfp4, unpack_mxfp4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
VARIANTS = ["decode", "prefill"]
N = 72  # not a multiple of any BLOCK_N
# Rows scaled far from 1 (scale bytes near both ends). float32/bfloat16 share float32's exponent range, but stop
# short of subnormal weights: torch's CPU bfloat16 matmul flushes those (scale byte 0 and subnormal weights are
# checked in test_dequantisation_exact). float16 weights past its range would dequantise to 0 / Inf (also
# there); 2^-24 puts them among its subnormals, where the cast rounds.
EXTREME_ROWS = {
    torch.float32: {2: 2.0**-110, 3: 2.0**-60, 4: 2.0**40, 5: 2.0**100},
    torch.bfloat16: {2: 2.0**-110, 3: 2.0**-60, 4: 2.0**40, 5: 2.0**100},
    torch.float16: {2: 2.0**-24, 3: 2.0**-12, 4: 2.0**6},
}


@pytest.fixture
def force(monkeypatch):
    """force(variant): route every call to that variant; returns the list of variants that actually ran."""
    ran: list[str] = []

    def use(variant: str) -> list[str]:
        monkeypatch.setattr(mxfp4_gemm, "DECODE_MAX_M", 10**9 if variant == "decode" else 0)
        for name in VARIANTS:
            original = getattr(mxfp4_gemm, f"_{name}")
            monkeypatch.setattr(
                mxfp4_gemm, f"_{name}", lambda *a, _f=original, _n=name: (ran.append(_n), _f(*a))[1]
            )
        return ran

    return use


def _weights(K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Each 32-block scaled by 2^[-4, 4]: scales vary along a row as well as across rows.
    block_exp = torch.randint(-4, 5, (N, K // 32, 1), generator=gen).float()
    w = (torch.randn(N, K // 32, 32, generator=gen) * torch.exp2(block_exp)).reshape(N, K)
    for row, factor in EXTREME_ROWS[dtype].items():
        w[row] *= factor
    w[1, -32:] = 0.0  # an all-zero block (scale byte 0)
    return w


def _check(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    ref = F.linear(x, weight, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert torch.isfinite(ref).all(), "the test inputs should give finite outputs"
    scale = x.double().abs() @ weight.double().abs().t()
    if bias is not None:
        scale += bias.double().abs()
    tol = RTOL[x.dtype] * scale + torch.finfo(x.dtype).smallest_normal * torch.finfo(x.dtype).eps
    err = (out.double() - ref.double()).abs()
    bad = ~(err <= tol)  # NaN in out fails too
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outside tolerance; worst err/tol {(err / tol).max().item():.3g}"
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("K, with_bias", [(32, False), (96, True), (256, True)])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(force, dtype, M, K, with_bias, variant):
    ran = force(variant)
    w = _weights(K, dtype, seed=M * 1000 + K)
    blocks, scales = pack_mxfp4(w)
    weight = unpack_mxfp4(blocks, scales, dtype)
    assert scales.max() - scales[scales > 0].min() > 20, "scales should span a wide range"
    gen = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    _check(mxfp4_linear(x, blocks, scales, bias), x, weight, bias)
    assert ran == [variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_strided_activations(force, variant):
    """x with a column stride (a transposed view): the kernels index x by its strides."""
    force(variant)
    K, M = 96, 5
    w = _weights(K, torch.bfloat16, seed=7)
    blocks, scales = pack_mxfp4(w)
    x = torch.randn(K, M, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).t()
    assert not x.is_contiguous()
    _check(mxfp4_linear(x, blocks, scales), x, unpack_mxfp4(blocks, scales, torch.bfloat16), None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows to Inf / NaN
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantisation_exact(force, dtype, variant):
    """x = I: out[m, n] = W[n, m] exactly, summed in any order. One row per scale byte 0..255, random codes
    (all 16 occur in every row): 2^-127 (a subnormal scale), 2^127, 0xFF's NaN block (every output of its row
    NaN, as 0 * NaN is NaN), and for float16 the weights it rounds to subnormals, 0 and Inf (where
    0 * Inf makes the oracle's outputs NaN too) must all match bit for bit. (float32 overflows past 2^128 too.)"""
    force(variant)
    K = 32
    gen = torch.Generator().manual_seed(11)
    blocks = torch.randint(0, 256, (256, 1, 16), generator=gen, dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1)
    weight = unpack_mxfp4(blocks, scales, dtype)
    x = torch.eye(K, dtype=dtype)
    out = mxfp4_linear(x, blocks, scales)
    # x = I: column n is row n of W, or all NaN where that row holds a NaN or an Inf (0 * Inf is NaN).
    bad_rows = ~weight.isfinite().all(1)
    expected = weight.t().clone()
    expected[:, bad_rows] = float("nan")
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert out[:, 255].isnan().all() and bad_rows.sum() < 128
    # The oracle agrees, but for bfloat16 subnormals (below 2^-126), which torch's CPU bfloat16 matmul flushes.
    ref = F.linear(x, weight)
    keep = ref.isnan() | (ref.abs() >= torch.finfo(dtype).smallest_normal) | (expected == 0)
    if dtype != torch.bfloat16:
        keep[:] = True
    torch.testing.assert_close(out[keep], ref[keep], rtol=0, atol=0, equal_nan=True)
    assert (expected[expected.isfinite()].abs() < torch.finfo(dtype).smallest_normal).any(), "no subnormals"
    if dtype == torch.float16:
        assert weight.isinf().any(), "some weights should overflow float16"
        tiny = (weight == 0) & (blocks.view(256, 16).repeat_interleave(2, 1) & 7 != 0)
        assert tiny.any(), "some nonzero weights should underflow to 0 in float16"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_scale(force, variant):
    """Scale byte 0xFF: every output of its row is NaN, however the codes and x are signed. (2^(255-127) would
    instead give +Inf for positive codes and x; 0 * Inf would hide that for zero codes.) pack_mxfp4 gives a row
    holding a NaN that scale, with zero codes."""
    force(variant)
    K, M = 64, 3
    w = torch.rand(N, K) + 0.5
    w[7, 40] = float("nan")
    blocks, scales = pack_mxfp4(w)
    blocks[9, 0] = 0x22  # codes 2 (1.0): a NaN scale on positive codes
    scales[9, 0] = 0xFF
    x = torch.rand(M, K, dtype=torch.float16) + 0.5
    weight = unpack_mxfp4(blocks, scales, x.dtype)
    out, ref = mxfp4_linear(x, blocks, scales), F.linear(x, weight)
    assert out[:, [7, 9]].isnan().all() and ref[:, [7, 9]].isnan().all()
    assert out.isfinite().sum() == M * (N - 2)
    _check(out[:, 10:], x, weight[10:], None)


def test_choose_variant():
    assert choose_variant(1) == "decode" and choose_variant(mxfp4_gemm.DECODE_MAX_M) == "decode"
    assert choose_variant(mxfp4_gemm.DECODE_MAX_M + 1) == "prefill" and choose_variant(4096) == "prefill"


def test_bad_inputs():
    blocks, scales = pack_mxfp4(torch.randn(8, 64))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError):
        mxfp4_linear(torch.randn(2, 32), blocks, scales)  # K mismatch
    with pytest.raises(ValueError):
        mxfp4_linear(x, blocks, scales[:, :1])
    with pytest.raises(ValueError):
        mxfp4_linear(x, blocks, scales, torch.zeros(7))
    with pytest.raises(TypeError):
        mxfp4_linear(x, blocks.to(torch.int16), scales)
    with pytest.raises(ValueError):
        mxfp4_linear(x.to(torch.float64), blocks, scales)
