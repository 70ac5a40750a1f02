from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """SwiGLU: x holds [gate | up] along the last dim; returns silu(gate) * up."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel_backend = "torch"  # "triton": one fused pass (microscale/kernels/activation.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_backend == "triton":
            from microscale.kernels.activation import silu_and_mul

            return silu_and_mul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], x.shape[-1] // 2)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class ClampedSwiGLU(nn.Module):
    """gpt-oss's gated activation on [gate | up]: gate clamped above at `limit`, up clamped to ±limit, then
    (up + 1) * gate * sigmoid(alpha * gate)."""

    def __init__(self, limit: float, alpha: float) -> None:
        super().__init__()
        self.limit, self.alpha = limit, alpha
        self.kernel_backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_backend == "triton":
            from microscale.kernels.activation import clamped_swiglu

            flat = clamped_swiglu(x.reshape(-1, x.shape[-1]), self.limit, self.alpha)
            return flat.view(*x.shape[:-1], x.shape[-1] // 2)
        gate, up = x.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
