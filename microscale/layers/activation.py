from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from microscale.kernels.candidates import fuses_fp8_output
from microscale.quant.fp8 import quantize_fp8


class _GatedActivation(nn.Module):
    """x holds [gate | up] along the last dim. The runner picks the kernel family: "triton" computes it in one
    fused pass (microscale/kernels/activation.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel_backend = "torch"
        self.fused_fp8_output = False  # the kernel emits FP8 itself (sm_89+), else torch quantises after it

    def select_kernels(self, family: str, device: torch.device) -> None:
        self.kernel_backend = family
        self.fused_fp8_output = family == "triton" and fuses_fp8_output("SwiGLU before an FP8 Linear", device)


class SiluAndMul(_GatedActivation):
    """SwiGLU: silu(gate) * up."""

    def forward(self, x: torch.Tensor, fp8_scale: torch.Tensor | None = None) -> torch.Tensor:
        """With fp8_scale, the product comes out quantised for an FP8 Linear (one fused pass with Triton)."""
        if self.kernel_backend == "triton":
            from microscale.kernels.activation import silu_and_mul

            kernel_scale = fp8_scale if self.fused_fp8_output else None
            out = silu_and_mul(x.reshape(-1, x.shape[-1]), kernel_scale).view(*x.shape[:-1], x.shape[-1] // 2)
            return out if fp8_scale is None or kernel_scale is not None else quantize_fp8(out, fp8_scale)
        gate, up = x.chunk(2, dim=-1)
        out = F.silu(gate) * up
        return out if fp8_scale is None else quantize_fp8(out, fp8_scale)

    def kernel_spec(self) -> tuple[str, float, float]:
        """How fused kernels (the MoE's) name this activation."""
        return ("silu", 0.0, 0.0)


class ClampedSwiGLU(_GatedActivation):
    """gpt-oss's gated activation on [gate | up]: gate clamped above at `limit`, up clamped to ±limit, then
    (up + 1) * gate * sigmoid(alpha * gate)."""

    def __init__(self, limit: float, alpha: float) -> None:
        super().__init__()
        self.limit, self.alpha = limit, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_backend == "triton":
            from microscale.kernels.activation import clamped_swiglu

            flat = clamped_swiglu(x.reshape(-1, x.shape[-1]), self.limit, self.alpha)
            return flat.view(*x.shape[:-1], x.shape[-1] // 2)
        gate, up = x.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def kernel_spec(self) -> tuple[str, float, float]:
        return ("clamped_swiglu", self.limit, self.alpha)
