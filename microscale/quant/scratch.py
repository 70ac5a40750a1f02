"""Reusable buffers for weights decoded on the fly (FP8, MXFP4 on CPU): one per shape and dtype for the whole
model, since layers run one at a time. A fresh multi-MiB tensor per matmul costs more in page faults than the
decoding itself."""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple, torch.Tensor] = {}


def scratch_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of that shape and dtype, shared by every caller with the same `name`: valid until the next
    call with the same key."""
    key = (name, tuple(shape), dtype, device)
    buffer = _BUFFERS.get(key)
    if buffer is None:
        buffer = _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer
