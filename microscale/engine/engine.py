"""LLMEngine: requests in, one step at a time: schedule -> one forward -> sample -> update sequences."""

from __future__ import annotations

import logging
import time

import torch

from microscale.config import EngineArgs, SchedulerConfig
from microscale.engine.block_manager import BlockManager
from microscale.engine.calibration import calibrate, calibration_windows
from microscale.engine.detokenizer import IncrementalDetokenizer
from microscale.engine.executor import Executor
from microscale.engine.inputs import InputProcessor, PromptType
from microscale.engine.scheduler import ScheduledChunk, Scheduler
from microscale.engine.sequence import Request, Sequence
from microscale.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from microscale.outputs import Logprob, RequestOutput, SampleLogprobs
from microscale.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        torch.manual_seed(args.seed)
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Tokenizer, model config, generation defaults and prompt checks (shared with the server's front).
        self.inputs = inputs = InputProcessor(args)
        self.model_config = inputs.model_config
        self.tokenizer, self.eos_token_ids = inputs.tokenizer, inputs.eos_token_ids
        max_model_len = inputs.max_model_len
        self.scheduler_config = SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, max_model_len)
        self.executor = Executor(args, inputs, self.device)
        shard = self.executor.shard
        self.runner, self.dtype, self.quant = shard.runner, shard.dtype, shard.quant
        self.graph_capture_seconds = shard.graph_capture_seconds
        self.block_manager = BlockManager(shard.num_blocks, args.block_size, args.enable_prefix_caching,
                                          shard.num_host_blocks)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        if args.calib_config is not None:
            windows = calibration_windows(self.tokenizer, args.calib_config, max_model_len)
            shard.set_kv_amax(calibrate(self.runner.model, self.prompt_logits, windows))

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        params = params or self.inputs.default_sampling_params()
        text, ids = self.inputs.tokenize_prompt(prompt)
        self.inputs.validate_prompt(ids)
        request = Request(request_id, text, ids, params, arrival_time)
        request.seqs = [
            Sequence(request, i, IncrementalDetokenizer(
                self.tokenizer, ids, params.skip_special_tokens, params.stop_strings, params.include_stop_str_in_output
            ))
            for i in range(params.n)
        ]
        request.unforked = request.seqs[1:]
        self.scheduler.add(request.seqs[0])
        self.requests[request_id] = request
        self.num_prompt_tokens += len(ids)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        """Finish the request's running sequences with "abort" (freeing their blocks); None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        request.unforked = []
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one token sequence, [len(token_ids), vocab] float32 on the engine's
        device (row i predicts token i + 1), for scoring and perplexity. Runs the engine's own prefill path in
        chunks of max_num_batched_tokens, on KV blocks borrowed for the call (nothing enters the prefix cache)."""
        ids = list(token_ids)
        self.inputs.validate_prompt(ids, room_to_generate=False)
        request = Request("prompt-logits", None, ids, SamplingParams(max_tokens=1))
        seq = Sequence(request, 0, IncrementalDetokenizer(self.tokenizer, ids))
        if not self.block_manager.can_allocate(seq, len(ids)):
            raise ValueError(f"The KV cache has no room for {len(ids)} tokens now.")
        rows: list[torch.Tensor] = []
        try:
            while seq.num_computed_tokens < len(ids):
                n = min(len(ids) - seq.num_computed_tokens, self.scheduler_config.max_num_batched_tokens)
                self.block_manager.allocate(seq, n)
                rows.append(self.executor.execute_all_logits([ScheduledChunk(seq, n)]).float())
                seq.num_computed_tokens += n
        finally:
            self.block_manager.free(seq)
        return torch.cat(rows)

    def prompt_logprobs(self, token_ids: list[int], top_n: int) -> SampleLogprobs:
        """Per prompt token after the first (which has none): its logprob, rank and the top_n, in the shape of
        generated tokens' logprobs (OpenAI's echo + logprobs; lm-eval's loglikelihood tasks read them)."""
        logprobs = torch.log_softmax(self.prompt_logits(token_ids)[:-1], dim=-1)
        targets = torch.tensor(token_ids[1:], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        ranks = ((logprobs > chosen[:, None]).sum(dim=1) + 1).tolist()
        top, top_ids = logprobs.topk(max(top_n, 1), dim=-1)
        chosen, top, top_ids = chosen.tolist(), top[:, :top_n].tolist(), top_ids[:, :top_n].tolist()
        decode = self.tokenizer.decode
        entries = []
        for row, token in enumerate(token_ids[1:]):
            entry = {token: Logprob(chosen[row], ranks[row], decode([token]))}
            for rank, (tid, lp) in enumerate(zip(top_ids[row], top[row]), 1):
                entry.setdefault(tid, Logprob(lp, rank, decode([tid])))
            entries.append(entry)
        return entries

    # ---- the step -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        return [request.to_output() for request in self.step_requests()]

    @torch.inference_mode()
    def step_requests(self) -> list[Request]:
        """One step; the requests that got a token in it (finished ones are no longer in self.requests)."""
        preemptions_before = self.scheduler.num_preemptions
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.scheduler.swaps:  # every running sequence was swapped out: copy before blocks are reused
                self.executor.execute([], self.scheduler.swaps)
            if self.scheduler.num_unfinished and self.scheduler.num_preemptions == preemptions_before:
                # Nothing fits although requests wait: stepping again would spin forever.
                raise RuntimeError(
                    f"No request fits in the KV cache ({self.block_manager.num_free_blocks} free blocks); "
                    "raise kv_cache_memory or lower max_model_len / max_num_seqs."
                )
            return []
        logits, sampling = self.executor.execute(chunks, self.scheduler.swaps)
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_full_blocks(chunk.seq)
        if not sampling:
            return []
        touched: dict[str, Request] = {}
        out, seqs = self._sample(logits, [c.seq for c in sampling], touched)
        if out is None:
            return list(touched.values())
        token_ids = out.token_ids.tolist()  # the step's one device -> host sync
        logprobs = _logprobs_to_host(out)
        now = time.monotonic()
        for row, seq in enumerate(seqs):
            request = seq.request
            if request.error is not None:  # a sibling failed earlier in this loop
                continue
            touched[request.request_id] = request
            try:
                self._append_token(seq, token_ids[row], logprobs, row, now)
            except Exception as e:  # this request's detokenizer, logprobs or stop checks: only it ends
                self._fail(request, e)
                continue
            self.num_generated_tokens += 1
        for request in touched.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
        return list(touched.values())

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], touched: dict[str, Request]
    ) -> tuple[SamplerOutput | None, list[Sequence]]:
        """Sample one token per row. Should that raise, each row is tried alone: those that fail alone are a bad
        request's (say, a parameter its sampling tensor cannot hold), so their requests are aborted (and added to
        touched) and the others sampled again. Only when no row fails alone is the error the engine's own."""
        try:
            return self._sample_rows(logits, seqs), seqs
        except Exception as e:
            bad = [row for row, seq in enumerate(seqs) if not self._samples_alone(logits[row : row + 1], seq)]
            if not bad:
                raise
            for row in bad:
                request = seqs[row].request
                if request.error is None:
                    self._fail(request, e)
                    touched[request.request_id] = request
        keep = [row for row, seq in enumerate(seqs) if seq.request.error is None]
        if not keep:
            return None, []
        return self._sample_rows(logits[keep], [seqs[row] for row in keep]), [seqs[row] for row in keep]

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sampler(logits, SamplingBatch.build(seqs, self.eos_token_ids, self.model_config.vocab_size,
                                                        self.device))

    def _samples_alone(self, logits: torch.Tensor, seq: Sequence) -> bool:
        try:
            self._sample_rows(logits, [seq])
        except Exception:
            return False
        return True

    def _fail(self, request: Request, error: Exception) -> None:
        """Abort a request that a step failed on; its error goes to its client, the other requests go on."""
        logger.error("request %s failed in a step; aborting it", request.request_id, exc_info=error)
        request.error = type(error).__name__
        self.abort_request(request.request_id)

    def _append_token(self, seq: Sequence, token: int, logprobs: dict | None, row: int, now: float) -> None:
        seq.token_ids.append(token)
        request = seq.request
        if request.first_token_time is None:
            request.first_token_time = now
        if seq.logprobs is not None:
            seq.logprobs.append(self._token_logprobs(seq, token, logprobs, row))
            seq.cumulative_logprob += logprobs["chosen"][row]
        if request.unforked and seq.index == 0:
            self._fork(seq, request.unforked)
            request.unforked = []
        past_min = seq.num_output_tokens >= seq.params.min_tokens
        stop_string = seq.detokenizer.add_token(token, check_stop=past_min)
        reason = self._finish_reason(seq, token, stop_string, past_min)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _fork(self, parent: Sequence, siblings: list[Sequence]) -> None:
        shared_blocks = (parent.num_prompt_tokens - 1) // self.block_manager.block_size
        for sibling in siblings:
            self.block_manager.fork(parent, sibling, shared_blocks)
        self.scheduler.add_forked(siblings)

    def _token_logprobs(self, seq: Sequence, token: int, logprobs: dict, row: int) -> dict[int, Logprob]:
        decode = self.tokenizer.decode
        entry = {token: Logprob(logprobs["chosen"][row], logprobs["rank"][row], decode([token]))}
        top_n = seq.params.logprobs
        for rank, (tid, lp) in enumerate(zip(logprobs["top_ids"][row][:top_n], logprobs["top"][row][:top_n]), 1):
            entry.setdefault(tid, Logprob(lp, rank, decode([tid])))
        return entry

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
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.scheduler_config.max_model_len:
            return "length"
        return None

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave their group (nothing to do on one device)."""
        self.executor.shutdown()

    def get_stats(self) -> dict[str, float]:
        bm = self.block_manager
        running, waiting = self.scheduler.num_requests()
        return {
            "num_requests_running": running,
            "num_requests_waiting": waiting,
            "kv_cache_blocks_total": bm.num_blocks,
            "kv_cache_blocks_free": bm.num_free_blocks,
            "kv_cache_usage": 1 - bm.num_free_blocks / bm.num_blocks,
            "prefix_cache_queries": bm.stats.queries,
            "prefix_cache_hits": bm.stats.hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generated_tokens,
        }


def _logprobs_to_host(out: SamplerOutput) -> dict[str, list] | None:
    if out.chosen_logprobs is None:
        return None
    return {
        "chosen": out.chosen_logprobs.tolist(),
        "rank": out.chosen_ranks.tolist(),
        "top": out.top_logprobs.tolist(),
        "top_ids": out.top_ids.tolist(),
    }
