"""Batch-invariant matmuls for deterministic mode (`deterministic=True`): a token's result must not depend on
how many other rows share its matmul. CPU BLAS (oneDNN/MKL) picks its kernel from the row count, and a row's
last bits change with it (float32 at 2, 7 or 9 rows; bfloat16 at 1 row with K >= 2048; on AMX/AVX-512 machines
float32 changes again at 33-64 rows, so padding the row count to a multiple is not enough). Here every matmul is
made of calls of exactly ROW_TILE rows (the last one zero-padded): one shape, so one kernel and one reduction
order for every row of every batch (measured for 1-300 rows, K 64-4096, N 64-4096, float32 and bfloat16, on AVX2
and AMX machines; tests/kernels/test_batch_invariant_linear.py keeps it checked). The mode is scoped to a forward
(a context variable), so engines with and without it can share a process."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

ROW_TILE = 8

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("batch_invariant", default=False)


@contextlib.contextmanager
def batch_invariant_mode(enabled: bool = True) -> Iterator[None]:
    """Within the block, linear() pads its rows (when `enabled`)."""
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


def batch_invariant_enabled() -> bool:
    """Whether the running forward is in deterministic mode (kernels whose reduction order depends on the row
    count must then step aside)."""
    return _enabled.get()


def pad_rows(x: torch.Tensor, multiple: int = ROW_TILE, dim: int = 0) -> torch.Tensor:
    """x with zero rows appended along `dim` up to a multiple of `multiple`."""
    missing = -x.shape[dim] % multiple
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; inside batch_invariant_mode, as calls of exactly ROW_TILE rows. (The compiled forward never runs
    in that mode, and Dynamo cannot read a context variable: it traces plain F.linear.)"""
    if torch.compiler.is_compiling() or not _enabled.get() or x.numel() == 0:
        return F.linear(x, weight, bias)
    flat = pad_rows(x.reshape(-1, x.shape[-1]))
    out = torch.cat([F.linear(flat[i : i + ROW_TILE], weight, bias) for i in range(0, flat.shape[0], ROW_TILE)])
    return out[: x.numel() // x.shape[-1]].view(*x.shape[:-1], weight.shape[0])
