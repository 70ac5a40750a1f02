"""The other ranks of a tensor-parallel engine. Rank 0 is the engine's own process: it owns the scheduler and
the block manager, and before each forward broadcasts the step's inputs (host data, over the gloo control
group). Ranks 1..N-1 are workers: they build the same shard-shaped model and KV cache, then run every forward
rank 0 sends, on their own device. On one machine they are spawned here (torch.multiprocessing, tcp://
rendezvous on loopback); across machines torchrun starts every rank (env:// rendezvous) and ranks other than 0
run `run_worker` (see the CLI)."""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing as mp

from microscale.config import EngineArgs, ModelConfig
from microscale.distributed.checks import check_tensor_parallel
from microscale.distributed.parallel_state import broadcast_from_driver, destroy_tensor_parallel, init_tensor_parallel

if TYPE_CHECKING:
    from microscale.engine.model_runner import StepInputs

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 10.0


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process, else None."""
    if all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


class Workers:
    """Rank 0's handle on the other ranks."""

    def __init__(self, processes: list[mp.Process], world_size: int) -> None:
        self.processes = processes  # empty under torchrun: the ranks are not ours to watch
        self.world_size = world_size

    def send(self, step: StepInputs) -> None:
        try:
            broadcast_from_driver(step)
        except RuntimeError as e:
            raise self.failure(e) from e

    def failure(self, error: BaseException) -> RuntimeError:
        """What to tell the user when a collective failed: which worker died, if we can see it."""
        dead = []
        for rank, process in enumerate(self.processes, 1):
            process.join(0.5 if process.is_alive() else 0)
            if not process.is_alive():
                dead.append(f"rank {rank} exited with code {process.exitcode}")
        if dead:
            return RuntimeError(f"A tensor-parallel worker died ({', '.join(dead)}); the engine cannot go on.")
        return RuntimeError(f"A tensor-parallel collective failed (a peer died or stopped answering): {error}")

    def shutdown(self) -> None:
        if all(p.is_alive() for p in self.processes):
            try:
                broadcast_from_driver(None)  # ends the workers' loop
            except RuntimeError:
                pass  # a worker is gone already
        for process in self.processes:
            process.join(_JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        destroy_tensor_parallel()


def start_tensor_parallel(args: EngineArgs, cfg: ModelConfig, device: torch.device) -> Workers | None:
    """Check the split, start ranks 1..N-1 (unless torchrun did) and join the group as rank 0; None for N=1."""
    check_tensor_parallel(cfg, args)
    n = args.tensor_parallel_size
    if n == 1:
        return None
    launched = torchrun_rank()
    if launched is not None:
        rank, world = launched
        if world != n or rank != 0:
            raise ValueError(f"torchrun started rank {rank} of {world}, but this engine is rank 0 of "
                             f"tensor_parallel_size={n}.")
        init_tensor_parallel(0, n, "env://", device, args.enable_expert_parallel)
        _share_cpus(n, device)
        return Workers([], n)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    log_level = logging.getLogger("microscale").getEffectiveLevel()
    processes = [ctx.Process(target=run_worker, args=(args, rank, n, init_method, log_level),
                             name=f"microscale-tp{rank}", daemon=True) for rank in range(1, n)]
    for process in processes:
        process.start()
    workers = Workers(processes, n)
    try:
        init_tensor_parallel(0, n, init_method, device, args.enable_expert_parallel)
    except BaseException:
        workers.shutdown()
        raise
    _share_cpus(n, device)
    logger.info("tensor parallel: %d ranks (%s)", n, "gloo" if device.type != "cuda" else "nccl")
    return workers


def run_worker(
    args: EngineArgs, rank: int, world_size: int, init_method: str = "env://", log_level: int | None = None
) -> None:
    """A worker rank: build the shard, then run every forward rank 0 broadcasts until it says shut down."""
    from microscale.engine.inputs import InputProcessor
    from microscale.engine.shard import build_shard

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; rank 0 decides
    if log_level is not None:  # spawned: as quiet as the process that started it
        logging.getLogger("microscale").setLevel(log_level)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    init_tensor_parallel(rank, world_size, init_method, device, args.enable_expert_parallel)
    _share_cpus(world_size, device)
    runner = build_shard(args, InputProcessor(args), device).runner
    while (step := broadcast_from_driver()) is not None:  # None: rank 0 shuts down
        runner.forward_logits(step)
    destroy_tensor_parallel()


def _share_cpus(world_size: int, device: torch.device) -> None:
    """On a CPU the ranks split its cores (one CPU share each)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def free_port() -> int:
    """A TCP port free on loopback right now (for rendezvous and test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
