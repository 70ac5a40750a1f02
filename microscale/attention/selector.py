"""Pick the attention backend: the family `kernel_backend` resolves to, else the first candidate, in order of
preference, that works on this device."""

from __future__ import annotations

import logging

import torch

from microscale.attention.backend import AttentionBackend
from microscale.attention.batch_invariant import BatchInvariantAttentionBackend
from microscale.attention.torch_backend import TorchAttentionBackend
from microscale.kernels.selector import fp8_unavailable_reason, resolve_kernel_backend, triton_unavailable_reason
from microscale.quant.kv_cache import KV_CACHES

logger = logging.getLogger(__name__)


def select_attention_backend(
    device: torch.device, kernel_backend: str = "auto", kv_cache_quant: str | None = None,
    deterministic: bool = False,
) -> AttentionBackend:
    """A TorchAttentionBackend, TritonAttentionBackend or BatchInvariantAttentionBackend (the
    last in deterministic mode, where it is the only choice). Triton's module is imported only when chosen (it
    defines kernels, which reads TRITON_INTERPRET). An FP8 KV cache below sm_89 stays with the torch backend
    (Triton cannot convert float8 there); the other ops keep their kernel family."""
    if deterministic:
        reason = BatchInvariantAttentionBackend.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"deterministic=True cannot run on {device.type}: {reason}.")
        logger.info("attention backend: batch-invariant (deterministic mode)")
        return BatchInvariantAttentionBackend()
    family = resolve_kernel_backend(kernel_backend, device)
    stores_fp8 = KV_CACHES.get(kv_cache_quant).stores_fp8
    reason = fp8_unavailable_reason(device) if family == "triton" and stores_fp8 else None
    if family == "triton" and reason is None:
        from microscale.attention.triton_backend import TritonAttentionBackend

        logger.info("attention backend: triton")
        return TritonAttentionBackend()
    if reason is not None:
        reason = f"{reason}, which the FP8 KV cache needs"
    elif kernel_backend == "auto":
        reason = triton_unavailable_reason(device)
    else:
        reason = "kernel_backend='torch'"
    logger.info("attention backend: torch%s", f" (triton: {reason})" if reason else "")
    return TorchAttentionBackend()
