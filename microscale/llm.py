"""The offline batch API: LLM(model).generate(prompts, params) and .chat(messages, params)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from tqdm.auto import tqdm

from microscale.config import EngineArgs
from microscale.engine.engine import LLMEngine, PromptType
from microscale.outputs import RequestOutput
from microscale.quant.config import CalibConfig, QuantConfig
from microscale.sampling_params import SamplingParamError, SamplingParams, StructuredOutputsParams
from microscale.tokenizer import Tokenizer

Conversation = list[dict[str, Any]]


class LLM:
    """Load a model once, then run batches of prompts through continuous batching.

    Engine knobs are keyword arguments: dtype, max_num_seqs, max_num_batched_tokens, max_model_len,
    block_size, kv_cache_memory (GiB), cache_max_entry_count (GPU: share of free memory after weights and peak
    activations), gpu_memory_utilization (GPU: share of total memory, vLLM's meaning), enable_prefix_caching, seed,
    load_format, device, kernel_backend ("auto", "torch", "triton"), enforce_eager (no CUDA graphs,
    no compiled CPU forward),
    tensor_parallel_size, deterministic (batch-invariant outputs; CPU), structured_outputs_max_compile_ms (a grammar
    that takes longer to compile is the request's ValueError).
    Quantization: `quant_config=QuantConfig(quant_algo=..., kv_cache_quant_algo=...)` (or the scheme names as
    `quantization=` / `kv_cache_quant=`), and `calib_config=CalibConfig(...)` for static scales.
    """

    def __init__(
        self, model: str, quant_config: QuantConfig | None = None, calib_config: CalibConfig | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if quant_config is not None:
            for knob in ("quantization", "kv_cache_quant"):
                if engine_kwargs.get(knob) is not None:
                    raise ValueError(f"Give quant_config or {knob}, not both.")
            engine_kwargs.update(quantization=quant_config.quantization, kv_cache_quant=quant_config.kv_cache_quant)
        self.engine = LLMEngine(EngineArgs(model=str(model), calib_config=calib_config, **engine_kwargs))
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (they also stop when this process exits)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.engine.inputs.default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(sampling_params)} sampling params.")
        # Tokenize and check every prompt before any starts, so a bad one fails the call cleanly.
        tokenized = [self.engine.inputs.tokenize_prompt(p) for p in prompts]
        for _, ids in tokenized:
            self.engine.inputs.validate_prompt(ids)
        order = {}
        try:
            for i, ((text, ids), params) in enumerate(zip(tokenized, sampling_params)):
                request_id = str(next(self._ids))
                prompt = {"prompt_token_ids": ids} if text is None else {"prompt": text, "prompt_token_ids": ids}
                self.engine.add_request(request_id, prompt, params)
                order[request_id] = i
        except BaseException:  # e.g. a grammar that does not compile: none of the call's requests stays queued
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """`response_format`: OpenAI's ({"type": "json_object"}, or {"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}}}), applied to every sampling params (as their structured_outputs).
        `tools`: OpenAI-format function definitions, rendered by the chat template (the replies' calls are in
        their text, in the model's format; the server parses them into tool_calls)."""
        if response_format is not None:
            sampling_params = self._with_response_format(sampling_params, response_format)
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        template_kwargs = {**(chat_template_kwargs or {}), **({"tools": tools} if tools is not None else {})}
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt, **template_kwargs)
            # The template already holds any BOS token it wants.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _with_response_format(
        self, sampling_params: SamplingParams | list[SamplingParams] | None, response_format: dict[str, Any]
    ) -> SamplingParams | list[SamplingParams] | None:
        structured = StructuredOutputsParams.from_response_format(response_format)
        if structured is None:  # {"type": "text"}
            return sampling_params

        def constrained(params: SamplingParams) -> SamplingParams:
            if params.structured_outputs is not None:
                raise SamplingParamError("response_format",
                                         "Give response_format or SamplingParams.structured_outputs, not both.")
            return dataclasses.replace(params, structured_outputs=structured)

        if sampling_params is None:
            return self.engine.inputs.default_sampling_params(structured_outputs=structured)
        if isinstance(sampling_params, SamplingParams):
            return constrained(sampling_params)
        return [constrained(p) for p in sampling_params]

    def reset_prefix_cache(self) -> None:
        self.engine.scheduler.reset_prefix_cache()

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        bar = tqdm(total=len(order), desc="Processed prompts", unit="req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished and output.request_id in order:
                        results[order[output.request_id]] = output
                        bar.update(1)
        except BaseException:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return results
