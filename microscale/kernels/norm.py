"""Fused residual add + RMSNorm, as `microscale.layers.norm.RMSNorm.forward` computes it, optionally quantising
the output to FP8 for the Linear that follows. One program per row; the whole row fits one block."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microscale.kernels.rounding import quantize_fp8, round_to, rounding_of

_FP8 = getattr(torch, "float8_e4m3fn", None)


@triton.jit
def _rms_norm_kernel(
    x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride, res_out_ptr, scale_ptr,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, FLOAT32_WEIGHT: tl.constexpr, FP8_OUT: tl.constexpr,
    ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + r, ROUNDING)  # the sum is taken in the model dtype: it is the new residual
        tl.store(res_out_ptr + row * hidden + cols, x.to(res_out_ptr.dtype.element_ty), mask=mask)
    n = x * tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if FLOAT32_WEIGHT:
        y = round_to(w * n, ROUNDING)  # float32 weight first, one cast of the product
    else:
        y = round_to(w * round_to(n, ROUNDING), ROUNDING)  # cast, then the multiply in the model dtype
    if FP8_OUT:
        y = quantize_fp8(tl.math.div_rn(y, tl.load(scale_ptr)))
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, float32_weight: bool = False,
    residual: torch.Tensor | None = None, fp8_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm.forward on x [T, hidden]: returns the normalised x, and with a residual, (out, x + residual).
    With fp8_scale (a float32 scalar tensor) out is quantize_fp8(out, fp8_scale), float8_e4m3fn, for an FP8
    Linear. weight: [hidden], float32 when float32_weight, else the model dtype."""
    if x.dim() != 2:
        raise ValueError(f"rms_norm takes x as [tokens, hidden], got shape {tuple(x.shape)}.")
    T, hidden = x.shape
    rounding = rounding_of(x.dtype)
    if weight.shape != (hidden,):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match hidden size {hidden}.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("residual must have x's shape and dtype.")
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    if fp8_scale is not None:
        if _FP8 is None:
            raise RuntimeError(f"torch {torch.__version__} has no float8_e4m3fn.")
        fp8_scale = fp8_scale.to(device=x.device, dtype=torch.float32).reshape(())
    out = torch.empty(T, hidden, dtype=x.dtype if fp8_scale is None else _FP8, device=x.device)
    new_residual = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if T:
        _rms_norm_kernel[(T,)](
            x, x.stride(0),
            x if residual is None else residual, 0 if residual is None else residual.stride(0),
            weight, out, out.stride(0), out if new_residual is None else new_residual,
            out if fp8_scale is None else fp8_scale,
            hidden, eps,
            HAS_RESIDUAL=residual is not None, FLOAT32_WEIGHT=float32_weight, FP8_OUT=fp8_scale is not None,
            ROUNDING=rounding, BLOCK=triton.next_power_of_2(hidden),
        )
    return out if residual is None else (out, new_residual)
