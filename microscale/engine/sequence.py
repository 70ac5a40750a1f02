"""One request's state. A sequence is a token list plus how many of its tokens are in the KV cache;
prefill, chunked prefill, decode and recompute after preemption are all just that counter moving (a sequence
preempted by swapping keeps it)."""

from __future__ import annotations

import enum
import itertools
import time

import torch

from microscale.engine.detokenizer import IncrementalDetokenizer
from microscale.engine.sampler import SamplingRow
from microscale.engine.structured import RowMask
from microscale.outputs import CompletionOutput, Logprob, RequestOutput
from microscale.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    def __init__(
        self,
        request: Request,
        index: int,
        detokenizer: IncrementalDetokenizer | None,  # None: a prompt only scored, never detokenized
    ) -> None:
        self.seq_id = next(_seq_counter)
        self.request = request
        self.index = index
        self.params = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chained hashes of this sequence's full blocks that are registered in the prefix cache.
        self.block_hashes: list[bytes] = []
        # While preempted by swapping: the host swap-space blocks holding its computed tokens' KV, in order.
        self.host_blocks: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = detokenizer
        self.logprobs: list[dict[int, Logprob]] | None = [] if self.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None
        # With structured outputs: the grammar matcher (llguidance.LLMatcher) of this sequence's output so far.
        self.matcher = None
        if self.params.seed is not None:
            # Siblings of an n > 1 request draw different samples from one seed.
            self.generator = torch.Generator().manual_seed(self.params.seed + index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def sampling_row(self, allowed: RowMask | None = None) -> SamplingRow:
        """`allowed`: with structured outputs, this step's mask of the tokens the matcher allows."""
        return SamplingRow(self.params, self.token_ids, self.num_prompt_tokens, self.generator, allowed)

    def to_completion_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.visible_text(self.is_finished),
            token_ids=self.output_token_ids,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


class Request:
    """A user's request: one prompt, one SamplingParams, and `n` sequences sampled from it."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None  # left the waiting queue (end of queue time)
        self.first_token_time: float | None = None
        self.seqs: list[Sequence] = []
        # Siblings (n > 1) wait for the first sequence's prompt, then share its blocks.
        self.unforked: list[Sequence] = []
        self.num_cached_tokens = 0
        self.error: str | None = None  # set when the engine aborted it because a step failed on it alone

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def to_metrics(self) -> dict[str, float]:
        """Its timestamps so far (time.monotonic()): arrival, first scheduled, first token."""
        metrics = {"arrival_time": self.arrival_time}
        if self.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = self.first_scheduled_time
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        return metrics

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[seq.to_completion_output() for seq in self.seqs],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.to_metrics(),
        )
