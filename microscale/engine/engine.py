"""LLMEngine: requests in, one step at a time: schedule -> one forward -> sample -> update sequences."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from microscale.config import EngineArgs, SchedulerConfig, resolve_dtype
from microscale.engine.block_manager import BlockManager
from microscale.engine.detokenizer import IncrementalDetokenizer
from microscale.engine.model_runner import ModelRunner
from microscale.engine.scheduler import ScheduledChunk, Scheduler
from microscale.engine.sequence import Request, Sequence
from microscale.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from microscale.models.loader import load_generation_config, load_model, load_model_config, resolve_model_path
from microscale.outputs import Logprob, RequestOutput
from microscale.quant.calibration import calibrate
from microscale.quant.kv_cache import kv_scales_from_amax
from microscale.quant.scheme import QuantScheme
from microscale.sampling_params import SamplingParams
from microscale.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_DEFAULT_CPU_KV_GIB = 4.0
# generation_config.json keys that become the default SamplingParams (as vLLM does).
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}

PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        torch.manual_seed(args.seed)
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model_dir = resolve_model_path(args.model)
        self.model_config = cfg = load_model_config(model_dir)
        self.tokenizer = Tokenizer.from_pretrained(resolve_model_path(args.tokenizer) if args.tokenizer else model_dir)
        generation_config = load_generation_config(model_dir)
        self.eos_token_ids = self._eos_ids(generation_config)
        self.generation_defaults = {
            ours: generation_config[key] for key, ours in _GENERATION_DEFAULTS.items() if key in generation_config
        }
        self.dtype = resolve_dtype(args.dtype, cfg.checkpoint_dtype, self.device)
        max_model_len = args.max_model_len or cfg.max_position_embeddings
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
            model, cfg, self.device, self.dtype, args.max_num_seqs, max_model_len, kv_cache_quant=kv_cache_quant
        )
        self._apply_checkpoint_kv_scales(kv_scales, kv_cache_quant)
        num_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks, args.block_size)
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

    def _apply_checkpoint_kv_scales(self, kv_scales: dict, kv_cache_quant: str | None) -> None:
        """Static FP8 KV scales a pre-quantized checkpoint carries (used when its KV cache is FP8)."""
        if not kv_scales:
            return
        if kv_cache_quant != "fp8":
            logger.warning("the checkpoint's FP8 KV cache scales are unused (KV cache: %s)", kv_cache_quant or "none")
            return
        for layer, scales in kv_scales.items():
            self.runner.set_kv_scales(layer, scales["k_scale"], scales["v_scale"])

    def _eos_ids(self, generation_config: dict[str, Any]) -> list[int]:
        eos = generation_config.get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
        if self.model_config.eos_token_ids:
            return self.model_config.eos_token_ids
        return [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

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

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return SamplingParams(**{**self.generation_defaults, **overrides})

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("A prompt dict needs 'prompt' or 'prompt_token_ids'.")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"A prompt must be a string, a list of token ids or a dict, not {type(prompt).__name__}.")

    def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        params = params or self.default_sampling_params()
        text, ids = self.tokenize_prompt(prompt)
        self.validate_prompt(ids)
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

    def validate_prompt(self, ids: list[int], room_to_generate: bool = True) -> None:
        """A clear ValueError for token ids the engine cannot take: empty, too long, outside the vocabulary."""
        max_len = self.scheduler_config.max_model_len
        if not ids:
            raise ValueError("The prompt is empty.")
        if len(ids) > max_len or (room_to_generate and len(ids) == max_len):
            raise ValueError(
                f"The prompt has {len(ids)} tokens; max_model_len is {max_len}"
                + (", which leaves no room to generate." if room_to_generate else ".")
            )
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"Prompt token ids must be in [0, {vocab}).")

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        request.unforked = []

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one token sequence, [len(token_ids), vocab] float32 on the engine's
        device (row i predicts token i + 1), for scoring and perplexity. Runs the engine's own prefill path in
        chunks of max_num_batched_tokens, on KV blocks borrowed for the call (nothing enters the prefix cache)."""
        ids = list(token_ids)
        self.validate_prompt(ids, room_to_generate=False)
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

    # ---- the step -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
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
        outputs = []
        for request in touched.values():
            outputs.append(request.to_output())
            if request.finished:
                del self.requests[request.request_id]
        return outputs

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
