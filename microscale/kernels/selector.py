"""Which kernel family runs the hot ops (attention, KV cache writes, norms, activations): Triton kernels or
the torch reference. One knob, `kernel_backend`, forces a family for every op that has it."""

from __future__ import annotations

import importlib.util
import os

import torch

KERNEL_BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """Triton kernels run on CPU tensors through Triton's interpreter (slowly: for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'microscale[triton]')"
    if device.type == "cuda" or interpreting():
        return None
    return f"Triton kernels need a CUDA device; on {device.type} they run only under TRITON_INTERPRET=1 (tests)"


def resolve_kernel_backend(requested: str, device: torch.device) -> str:
    """"torch" or "triton". auto: Triton on a GPU, the torch reference elsewhere (the interpreter is for tests)."""
    if requested not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {', '.join(KERNEL_BACKENDS)}, got {requested!r}.")
    if requested == "torch":
        return "torch"
    reason = triton_unavailable_reason(device)
    if requested == "triton":
        if reason is not None:
            raise ValueError(f"kernel_backend='triton' cannot run here: {reason}.")
        return "triton"
    return "triton" if reason is None and device.type == "cuda" else "torch"


FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: FP8 tensor cores, and Triton's float8e4nv conversions


def fp8_capability_shortfall(device: torch.device) -> str | None:
    """"compute capability 8.9+ (this GPU is X.Y)" for a CUDA GPU without FP8 support, else None: the one
    capability check every FP8 path (Triton kernels, torch._scaled_mm) phrases its refusal with."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return f"compute capability 8.9+ (this GPU is {major}.{minor})"
    return None


def fp8_unavailable_reason(device: torch.device, needs: str = "Triton's float8e4nv") -> str | None:
    """Why Triton kernels that store or convert float8_e4m3fn (the FP8 KV cache, FP8-emitting norms and SwiGLU,
    the FP8 GEMM) cannot run on `device`: Triton rejects float8e4nv below sm_89. None where they can (any CUDA
    GPU from sm_89, or the interpreter). `needs` names what needs it in the message."""
    if device.type != "cuda":
        return None if interpreting() else f"Triton FP8 kernels need a CUDA device, not {device.type}"
    shortfall = fp8_capability_shortfall(device)
    return None if shortfall is None else f"{needs} needs {shortfall}"
