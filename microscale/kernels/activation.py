"""Fused gated activations on x = [gate | up] ([T, 2 * I]): SwiGLU (`SiluAndMul`, optionally quantising the
product to FP8 for the down projection) and gpt-oss's clamped SwiGLU (`ClampedSwiGLU`). Computed in float32 in
one pass and rounded once to x's dtype, where torch rounds after each op in a 16-bit dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microscale.kernels.rounding import quantize_fp8, round_to, rounding_of

_FP8 = getattr(torch, "float8_e4m3fn", None)
_MAX_BLOCK = 1024  # columns per program: a row of a wide MLP spans several


@triton.jit
def _gated_kernel(
    x_ptr, x_stride, out_ptr, out_stride, scale_ptr, inter, limit, alpha,
    CLAMPED: tl.constexpr, FP8_OUT: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if CLAMPED:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        y = (up + 1.0) * (gate / (1.0 + tl.exp(-alpha * gate)))
    else:
        y = gate / (1.0 + tl.exp(-gate)) * up  # silu as torch writes it: x / (1 + exp(-x))
    y = round_to(y, ROUNDING)
    if FP8_OUT:
        # The activation as the FP8 Linear would get it (model dtype), quantised as quantize_fp8 does.
        y = quantize_fp8(tl.math.div_rn(y, tl.load(scale_ptr)))
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, clamped: bool, limit: float, alpha: float, fp8_scale: torch.Tensor | None):
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"Gated activations take x as [tokens, 2 * intermediate], got shape {tuple(x.shape)}.")
    rounding = rounding_of(x.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, inter = x.shape[0], x.shape[1] // 2
    if fp8_scale is not None:
        if _FP8 is None:
            raise RuntimeError(f"torch {torch.__version__} has no float8_e4m3fn.")
        fp8_scale = fp8_scale.to(device=x.device, dtype=torch.float32).reshape(())
    out = torch.empty(T, inter, dtype=x.dtype if fp8_scale is None else _FP8, device=x.device)
    block = min(triton.next_power_of_2(inter), _MAX_BLOCK)
    if T and inter:
        _gated_kernel[(T, triton.cdiv(inter, block))](
            x, x.stride(0), out, out.stride(0), out if fp8_scale is None else fp8_scale, inter, limit, alpha,
            CLAMPED=clamped, FP8_OUT=fp8_scale is not None, ROUNDING=rounding, BLOCK=block,
        )
    return out


def silu_and_mul(x: torch.Tensor, fp8_scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] [T, 2 * I]: [T, I] in x's dtype, or with fp8_scale (a float32
    scalar tensor) quantize_fp8 of that, float8_e4m3fn, for an FP8 down projection."""
    return _launch(x, False, 0.0, 0.0, fp8_scale)


def clamped_swiglu(x: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's ClampedSwiGLU on x = [gate | up] [T, 2 * I]: [T, I] in x's dtype."""
    return _launch(x, True, float(limit), float(alpha), None)
