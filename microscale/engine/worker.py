"""A tensor-parallel rank other than 0: it builds the same shard as rank 0 (so their collectives line up),
then runs every step rank 0 broadcasts, on its own device, until rank 0 says shut down. Spawned by rank 0's
executor on one machine; under torchrun the CLI runs it on every rank but 0."""

from __future__ import annotations

import logging
import os
import signal

import torch

from microscale.config import EngineArgs
from microscale.distributed.launch import share_cpus
from microscale.distributed.parallel_state import broadcast_from_driver, destroy_tensor_parallel, init_tensor_parallel
from microscale.engine.inputs import InputProcessor
from microscale.engine.shard import build_shard


def run_worker(
    args: EngineArgs, rank: int, world_size: int, init_method: str = "env://", log_level: int | None = None
) -> None:
    """Join the group as `rank`, build the shard, then run every step rank 0 broadcasts (None: shut down)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; rank 0 decides
    if log_level is not None:  # spawned: as quiet as the process that started it
        logging.getLogger("microscale").setLevel(log_level)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    init_tensor_parallel(rank, world_size, init_method, device, args.enable_expert_parallel)
    share_cpus(world_size, device, args.threads)
    runner = build_shard(args, InputProcessor(args), device).runner
    while (step := broadcast_from_driver()) is not None:
        runner.forward_logits(step)  # the logits are rank 0's to sample
    destroy_tensor_parallel()
