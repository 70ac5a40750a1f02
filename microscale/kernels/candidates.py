"""Ordered kernel candidates for one op: the first that applies on the device runs, and each one that does
not says why (logged once). The family `kernel_backend` resolves to decides which candidates are listed:
"torch" lists only the reference; "triton" lists the fast kernels (Triton, and vendor kernels such as
torch._scaled_mm where they exist) before it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from microscale.kernels.selector import fp8_unavailable_reason

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


def pick_for_family(
    op: str, family: str, fast: Sequence[Candidate], reference: Candidate, device: torch.device
) -> Candidate:
    """`op`'s kernel in `family`: the first of `fast` that applies, else the torch `reference` ("triton"); the
    reference alone ("torch")."""
    return pick_kernel(op, [*fast, reference] if family == "triton" else [reference], device)


_FP8_FUSED = Candidate("FP8 output quantised inside the kernel", fp8_unavailable_reason, lambda: True)
_FP8_AFTER = Candidate("16-bit kernel output, then torch FP8 quantisation", always, lambda: False)


def fuses_fp8_output(op: str, device: torch.device) -> bool:
    """Whether `op`'s Triton kernel may emit float8_e4m3fn itself on `device` (sm_89+); below that, the caller
    quantises the kernel's 16-bit output with torch (logged once, like every kernel choice)."""
    return pick_kernel(op, (_FP8_FUSED, _FP8_AFTER), device).fn()
