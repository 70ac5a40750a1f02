"""Rank 0's handle on every rank of the engine. Rank 0 is the engine's own process: it owns the scheduler and
the block manager, and before each forward broadcasts the step's inputs (host data, over the gloo control
group); ranks 1..N-1 run the same forward on their shards (engine/worker.py). On one machine they are spawned
here (torch.multiprocessing, tcp:// rendezvous on loopback); across machines torchrun starts every rank
(env:// rendezvous) and the CLI runs the worker on every rank but 0."""

from __future__ import annotations

import logging

import torch
import torch.multiprocessing as mp

from microscale.config import EngineArgs
from microscale.distributed.launch import free_port, share_cpus, torchrun_rank
from microscale.distributed.parallel_state import broadcast_from_driver, destroy_tensor_parallel, init_tensor_parallel
from microscale.engine.block_manager import SwapPlan
from microscale.engine.inputs import InputProcessor
from microscale.engine.model_runner import StepInputs
from microscale.engine.scheduler import ScheduledChunk
from microscale.engine.shard import EngineShard, build_shard
from microscale.engine.split_checks import check_tensor_parallel
from microscale.engine.worker import run_worker

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 10.0


class Executor:
    """Starts the other ranks (tensor parallelism) and builds rank 0's shard; then runs each step on every rank
    and, when a collective fails, says which rank died."""

    def __init__(self, args: EngineArgs, inputs: InputProcessor, device: torch.device) -> None:
        check_tensor_parallel(inputs.model_config, args)  # before any process starts
        self.world_size = args.tensor_parallel_size
        self.processes: list[mp.Process] = []  # empty under torchrun: the ranks are not ours to watch
        if self.world_size > 1:
            self._start_ranks(args, device)  # they join the group before any shard is built
        else:
            share_cpus(1, device, args.threads)
        try:
            self.shard: EngineShard = build_shard(args, inputs, device)
        except BaseException:
            self.shutdown()
            raise
        self.runner = self.shard.runner

    def _start_ranks(self, args: EngineArgs, device: torch.device) -> None:
        n = self.world_size
        launched = torchrun_rank()
        if launched is not None:
            rank, world = launched
            if world != n or rank != 0:
                raise ValueError(f"torchrun started rank {rank} of {world}, but this engine is rank 0 of "
                                 f"tensor_parallel_size={n}.")
            init_tensor_parallel(0, n, "env://", device, args.enable_expert_parallel)
            share_cpus(n, device, args.threads)
            return
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
        log_level = logging.getLogger("microscale").getEffectiveLevel()
        self.processes = [ctx.Process(target=run_worker, args=(args, rank, n, init_method, log_level),
                                      name=f"microscale-tp{rank}", daemon=True) for rank in range(1, n)]
        for process in self.processes:
            process.start()
        try:
            init_tensor_parallel(0, n, init_method, device, args.enable_expert_parallel)
        except BaseException:
            self.shutdown()
            raise
        share_cpus(n, device, args.threads)
        logger.info("tensor parallel: %d ranks (%s)", n, "gloo" if device.type != "cuda" else "nccl")

    def execute(
        self, chunks: list[ScheduledChunk], swaps: SwapPlan | None = None
    ) -> tuple[torch.Tensor | None, list[ScheduledChunk]]:
        """Run one step (its block copies first); returns the logits of the sampling chunks (None for a step of
        copies only), and those chunks in the same order."""
        step, sampling = self.runner.prepare(chunks, swaps)
        return self.run(step), sampling

    def execute_all_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; returns the logits of every token of the flat batch (decodes first, then prefill
        chunks), e.g. to score a prompt."""
        step, _ = self.runner.prepare(chunks)
        step.rows = None
        return self.run(step)

    def run(self, step: StepInputs) -> torch.Tensor | None:
        """Every rank runs `step`: the others are sent it first, then rank 0 runs its forward from the very
        message it sent. Returns rank 0's logits (the workers discard theirs)."""
        try:
            self.send(step)
            return self.runner.forward_logits(step)
        except RuntimeError as e:
            if self.world_size == 1:
                raise
            raise self.failure(e) from e  # a collective failed: say which rank died

    def send(self, step: StepInputs) -> None:
        """Broadcast the step to the other ranks (nothing to do on one)."""
        if self.world_size > 1:
            broadcast_from_driver(step)

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
        """Stop the other ranks and leave their group (nothing to do on one device, or a second time)."""
        if self.world_size == 1:
            return
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
        self.world_size = 1  # from here on this process is alone
