"""Pick the attention backend: the family `kernel_backend` resolves to, else the first candidate, in order of
preference, that works on this device."""

from __future__ import annotations

import logging

import torch

from microscale.attention.torch_backend import TorchAttentionBackend
from microscale.kernels.selector import resolve_kernel_backend, triton_unavailable_reason

logger = logging.getLogger(__name__)


def select_attention_backend(device: torch.device, kernel_backend: str = "auto"):
    """A TorchAttentionBackend or TritonAttentionBackend (same interface). Triton's module is imported only
    when chosen (it defines kernels, which reads TRITON_INTERPRET)."""
    family = resolve_kernel_backend(kernel_backend, device)
    if family == "triton":
        from microscale.attention.triton_backend import TritonAttentionBackend

        logger.info("attention backend: triton")
        return TritonAttentionBackend()
    reason = triton_unavailable_reason(device) if kernel_backend == "auto" else "kernel_backend='torch'"
    logger.info("attention backend: torch%s", f" (triton: {reason})" if reason else "")
    return TorchAttentionBackend()
