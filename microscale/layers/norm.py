from __future__ import annotations

import torch
from torch import nn

from microscale.kernels.candidates import Candidate, always, fuses_fp8_output, pick_for_family
from microscale.kernels.selector import triton_unavailable_reason
from microscale.quant.fp8 import quantize_fp8


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as transformers does. Given a residual, it adds it first
    and returns the new residual too (the pre-norm transformer's add + norm).

    Llama-style norms cast the normalised activations back before the weight multiplies them; with
    `float32_weight` (gpt-oss, whose norms transformers keeps in float32) the weight is float32 and multiplies
    first, and only the product is cast."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, float32_weight: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.kernel = _REFERENCE.fn  # select_kernels picks the kernel family's (the runner calls it once)
        self.fused_fp8_output = False  # the kernel emits FP8 itself (sm_89+), else torch quantises after it
        self.float32_weight = float32_weight
        weight_dtype = torch.float32 if float32_weight else dtype
        self.weight = nn.Parameter(torch.ones(size, dtype=weight_dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.float32_weight:
            return (self.weight * x32).to(x.dtype)
        return self.weight * x32.to(x.dtype)

    def select_kernels(self, family: str, device: torch.device) -> None:
        picked = pick_for_family("RMSNorm", family, [_TRITON], _REFERENCE, device)
        self.kernel = picked.fn
        self.fused_fp8_output = picked is _TRITON and fuses_fp8_output("RMSNorm before an FP8 Linear", device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8_scale: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With fp8_scale, the output comes quantised for the FP8 Linear that follows (one fused pass with Triton)."""
        return self.kernel(self, x, residual, fp8_scale)


def _reference(
    norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, fp8_scale: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    out = norm._norm(x)
    if fp8_scale is not None:
        out = quantize_fp8(out, fp8_scale)
    return out if residual is None else (out, x)


def _fused(
    norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, fp8_scale: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    from microscale.kernels.norm import rms_norm

    size = x.shape[-1]
    kernel_scale = fp8_scale if norm.fused_fp8_output else None
    flat = rms_norm(x.reshape(-1, size), norm.weight, norm.eps, norm.float32_weight,
                    None if residual is None else residual.reshape(-1, size), kernel_scale)
    out, new_residual = (flat, None) if residual is None else flat
    if fp8_scale is not None and kernel_scale is None:
        out = quantize_fp8(out, fp8_scale)
    out = out.view(x.shape)
    return out if residual is None else (out, new_residual.view(x.shape))


_TRITON = Candidate("triton (residual add, norm and any FP8 output in one pass)", triton_unavailable_reason, _fused)
_REFERENCE = Candidate("torch reference", always, _reference)
