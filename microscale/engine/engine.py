"""LLMEngine: requests in, one step at a time: schedule -> one forward -> sample -> update sequences."""

from __future__ import annotations

import logging
import time

import torch

from microscale.config import EngineArgs, SchedulerConfig, resolve_dtype
from microscale.engine.block_manager import BlockManager
from microscale.engine.detokenizer import IncrementalDetokenizer
from microscale.engine.inputs import InputProcessor, PromptType
from microscale.engine.model_runner import ModelRunner
from microscale.engine.scheduler import ScheduledChunk, Scheduler
from microscale.engine.sequence import Request, Sequence
from microscale.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from microscale.models.loader import load_model
from microscale.outputs import Logprob, RequestOutput, SampleLogprobs
from microscale.quant.calibration import calibrate
from microscale.quant.kv_cache import kv_scales_from_amax
from microscale.quant.scheme import QuantScheme
from microscale.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_DEFAULT_CPU_KV_GIB = 4.0


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        torch.manual_seed(args.seed)
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Tokenizer, model config, generation defaults and prompt checks (shared with the server's front).
        self.inputs = inputs = InputProcessor(args)
        self.model_config = cfg = inputs.model_config
        self.tokenizer, self.eos_token_ids = inputs.tokenizer, inputs.eos_token_ids
        model_dir, max_model_len = inputs.model_dir, inputs.max_model_len
        self.dtype = resolve_dtype(args.dtype, cfg.checkpoint_dtype, self.device)
        self.scheduler_config = SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, max_model_len)
        started = time.perf_counter()
        self.quant = QuantScheme.resolve(args.quantization, cfg.hf_config.get("quantization_config"))
        # Dummy weights come with dummy scales (benchmarks of shapes, not of accuracy).
        if self.quant.needs_calibration and args.calib_config is None and args.load_format != "dummy":
            raise ValueError(
                "FP8 with static activation scales needs calibration data: pass calib_config=CalibConfig("
                "calib_dataset=...) (CLI: --calib-data FILE), use fp8-dynamic, or load a pre-quantized FP8 checkpoint."
            )
        model, kv_scales = load_model(
            model_dir, cfg, self.dtype, self.device, max_model_len, self.quant, args.load_format, args.seed
        )
        elapsed = time.perf_counter() - started
        logger.info("loaded %s (%s, %s) in %.1fs", cfg.architecture, self.dtype, self.device, elapsed)
        kv_cache_quant = args.kv_cache_quant or self.quant.checkpoint_kv_cache
        self.runner = ModelRunner(
            model, cfg, self.device, self.dtype, args.max_num_seqs, max_model_len, kv_cache_quant=kv_cache_quant,
            kernel_backend=args.kernel_backend,
        )
        self._apply_checkpoint_kv_scales(kv_scales, kv_cache_quant)
        num_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks, args.block_size)
        self.graph_capture_seconds = self._capture_decode_graphs()
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        if args.calib_config is not None:
            kv_amax = calibrate(self, args.calib_config)
            if kv_cache_quant is not None:
                for layer, (k_amax, v_amax) in kv_amax.items():
                    self.runner.set_kv_scales(layer, *kv_scales_from_amax(kv_cache_quant, k_amax, v_amax))

    def _capture_decode_graphs(self) -> float | None:
        """On a GPU with the Triton kernels, unless enforce_eager: decode steps replay CUDA graphs."""
        if self.args.enforce_eager or self.device.type != "cuda":
            return None
        reason = self.runner.graphs_unavailable_reason()
        if reason is not None:
            logger.info("decode steps run eagerly: %s", reason)
            return None
        return self.runner.enable_decode_graphs()

    def _apply_checkpoint_kv_scales(self, kv_scales: dict, kv_cache_quant: str | None) -> None:
        """Static FP8 KV scales a pre-quantized checkpoint carries (used when its KV cache is FP8)."""
        if not kv_scales:
            return
        if kv_cache_quant != "fp8":
            logger.warning("the checkpoint's FP8 KV cache scales are unused (KV cache: %s)", kv_cache_quant or "none")
            return
        for layer, scales in kv_scales.items():
            self.runner.set_kv_scales(layer, scales["k_scale"], scales["v_scale"])

    def _num_kv_blocks(self) -> int:
        args, sched = self.args, self.scheduler_config
        block_bytes = self.runner.kv_block_bytes(args.block_size)
        blocks_per_seq = -(-sched.max_model_len // args.block_size)
        if args.kv_cache_memory is not None:
            budget = args.kv_cache_memory * _GIB
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * args.cache_max_entry_count
        else:
            # No more than every sequence slot could ever use.
            budget = min(_DEFAULT_CPU_KV_GIB * _GIB, sched.max_num_seqs * blocks_per_seq * block_bytes)
        num_blocks = int(budget // block_bytes)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"The KV cache budget ({budget / _GIB:.3f} GiB = {num_blocks} blocks of {args.block_size} tokens) "
                f"cannot hold one sequence of max_model_len={sched.max_model_len} tokens; raise kv_cache_memory / "
                f"cache_max_entry_count or lower max_model_len."
            )
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.3f GiB (%s)",
            num_blocks, args.block_size, num_blocks * args.block_size, num_blocks * block_bytes / _GIB,
            self.runner.kv_cache_description(),
        )
        return num_blocks

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
                rows.append(self.runner.execute_all_logits([ScheduledChunk(seq, n)]).float())
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
            if self.scheduler.num_unfinished and self.scheduler.num_preemptions == preemptions_before:
                # Nothing fits although requests wait: stepping again would spin forever.
                raise RuntimeError(
                    f"No request fits in the KV cache ({self.block_manager.num_free_blocks} free blocks); "
                    "raise kv_cache_memory or lower max_model_len / max_num_seqs."
                )
            return []
        logits, sampling = self.runner.execute(chunks)
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_full_blocks(chunk.seq)
        if not sampling:
            return []
        seqs = [c.seq for c in sampling]
        batch = SamplingBatch.build(seqs, self.eos_token_ids, self.model_config.vocab_size, self.device)
        out = self.sampler(logits, batch)
        token_ids = out.token_ids.tolist()  # the step's one device -> host sync
        logprobs = _logprobs_to_host(out)
        touched: dict[str, Request] = {}
        now = time.monotonic()
        for row, seq in enumerate(seqs):
            self._append_token(seq, token_ids[row], logprobs, row, now)
            touched[seq.request.request_id] = seq.request
        self.num_generated_tokens += len(seqs)
        for request in touched.values():
            if request.finished:
                del self.requests[request.request_id]
        return list(touched.values())

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
