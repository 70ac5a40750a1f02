"""The Triton FP8 GEMM (run through Triton's interpreter on CPU) against fp8_matmul_reference: per-tensor and
per-token activation scales x per-tensor and per-channel weight scales, float32 / bfloat16 / float16 outputs,
with and without bias, on shapes that leave every tile ragged (the interpreter's tiles are 16 x 32 x 32)."""

from __future__ import annotations

import pytest
import torch

from microscale.kernels import fp8_gemm as kernel_module
from microscale.kernels.fp8_gemm import fp8_gemm, fp8_gemm_unavailable_reason
from microscale.quant.fp8 import fp8_matmul_reference, fp8_scale, quantize_fp8

N = 80  # 2.5 column tiles
SHAPES = [(m, k) for m in (1, 5, 33) for k in (16, 48, 128)]  # K: below one tile, a ragged tail, whole tiles

# Largest |kernel - reference| allowed, as a fraction of the output's scale (its largest |value|). float32: both
# sum the same exact FP8 products in float32, in other orders. bfloat16: the reference rounds to bfloat16 three
# times (the matmul, the scaled result, the biased sum), the kernel once: a few units of 2^-8. float16: compared
# with the float32 path rounded once (see _reference), so both round the same sum: an ulp (2^-11) or so.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3 * 2**-8, torch.float16: 2 * 2**-11}


def _operands(m: int, k: int, x_per_token: bool, w_per_channel: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    w = torch.randn(N, k, generator=gen) * 0.05
    x_scale = fp8_scale(x.abs().amax(dim=1, keepdim=True) if x_per_token else x.abs().amax())
    w_scale = fp8_scale(w.abs().amax(dim=1) if w_per_channel else w.abs().amax())
    bias = torch.randn(N, generator=gen)
    return quantize_fp8(x, x_scale), x_scale, quantize_fp8(w, w_scale.reshape(-1, 1) if w_per_channel else w_scale), \
        w_scale, bias


def _reference(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    if out_dtype == torch.float16:
        # The reference rounds its float16 result before adding the bias; the kernel rounds once, after: take the
        # reference's float32 result, biased, rounded once.
        y = fp8_matmul_reference(x_q, x_scale, w_q, w_scale, None, torch.float32)
        return (y if bias is None else y + bias.float()).to(torch.float16)
    return fp8_matmul_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_per_token", [False, True], ids=["x-tensor", "x-token"])
@pytest.mark.parametrize("w_per_channel", [False, True], ids=["w-tensor", "w-channel"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_matches_the_reference(out_dtype, x_per_token, w_per_channel, with_bias):
    for m, k in SHAPES:
        x_q, x_scale, w_q, w_scale, bias = _operands(m, k, x_per_token, w_per_channel, seed=m * 1000 + k)
        bias = bias.to(out_dtype) if with_bias else None
        out = fp8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        _assert_close(out, _reference(x_q, x_scale, w_q, w_scale, bias, out_dtype), out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scales_bias_and_rounding_exact(out_dtype):
    """Small integers, so the float32 epilogue is exact and the one rounding to out_dtype must be torch's
    (nearest, ties to even; the interpreter's own bfloat16 cast truncates): the result is bit for bit. A swapped
    row/column scale or bias index would also show here (the oracle test's random scales are close together)."""
    m, k = 5, 48
    x_q = torch.ones(m, k).to(torch.float8_e4m3fn)
    w_q = torch.ones(N, k).to(torch.float8_e4m3fn)
    x_scale = (torch.arange(m, dtype=torch.float32) + 1).reshape(m, 1)
    w_scale = torch.arange(N, dtype=torch.float32) + 1
    bias = (torch.arange(N, dtype=torch.float32) * 97).to(out_dtype)  # sums up to ~27000: most round, some tie
    out = fp8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    expected = k * x_scale * w_scale[None, :] + bias.float()[None, :]
    torch.testing.assert_close(out, expected.to(out_dtype), rtol=0, atol=0)


def test_strided_operands_and_one_token_scale():
    """Column slices of wider tensors (row stride != K), and a [1, 1] per-token scale for a single token."""
    m, k = 1, 48
    x_q, x_scale, w_q, w_scale, bias = _operands(m, k, True, True, seed=7)
    wide_x = torch.zeros(m, k + 16).to(torch.float8_e4m3fn)
    wide_w = torch.zeros(N, k + 16).to(torch.float8_e4m3fn)
    wide_x[:, 8 : 8 + k] = x_q
    wide_w[:, 8 : 8 + k] = w_q
    x_view, w_view = wide_x[:, 8 : 8 + k], wide_w[:, 8 : 8 + k]
    assert not x_view.is_contiguous() or x_view.stride(0) != k
    out = fp8_gemm(x_view, x_scale, w_view, w_scale, bias, torch.float32)
    _assert_close(out, _reference(x_q, x_scale, w_q, w_scale, bias, torch.float32), torch.float32)


def test_no_tokens():
    x_q, x_scale, w_q, w_scale, bias = _operands(1, 16, True, True)
    out = fp8_gemm(x_q[:0], x_scale[:0], w_q, w_scale, bias, torch.bfloat16)
    assert out.shape == (0, N) and out.dtype == torch.bfloat16


def test_rejects_mismatched_k_and_unsupported_dtype():
    x_q, x_scale, w_q, w_scale, _ = _operands(5, 48, True, True)
    with pytest.raises(ValueError, match="K must match"):
        fp8_gemm(x_q, x_scale, w_q[:, :32], w_scale, None, torch.float32)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        fp8_gemm(x_q, x_scale, w_q, w_scale, None, torch.float64)


def test_unavailable_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fp8_gemm_unavailable_reason(torch.device("cpu")) is None  # the interpreter runs anywhere

    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in fp8_gemm_unavailable_reason(torch.device("cpu"))
    cuda = torch.device("cuda", 0)
    for capability, ok in [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        reason = fp8_gemm_unavailable_reason(cuda)
        if ok:
            assert reason is None, capability
        else:
            assert reason == f"FP8 tl.dot needs compute capability 8.9+ (this GPU is {capability[0]}.{capability[1]})"


def test_interpreter_tiles_leave_every_dimension_ragged():
    """The oracle test's shapes only exercise the masks if the tiles do not divide them."""
    block_m, block_n, block_k, _, _ = kernel_module._tiles(33)
    assert 33 % block_m and N % block_n and 48 % block_k and 16 < block_k and 128 % block_k == 0
