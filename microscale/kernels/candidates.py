"""Ordered kernel candidates for one op: the first that applies on the device runs, and each one that does
not says why (logged once). The family `kernel_backend` resolves to decides which candidates are listed:
"torch" lists only the reference; "triton" lists the fast kernels (Triton, and vendor kernels such as
torch._scaled_mm where they exist) before it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_logged: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Candidate:
    name: str
    unavailable_reason: Callable[[torch.device], str | None]
    fn: Callable


def always(_: torch.device) -> str | None:
    return None


def pick_kernel(op: str, candidates: Sequence[Candidate], device: torch.device) -> Candidate:
    skipped = []
    for candidate in candidates:
        reason = candidate.unavailable_reason(device)
        if reason is None:
            key = (op, candidate.name, str(device))
            if key not in _logged:
                _logged.add(key)
                logger.info("%s: %s%s", op, candidate.name, "".join(f" ({s})" for s in skipped))
            return candidate
        skipped.append(f"{candidate.name} skipped: {reason}")
    raise ValueError(f"No {op} kernel runs on {device}: " + "; ".join(skipped))
