"""This process's place in the tensor-parallel group, and the collectives the sharded layers use.

Layers read `tp_rank()` / `tp_size()` when they are built, so a model built outside a group (size 1) is the
plain single-device model and every collective here is a no-op.

Two process groups: the model group (NCCL on GPUs, gloo on CPUs) carries the forward's collectives, and a gloo
control group carries rank 0's step messages (host data) to the workers, who idle there between steps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_rank, _size = 0, 1
_expert_parallel = False
_control_group: dist.ProcessGroup | None = None

# How long a collective may wait for a peer. A dead peer closes its sockets and fails the collective at once;
# this bounds the rarer hang of a live peer that stopped answering.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# Workers wait for the next step on the control group for as long as the server idles (NCCL's watchdog would
# abort them after COLLECTIVE_TIMEOUT); a dead rank 0 still fails them at once by closing its sockets.
# A century: "forever" without overflowing gloo's deadline arithmetic.
CONTROL_TIMEOUT = timedelta(days=36500)


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def expert_parallel() -> bool:
    """MoE layers place whole experts on ranks (instead of splitting every expert's intermediate dim)."""
    return _expert_parallel and _size > 1


@contextmanager
def planned_layout(size: int, enable_expert_parallel: bool = False) -> Iterator[None]:
    """Layers built inside see rank 0 of `size` ranks without joining a group: the memory planner builds one
    rank's model on the meta device to count its bytes. Inside a real group the real layout stays."""
    global _rank, _size, _expert_parallel
    if dist.is_initialized():
        yield
        return
    saved = _rank, _size, _expert_parallel
    _rank, _size, _expert_parallel = 0, size, enable_expert_parallel
    try:
        yield
    finally:
        _rank, _size, _expert_parallel = saved


def init_tensor_parallel(
    rank: int, world_size: int, init_method: str, device: torch.device, enable_expert_parallel: bool = False
) -> None:
    """Join the model group (NCCL on GPU, gloo on CPU) and the gloo control group. init_method: "tcp://host:port",
    or "env://" under torchrun."""
    global _rank, _size, _expert_parallel, _control_group
    if dist.is_initialized():
        raise RuntimeError("This process already belongs to a tensor-parallel group: one engine per process "
                           "(shut the other down first).")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _rank, _size, _expert_parallel = rank, world_size, enable_expert_parallel


def destroy_tensor_parallel() -> None:
    global _rank, _size, _expert_parallel, _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _size, _expert_parallel, _control_group = 0, 1, False, None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (row-parallel outputs)."""
    if _size > 1:
        dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks, in place (e.g. the per-token amax of a row-parallel layer's input)."""
    if _size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Each rank's slice of the last dim, concatenated in rank order (vocab-parallel logits)."""
    if _size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's value (e.g. how many KV blocks each can hold). Host data, so reduced on the
    gloo control group: an NCCL group has no backend for CPU tensors."""
    if _size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_control_group)
    return int(t.item())


def broadcast_from_driver(obj: Any = None) -> Any:
    """Rank 0 (the driver, which owns the scheduler) sends `obj`, host data only (it is pickled); every rank
    returns it. Over the control group: workers block here between steps with no watchdog to abort them."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]
