"""Continuous batching with one token budget per step.

Running sequences are served first (decodes and unfinished prefill chunks), then waiting ones are admitted
FCFS while the budget, `max_num_seqs` and free KV blocks allow. When a running sequence needs a block and
none is free, the most recently admitted sequence is preempted and goes back to the front of the queue. By
default its KV blocks are swapped out: copied to host memory and freed, then copied back into new blocks when
it is resumed, so it continues on exactly the KV its own steps computed. When the swap space is full it is
recomputed instead: its blocks are freed and its tokens (all kept) prefilled again, in one pass whose batch
shape differs from the steps that first computed them, so in 16-bit dtypes rounding may change what greedy
decoding picks next.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from microscale.config import SchedulerConfig
from microscale.engine.block_manager import BlockManager, SwapPlan
from microscale.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so that a token is sampled after it."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_recomputed_preemptions = 0  # of those, recomputed because the swap space was full
        self.swaps = SwapPlan()  # the last schedule()'s block copies, for the step to make before its forward

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_forked(self, seqs: list[Sequence]) -> None:
        """Siblings of an n > 1 request jump the queue: they share their parent's prompt blocks."""
        self.waiting.extendleft(reversed(seqs))

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) requests: a request with any running sequence is running (n > 1 counts once)."""
        running = {id(seq.request) for seq in self.running}
        waiting = {id(seq.request) for seq in self.waiting} - running
        return len(running), len(waiting)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        self.swaps = SwapPlan()
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, n)
                scheduled.append(ScheduledChunk(seq, n))
                budget -= n
                i += 1
        # Admitting new work right after preempting would only thrash.
        if not preempted:
            self._admit_waiting(scheduled, budget)
        return scheduled

    def _admit_waiting(self, scheduled: list[ScheduledChunk], budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            fresh = seq.num_computed_tokens == 0
            cached = bm.find_cached_prefix(seq) if fresh else []
            start = len(cached) * bm.block_size if fresh else seq.num_computed_tokens
            n = min(seq.num_tokens - start, budget)
            if not bm.can_allocate(seq, n, cached):
                break
            self.waiting.popleft()
            if seq.host_blocks:
                self.swaps.into.extend(bm.swap_in(seq))
            bm.allocate(seq, n, cached)
            if fresh and seq.num_preemptions == 0:
                bm.record_prefix_lookup(seq.num_prompt_tokens, seq.num_computed_tokens)
                seq.request.num_cached_tokens = max(seq.request.num_cached_tokens, seq.num_computed_tokens)
            seq.status = SequenceStatus.RUNNING
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            scheduled.append(ScheduledChunk(seq, n))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        copies = self.block_manager.swap_out(seq)
        if copies is None:
            self.block_manager.free(seq)
            self.num_recomputed_preemptions += 1
            logger.info("swap space full: preempted sequence %d (%d tokens) will be recomputed", seq.seq_id,
                        seq.num_tokens)
        else:
            self.swaps.out.extend(copies)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a finished or aborted sequence and release its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
