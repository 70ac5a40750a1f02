"""Launch helpers for a tensor-parallel engine: whether torchrun started this process, how the ranks of one
machine share its CPU, and a free loopback port for rendezvous. Starting the ranks and running them is the
engine's (engine/executor.py, engine/worker.py)."""

from __future__ import annotations

import os
import socket

import torch


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process, else None."""
    if all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def share_cpus(world_size: int, device: torch.device, threads: int | None = None) -> None:
    """On a CPU the ranks split `threads` (EngineArgs.threads; None: the machine's cores) between them; a single
    rank without `threads` keeps torch's default."""
    if device.type == "cpu" and (threads is not None or world_size > 1):
        torch.set_num_threads(max(1, (threads or os.cpu_count() or 1) // world_size))


def free_port() -> int:
    """A TCP port free on loopback right now (for rendezvous and test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
