"""Pick the attention backend: the first candidate, in order of preference, that works on this device."""

from __future__ import annotations

import logging

import torch

from microscale.attention.torch_backend import TorchAttentionBackend

logger = logging.getLogger(__name__)

# Most preferred first; faster backends (Triton) go before the torch reference as they land.
CANDIDATES = [TorchAttentionBackend]


def select_attention_backend(device: torch.device) -> TorchAttentionBackend:
    for candidate in CANDIDATES:
        reason = candidate.unavailable_reason(device)
        if reason is None:
            logger.info("attention backend: %s", candidate.name)
            return candidate()
        logger.info("attention backend %s skipped: %s", candidate.name, reason)
    raise RuntimeError(f"No attention backend works on {device}.")
