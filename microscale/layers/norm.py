from __future__ import annotations

import torch
from torch import nn

from microscale.kernels.candidates import fuses_fp8_output
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
        self.kernel_backend = "torch"  # "triton": one fused kernel (microscale/kernels/norm.py)
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
        self.kernel_backend = family
        self.fused_fp8_output = family == "triton" and fuses_fp8_output("RMSNorm before an FP8 Linear", device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8_scale: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With fp8_scale, the output comes quantised for the FP8 Linear that follows (one fused pass with Triton)."""
        if self.kernel_backend == "triton":
            return self._fused(x, residual, fp8_scale)
        if residual is not None:
            x = x + residual
        out = self._norm(x)
        if fp8_scale is not None:
            out = quantize_fp8(out, fp8_scale)
        return out if residual is None else (out, x)

    def _fused(
        self, x: torch.Tensor, residual: torch.Tensor | None, fp8_scale: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from microscale.kernels.norm import rms_norm

        size = x.shape[-1]
        kernel_scale = fp8_scale if self.fused_fp8_output else None
        flat = rms_norm(x.reshape(-1, size), self.weight, self.eps, self.float32_weight,
                        None if residual is None else residual.reshape(-1, size), kernel_scale)
        out, new_residual = (flat, None) if residual is None else flat
        if fp8_scale is not None and kernel_scale is None:
            out = quantize_fp8(out, fp8_scale)
        out = out.view(x.shape)
        return out if residual is None else (out, new_residual.view(x.shape))
