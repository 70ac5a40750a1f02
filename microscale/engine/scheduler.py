"""Continuous batching with one token budget per step.

Running sequences are served first (decodes and unfinished prefill chunks), then waiting ones are admitted
FCFS while the budget, `max_num_seqs` and free KV blocks allow. When a running sequence needs a block and
none is free, the most recently admitted sequence is preempted and goes back to the front of the queue. By
default its KV blocks are swapped out: copied to host memory and freed, then copied back into new blocks when
it is resumed, so it continues on exactly the KV its own steps computed. When the swap space is full it is
recomputed instead: its blocks are freed and its tokens (all kept) prefilled again, in one pass whose batch
shape differs from the steps that first computed them, so in 16-bit dtypes rounding may change what greedy
decoding picks next.

After the step's forward, update_from_output() does the step's bookkeeping: the scheduled tokens become
computed (full blocks enter the prefix cache), each sampled sequence gets its token (and logprobs), siblings of
an n > 1 request fork off their parent once its prompt is done, and finished sequences release their blocks.
The scheduler is the only writer of that state and the only caller of the block manager.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from microscale.config import SchedulerConfig, SpeculativeConfig
from microscale.engine.block_manager import BlockManager, SwapPlan
from microscale.engine.detokenizer import Decoder
from microscale.engine.logprobs import logprob_entry
from microscale.engine.sampler import SampledTokens, TokenLogprobs, VerifiedTokens
from microscale.engine.sequence import Request, Sequence, SequenceStatus
from microscale.engine.spec_decode.ngram import NgramProposer
from microscale.engine.spec_decode.proposer import Proposer
from microscale.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class GrammarError(RuntimeError):
    """A sequence's structured-outputs matcher could not follow its output."""


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (drafts included)
    # Speculative decoding: tokens proposed after the sequence's last one, verified by this step's forward, and
    # the draft model's distributions they were drawn from ([len(draft_token_ids), vocab]; None: n-gram's).
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so that a token is sampled after it."""
        return self.seq.num_computed_tokens + self.num_tokens - len(self.draft_token_ids) == self.seq.num_tokens

    def input_ids(self) -> list[int]:
        start = self.seq.num_computed_tokens
        return self.seq.token_ids[start : start + self.num_tokens - len(self.draft_token_ids)] + self.draft_token_ids


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: list[int], tokenizer: Decoder,
        speculative: SpeculativeConfig | None = None, proposer: Proposer | None = None,
    ) -> None:
        """speculative: when set, `proposer` proposes the drafts (n-gram's is built here when none is given)."""
        self.config = config
        self.speculative = speculative
        if speculative is not None and proposer is None:
            proposer = NgramProposer(speculative.prompt_lookup_min, speculative.prompt_lookup_max,
                                     speculative.num_speculative_tokens)
        self.proposer = proposer
        self.num_drafts = 0  # verifications (a sequence's drafts in one step)
        self.num_draft_tokens = 0  # tokens proposed and verified
        self.num_accepted_tokens = 0  # of those, accepted
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.tokenizer = tokenizer  # for the text of logprob entries
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_recomputed_preemptions = 0  # of those, recomputed because the swap space was full
        self.swaps = SwapPlan()  # the last schedule()'s block copies, for the step to make before its forward
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Its first sequence queues; siblings (n > 1) wait for its prompt, then share its blocks."""
        request.unforked = request.seqs[1:]
        self.add(request.seqs[0])
        self.num_prompt_tokens += len(request.prompt_token_ids)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_forked(self, seqs: list[Sequence]) -> None:
        """Siblings of an n > 1 request jump the queue: they share their parent's prompt blocks."""
        self.waiting.extendleft(reversed(seqs))

    def abort(self, request: Request) -> None:
        """Finish the request's unfinished sequences with "abort", freeing their blocks."""
        for seq in request.seqs:
            if not seq.is_finished:
                self.finish(seq, "abort")
        request.unforked = []

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a finished or aborted sequence and release its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self.proposer is not None:
            self.proposer.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) requests: a request with any running sequence is running (n > 1 counts once)."""
        running = {id(seq.request) for seq in self.running}
        waiting = {id(seq.request) for seq in self.waiting} - running
        return len(running), len(waiting)

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    def get_stats(self) -> dict[str, float]:
        bm = self.block_manager
        running, waiting = self.num_requests()
        return {
            "num_requests_running": running,
            "num_requests_waiting": waiting,
            "kv_cache_blocks_total": bm.num_blocks,
            "kv_cache_blocks_free": bm.num_free_blocks,
            "kv_cache_usage": 1 - bm.num_free_blocks / bm.num_blocks,
            "prefix_cache_queries": bm.stats.queries,
            "prefix_cache_hits": bm.stats.hits,
            "num_preemptions": self.num_preemptions,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generated_tokens,
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
        }

    # ---- before the forward ---------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledChunk]:
        """The step's chunks (its block copies in self.swaps). Empty with work left only after a preemption:
        were nothing preempted, stepping again would spin forever, so that raises."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        self.swaps = SwapPlan()
        preempted = False
        drafts = self._drafts()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            draft, probs = drafts.get(seq.seq_id, ([], None))
            if draft and (budget < 1 + len(draft) or not self.block_manager.can_allocate(seq, 1 + len(draft))):
                draft = []  # no room to verify them: decode as usual (drafts never preempt anyone)
            if draft:
                self.block_manager.allocate(seq, 1 + len(draft))
                scheduled.append(ScheduledChunk(seq, 1 + len(draft), draft, probs))
                budget -= 1 + len(draft)
                i += 1
                continue
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
            if not scheduled and self.num_unfinished:
                raise RuntimeError(
                    f"No request fits in the KV cache ({self.block_manager.num_free_blocks} free blocks); "
                    "raise kv_cache_memory or lower max_model_len / max_num_seqs."
                )
        return scheduled

    def _drafts(self) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """Speculative decoding: proposals for the running sequences that decode one token this step, each no
        longer than what the sequence may still emit, with the draft model's distributions (None: n-gram's).
        None while more than disable_by_batch_size requests run, and none for sequences whose grammar has not
        seen them (they decode as usual)."""
        spec = self.speculative
        if spec is None or (spec.disable_by_batch_size is not None and self.num_requests()[0] >
                            spec.disable_by_batch_size):
            return {}
        eligible, limits = [], []
        for seq in self.running:
            if seq.num_tokens - seq.num_computed_tokens != 1 or seq.matcher is not None or \
                    not seq.params.speculative_decoding:
                continue
            room = self.config.max_model_len - seq.num_tokens - 1  # the token after the drafts must fit too
            if seq.params.max_tokens is not None:
                room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
            if room > 0:
                eligible.append(seq)
                limits.append(room)
        if not eligible:
            return {}
        proposals = self.proposer.propose(eligible, limits)
        drafts = {}
        for i, (seq, proposed) in enumerate(zip(eligible, proposals.token_ids, strict=True)):
            if proposed:
                probs = None if proposals.probs is None else proposals.probs[i, : len(proposed)]
                drafts[seq.seq_id] = (proposed, probs)
        return drafts

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
            seq.num_computed_tokens += bm.allocate(seq, n, cached)
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
            self._release(seq)
            self.num_recomputed_preemptions += 1
            logger.info("swap space full: preempted sequence %d (%d tokens) will be recomputed", seq.seq_id,
                        seq.num_tokens)
        else:
            self.swaps.out.extend(copies)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        """Its blocks (and swap space) go back: none of its tokens is computed any more."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0

    def score_prompt(self, token_ids: list[int], forward: Callable[[ScheduledChunk], T]) -> list[T]:
        """`forward` over a prompt in chunks of at most max_num_batched_tokens, in order, outside the step loop:
        on KV blocks borrowed for the call and released at its end (nothing enters the prefix cache)."""
        seq = Sequence(Request("prompt-logits", None, token_ids, SamplingParams(max_tokens=1)), 0, None)
        if not self.block_manager.can_allocate(seq, seq.num_tokens):
            raise ValueError(f"The KV cache has no room for {seq.num_tokens} tokens now.")
        results = []
        try:
            while seq.num_computed_tokens < seq.num_tokens:
                n = min(seq.num_tokens - seq.num_computed_tokens, self.config.max_num_batched_tokens)
                self.block_manager.allocate(seq, n)
                results.append(forward(ScheduledChunk(seq, n)))
                seq.num_computed_tokens += n
        finally:
            self._release(seq)
        return results

    # ---- after the forward ----------------------------------------------------------------------------

    def update_from_output(
        self, chunks: list[ScheduledChunk], sampled: list[Sequence], tokens: SampledTokens,
        verified: dict[int, VerifiedTokens] | None = None,
    ) -> list[Request]:
        """The step's bookkeeping once its forward ran: every chunk's tokens are computed, and the sequences that
        sampled (`sampled`, in the rows of `tokens`) get their tokens; a speculating one (its row in `verified`)
        gets its accepted drafts and one more token. A request a row failed on, or that fails taking its token
        (its detokenizer, say), is aborted with its error; the others go on. Returns the requests that got a
        token or failed, each once."""
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens - len(chunk.draft_token_ids)
            self.block_manager.cache_full_blocks(chunk.seq)
        touched: dict[str, Request] = {}
        for row, error in tokens.failed.items():
            request = sampled[row].request
            if request.error is None:
                self._fail(request, error)
                touched[request.request_id] = request
        now = time.monotonic()
        emitted = [(row, VerifiedTokens([token], [tokens.logprobs(i)]))
                   for i, (row, token) in enumerate(zip(tokens.rows, tokens.token_ids, strict=True))]
        emitted += (verified or {}).items()
        for row, step in emitted:
            seq = sampled[row]
            request = seq.request
            if request.error is not None:  # a sibling failed
                continue
            touched[request.request_id] = request
            try:
                for k, token in enumerate(step.token_ids):
                    self._append_token(seq, token, now, None if step.logprobs is None else step.logprobs[k])
                    self.num_generated_tokens += 1
                    if seq.is_finished:
                        break
            except Exception as e:  # this request's detokenizer, logprobs or stop checks: only it ends
                self._fail(request, e)
                continue
            if step.num_drafts:
                self._accept_drafts(seq, step.num_drafts, len(step.token_ids) - 1)
        return list(touched.values())

    def _accept_drafts(self, seq: Sequence, num_drafts: int, accepted: int) -> None:
        """The accepted drafts' KV is computed (the rejected ones' lies past the computed tokens, to be
        overwritten); the blocks allocated for rejected ones go back."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += accepted
        if seq.is_finished:
            return
        seq.num_computed_tokens += accepted
        self.block_manager.cache_full_blocks(seq)
        self.block_manager.trim(seq)

    def _fail(self, request: Request, error: Exception) -> None:
        """Abort a request that a step failed on; its error goes to its client, the other requests go on."""
        logger.error("request %s failed in a step; aborting it", request.request_id, exc_info=error)
        request.error = type(error).__name__
        self.abort(request)

    def _append_token(self, seq: Sequence, token: int, now: float, logprobs: TokenLogprobs | None) -> None:
        seq.token_ids.append(token)
        request = seq.request
        if request.first_token_time is None:
            request.first_token_time = now
        if seq.logprobs is not None:
            chosen, rank, top_ids, top_logprobs = logprobs
            top_n = seq.params.logprobs
            seq.logprobs.append(logprob_entry(self.tokenizer.decode, token, chosen, rank, top_ids[:top_n],
                                              top_logprobs[:top_n]))
            seq.cumulative_logprob += chosen
        if request.unforked and seq.index == 0:
            self._fork(seq, request.unforked)
            request.unforked = []
        past_min = seq.num_output_tokens >= seq.params.min_tokens
        stop_string = seq.detokenizer.add_token(token, check_stop=past_min)
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
            if seq.matcher.is_error():  # e.g. its parser ran out of budget: the request fails, it does not "stop"
                raise GrammarError(f"structured outputs: the grammar matcher failed: {seq.matcher.get_error()}")
        reason = self._finish_reason(seq, token, stop_string, past_min)
        if reason is not None:
            self.finish(seq, reason)

    def _fork(self, parent: Sequence, siblings: list[Sequence]) -> None:
        """Siblings share the parent's full prompt blocks; each computes the rest of its prompt itself."""
        shared_blocks = (parent.num_prompt_tokens - 1) // self.block_manager.block_size
        for sibling in siblings:
            sibling.num_computed_tokens = self.block_manager.fork(parent, sibling, shared_blocks)
        self.add_forked(siblings)

    def _finish_reason(self, seq: Sequence, token: int, stop_string: str | None, past_min: bool) -> str | None:
        params = seq.params
        if past_min:
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop"
            if token in params.stop_token_ids:
                seq.stop_reason = token
                return "stop"
            if stop_string is not None:
                seq.stop_reason = stop_string
                return "stop"
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar's language ends here
            return "stop"
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None
