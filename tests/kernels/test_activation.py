"""silu_and_mul and clamped_swiglu against SiluAndMul and ClampedSwiGLU, the torch modules they replace.

The kernels compute in float32 and round once; torch rounds after every op in a 16-bit dtype. Tolerances:
- against the module run on the float32 input and rounded once to the dtype: within 1 ulp of the dtype (the
  float32 exp and division may differ in the last bit), at most 3% of values off at all; float32 within 1e-6.
- against the module run in the 16-bit dtype itself: within 4 ulps (its up to five roundings); for the clamped
  SwiGLU plus what its roundings of intermediates amplify: |out| * |alpha * gate| * eps(dtype), as the sigmoid's
  argument alpha * gate is rounded (sigmoid(z) for negative z changes by |z| times z's relative change), and
  (|gate| + 1) * (|up| + 1) * tiny * eps(dtype), float16's subnormal spacing, where sigmoid(alpha * gate) or
  gate * sigmoid underflows (sigmoid(-17) ~ 4e-8)
The FP8 output equals quantize_fp8 of the kernel's own output exactly (ties to even, as torch rounds, although
the interpreter's float8 cast rounds ties away) and lies within 1 fp8 ulp of quantize_fp8 of torch's output."""

from __future__ import annotations

import pytest
import torch

from microscale.kernels.activation import clamped_swiglu, silu_and_mul
from microscale.layers.activation import ClampedSwiGLU, SiluAndMul
from microscale.quant.fp8 import quantize_fp8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LIMIT, ALPHA = 7.0, 1.702  # gpt-oss's


def _ulp(x: torch.Tensor) -> torch.Tensor:
    finfo = torch.finfo(x.dtype)
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp(min=finfo.tiny)))) * finfo.eps


def _input(T: int, inter: int, dtype: torch.dtype, spread: float = 3.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(T, 2 * inter, generator=gen)).to(dtype)


def _check(out: torch.Tensor, module, x: torch.Tensor, extra_tol: torch.Tensor | float = 0.0) -> None:
    assert out.dtype == x.dtype and out.shape == (x.shape[0], x.shape[1] // 2)
    once = module(x.float()).to(x.dtype)  # the same math, rounded once
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, once, rtol=1e-6, atol=1e-6)
        return
    assert ((out.float() - once.float()).abs() <= _ulp(once)).all()
    assert (out != once).float().mean() <= 0.03
    ref = module(x)
    assert ((out.float() - ref.float()).abs() <= 4 * _ulp(ref) + extra_tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [48, 1500])  # not powers of two; 1500 spans two column blocks
def test_silu_and_mul(dtype, inter):
    x = _input(5 if inter > 1000 else 17, inter, dtype)
    _check(silu_and_mul(x), SiluAndMul(), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamped_swiglu(dtype):
    x = _input(17, 40, dtype, spread=6.0)
    gate, up = x.float().chunk(2, dim=-1)
    assert (gate > LIMIT).any() and (up > LIMIT).any() and (up < -LIMIT).any(), "the clamps are not exercised"
    out = clamped_swiglu(x, LIMIT, ALPHA)
    gate, up = gate.clamp(max=LIMIT), up.clamp(-LIMIT, LIMIT)
    finfo = torch.finfo(x.dtype)
    extra_tol = out.float().abs() * (ALPHA * gate).abs() * finfo.eps
    extra_tol += (gate.abs() + 1) * (up.abs() + 1) * finfo.tiny * finfo.eps
    _check(out, ClampedSwiGLU(LIMIT, ALPHA), x, extra_tol)


def test_clamped_swiglu_other_constants():
    """limit and alpha are taken from the arguments, not fixed to gpt-oss's."""
    x = _input(9, 24, torch.float32, spread=4.0)
    _check(clamped_swiglu(x, 2.5, 0.5), ClampedSwiGLU(2.5, 0.5), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_fp8(dtype):
    x = _input(13, 72, dtype, spread=4.0)
    scale = torch.tensor(0.02)  # the largest products (~30) saturate at 448
    out = silu_and_mul(x, fp8_scale=scale)
    assert out.dtype == torch.float8_e4m3fn
    assert torch.equal(out.view(torch.uint8), quantize_fp8(silu_and_mul(x), scale).view(torch.uint8))
    ref = quantize_fp8(SiluAndMul()(x), scale)
    assert (out.float() - ref.float()).abs().le(_ulp(ref).clamp(min=2.0**-9)).all()
    assert (ref.float().abs() == 448).any(), "no value saturated"


def test_fp8_ties_round_to_even():
    """Products that are exact E4M3 midpoints: with gate = 64, silu(gate) == 64 exactly in float32 (exp(-64)
    vanishes beside 1), so the product is exactly 64 * up."""
    gate = torch.full((8,), 64.0)
    up = torch.tensor([9.5, 17.0, 7.75, 15.5, 3 / 1024, -9.5, -17.0, 0.53125]) / 64
    out = silu_and_mul(torch.cat([gate, up])[None], fp8_scale=torch.tensor(1.0))
    assert out[0].float().tolist() == [10.0, 16.0, 8.0, 16.0, 2 / 512, -10.0, -16.0, 0.5]


def test_rejects_odd_width():
    with pytest.raises(ValueError):
        silu_and_mul(torch.randn(2, 7))
