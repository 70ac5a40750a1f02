from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as transformers does. Given a residual, it adds it first
    and returns the new residual too (the pre-norm transformer's add + norm).

    Llama-style norms cast the normalised activations back before the weight multiplies them; with
    `float32_weight` (gpt-oss, whose norms transformers keeps in float32) the weight is float32 and multiplies
    first, and only the product is cast."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, float32_weight: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.float32_weight = float32_weight
        weight_dtype = torch.float32 if float32_weight else dtype
        self.weight = nn.Parameter(torch.ones(size, dtype=weight_dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.float32_weight:
            return (self.weight * x32).to(x.dtype)
        return self.weight * x32.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
