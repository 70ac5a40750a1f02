"""LLMEngine: requests in, one step at a time: schedule -> one forward -> sample -> update sequences. The
scheduler does every step's bookkeeping; the engine composes it with the executor (all ranks' forward) and the
sampler."""

from __future__ import annotations

import logging
import time

import torch

from microscale.config import EngineArgs, SchedulerConfig
from microscale.distributed.parallel_state import expert_parallel, tp_size
from microscale.engine.block_manager import BlockManager
from microscale.engine.calibration import calibrate, calibration_windows
from microscale.engine.detokenizer import IncrementalDetokenizer
from microscale.engine.device_peaks import device_peaks
from microscale.engine.executor import Executor
from microscale.engine.inputs import InputProcessor, PromptType
from microscale.engine.logprobs import prompt_logprobs
from microscale.engine.roofline import RooflineModel, RooflineTotals, StepRoofline
from microscale.engine.sampler import Sampler
from microscale.engine.scheduler import Scheduler
from microscale.engine.sequence import Request, Sequence
from microscale.engine.spec_decode.draft_model import DraftModelProposer
from microscale.engine.spec_decode.verify_step import sample_step
from microscale.engine.structured import GrammarCompiler, StepMasks
from microscale.outputs import RequestOutput, SampleLogprobs
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
        speculative = None if args.speculative_config is None else args.speculative_config.for_device(self.device.type)
        if speculative is not None:
            logger.info("speculative decoding: %s, k = %d, off while more than %d requests run", speculative.method,
                        speculative.num_speculative_tokens, speculative.disable_by_batch_size)
        proposer = None
        if shard.draft_runner is not None:
            proposer = DraftModelProposer(shard.draft_runner, shard.num_blocks, args.block_size,
                                          args.speculative_config.num_speculative_tokens, self.eos_token_ids,
                                          self.model_config.vocab_size, args.max_num_batched_tokens)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager, self.eos_token_ids, self.tokenizer,
                                   speculative, proposer)
        self.sampler = Sampler()
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                        args.structured_outputs_max_compile_ms)
        self.requests: dict[str, Request] = {}
        self.last_step_tokens = 0  # tokens the last step's forward computed (the server's iteration-tokens metric)
        if args.calib_config is not None:
            windows = calibration_windows(self.tokenizer, args.calib_config, max_model_len)
            shard.set_kv_amax(calibrate(self.runner.model, self.prompt_logits, windows))
        self.compile_seconds = shard.compile_forwards(args.enforce_eager)
        # Every step's bytes and FLOPs against the device's peaks (after calibration: static KV scales shrink it).
        self.roofline = RooflineModel.of(self.runner.model, self.model_config, self.dtype,
                                         [cache.bytes_per_token() for cache in self.runner.kv_caches], tp_size(),
                                         expert_parallel())
        self.peaks = device_peaks(self.device)
        self.roofline_totals = RooflineTotals()
        self.last_step_roofline: StepRoofline | None = None

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
        if params.structured_outputs is not None:
            for seq, matcher in zip(request.seqs, self.grammars.matchers(params.structured_outputs, params.n)):
                seq.matcher = matcher
        self.scheduler.add_request(request)
        self.requests[request_id] = request
        return request

    def abort_request(self, request_id: str) -> Request | None:
        """Finish the request's running sequences with "abort" (freeing their blocks); None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one token sequence, [len(token_ids), vocab] float32 on the engine's
        device (row i predicts token i + 1), for scoring and perplexity. Runs the engine's own prefill path in
        chunks of max_num_batched_tokens, on KV blocks borrowed for the call (nothing enters the prefix cache)."""
        ids = list(token_ids)
        self.inputs.validate_prompt(ids, room_to_generate=False)
        return torch.cat(self.scheduler.score_prompt(ids, lambda c: self.executor.execute_all_logits([c]).float()))

    def prompt_logprobs(self, token_ids: list[int], top_n: int) -> SampleLogprobs:
        """Per prompt token after the first (which has none): its logprob, rank and the top_n, in the shape of
        generated tokens' logprobs (OpenAI's echo + logprobs; lm-eval's loglikelihood tasks read them)."""
        return prompt_logprobs(self.prompt_logits(token_ids), token_ids, top_n, self.tokenizer.decode)

    # ---- the step -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        return [request.to_output() for request in self.step_requests()]

    @torch.inference_mode()
    def step_requests(self) -> list[Request]:
        """One step; the requests that got a token in it (finished ones are no longer in self.requests)."""
        started = time.perf_counter()
        self.last_step_roofline = None  # a step without a forward has no cost
        chunks = self.scheduler.schedule()
        self.last_step_tokens = sum(chunk.num_tokens for chunk in chunks)
        if not chunks:
            if self.scheduler.swaps:  # every running sequence was swapped out: copy before blocks are reused
                self.executor.execute([], self.scheduler.swaps)
            return []
        # The constrained rows' masks are filled while the forward runs: their matchers already consumed the
        # previous step's tokens, and move again only once this step's are sampled.
        constrained = [c.seq for c in chunks if c.samples and c.seq.matcher is not None]
        masks = StepMasks([seq.matcher for seq in constrained], self.model_config.vocab_size)
        mask_of = {seq: masks.row(i) for i, seq in enumerate(constrained)}
        logits, sampling = self.executor.execute(chunks, self.scheduler.swaps)
        seqs = [chunk.seq for chunk in sampling]
        rows = [seq.sampling_row(mask_of.get(seq)) for seq in seqs]
        tokens, verified = sample_step(self.sampler, logits, sampling, rows, self.eos_token_ids,
                                       self.model_config.vocab_size)
        # Before the update moves num_computed_tokens: each chunk's context start.
        cost = self.roofline.step_cost([(c.num_tokens, c.seq.num_computed_tokens) for c in chunks],
                                       sum(len(c.draft_token_ids) + 1 for c in sampling))
        touched = self.scheduler.update_from_output(chunks, seqs, tokens, verified)
        self.last_step_roofline = StepRoofline(cost, time.perf_counter() - started, self.peaks)
        self.roofline_totals.add(self.last_step_roofline)
        for request in touched:
            if request.finished:
                self.requests.pop(request.request_id, None)
        return touched

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave their group (nothing to do on one device)."""
        self.executor.shutdown()

    def get_stats(self) -> dict[str, float]:
        return self.scheduler.get_stats()
