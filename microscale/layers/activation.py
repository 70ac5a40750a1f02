from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from microscale.kernels.candidates import Candidate, always, fuses_fp8_output, pick_for_family
from microscale.kernels.selector import triton_unavailable_reason
from microscale.quant.fp8 import quantize_fp8


class SiluAndMul(nn.Module):
    """SwiGLU on x = [gate | up]: silu(gate) * up. select_kernels picks the kernel once (the runner calls it):
    Triton computes it in one fused pass (microscale/kernels/activation.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = _SILU_REFERENCE.fn
        self.fused_fp8_output = False  # the kernel emits FP8 itself (sm_89+), else torch quantises after it

    def select_kernels(self, family: str, device: torch.device) -> None:
        picked = pick_for_family("SwiGLU", family, [_SILU_TRITON], _SILU_REFERENCE, device)
        self.kernel = picked.fn
        self.fused_fp8_output = picked is _SILU_TRITON and fuses_fp8_output("SwiGLU before an FP8 Linear", device)

    def forward(self, x: torch.Tensor, fp8_scale: torch.Tensor | None = None) -> torch.Tensor:
        """With fp8_scale, the product comes out quantised for an FP8 Linear (one fused pass with Triton)."""
        return self.kernel(self, x, fp8_scale)

    def kernel_spec(self) -> tuple[str, float, float]:
        """How fused kernels (the MoE's) name this activation."""
        return ("silu", 0.0, 0.0)


def _silu_reference(act: SiluAndMul, x: torch.Tensor, fp8_scale: torch.Tensor | None) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    out = F.silu(gate) * up
    return out if fp8_scale is None else quantize_fp8(out, fp8_scale)


def _silu_triton(act: SiluAndMul, x: torch.Tensor, fp8_scale: torch.Tensor | None) -> torch.Tensor:
    from microscale.kernels.activation import silu_and_mul

    kernel_scale = fp8_scale if act.fused_fp8_output else None
    out = silu_and_mul(x.reshape(-1, x.shape[-1]), kernel_scale).view(*x.shape[:-1], x.shape[-1] // 2)
    return out if fp8_scale is None or kernel_scale is not None else quantize_fp8(out, fp8_scale)


_SILU_TRITON = Candidate("triton (one fused pass, any FP8 output included)", triton_unavailable_reason, _silu_triton)
_SILU_REFERENCE = Candidate("torch reference", always, _silu_reference)


class ClampedSwiGLU(nn.Module):
    """gpt-oss's gated activation on [gate | up]: gate clamped above at `limit`, up clamped to ±limit, then
    (up + 1) * gate * sigmoid(alpha * gate). Its kernel is picked once, like SiluAndMul's."""

    def __init__(self, limit: float, alpha: float) -> None:
        super().__init__()
        self.limit, self.alpha = limit, alpha
        self.kernel = _CLAMPED_REFERENCE.fn

    def select_kernels(self, family: str, device: torch.device) -> None:
        self.kernel = pick_for_family("clamped SwiGLU", family, [_CLAMPED_TRITON], _CLAMPED_REFERENCE, device).fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(self, x)

    def kernel_spec(self) -> tuple[str, float, float]:
        return ("clamped_swiglu", self.limit, self.alpha)


def _clamped_reference(act: ClampedSwiGLU, x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    gate = gate.clamp(max=act.limit)
    up = up.clamp(min=-act.limit, max=act.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))


def _clamped_triton(act: ClampedSwiGLU, x: torch.Tensor) -> torch.Tensor:
    from microscale.kernels.activation import clamped_swiglu

    flat = clamped_swiglu(x.reshape(-1, x.shape[-1]), act.limit, act.alpha)
    return flat.view(*x.shape[:-1], x.shape[-1] // 2)


_CLAMPED_TRITON = Candidate("triton (one fused pass)", triton_unavailable_reason, _clamped_triton)
_CLAMPED_REFERENCE = Candidate("torch reference", always, _clamped_reference)
