"""Turn a request's fields into SamplingParams and checked token ids (ValueErrors become 400s)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio

from microscale.engine.inputs import InputProcessor
from microscale.engine.structured import check_grammar
from microscale.sampling_params import SamplingParamError, SamplingParams, StructuredOutputsParams
from microscale.serve.errors import APIError
from microscale.serve.protocol import SamplingRequest

T = TypeVar("T")

_PASSED_THROUGH = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)


async def sampling_params(
    inputs: InputProcessor, request: SamplingRequest, max_tokens: int | None, default_max_tokens: int | None,
    logprobs: int | None, tool_grammar: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """Fields the client left out fall back to the model's generation_config, then to SamplingParams'. A grammar
    is compiled off the event loop (a large schema would stall every client). `tool_grammar`: the constraint of
    tool_choice "required" or a named function (chat_tools.py)."""
    overrides: dict[str, Any] = {k: getattr(request, k) for k in _PASSED_THROUGH if getattr(request, k) is not None}
    if max_tokens is None:
        max_tokens = inputs.generation_defaults.get("max_tokens", default_max_tokens)
    overrides.update(n=request.n, max_tokens=max_tokens, ignore_eos=request.ignore_eos, logprobs=logprobs)
    try:
        structured = _structured_outputs(request)
        if tool_grammar is not None:
            if structured is not None:
                raise SamplingParamError("tool_choice", "A tool_choice that forces a call cannot be combined with "
                                         "response_format or structured_outputs.")
            structured = tool_grammar
        if structured is not None:
            try:
                await off_loop(check_grammar, structured, inputs.structured_outputs_max_compile_ms)
            except SamplingParamError as e:
                if structured is not tool_grammar:
                    raise
                raise SamplingParamError("tools", str(e)) from None  # a tool's parameters are the bad schema
        overrides["structured_outputs"] = structured
        return inputs.default_sampling_params(**overrides)
    except SamplingParamError as e:
        raise APIError(400, str(e), e.param) from None


def _structured_outputs(request: SamplingRequest) -> StructuredOutputsParams | None:
    """response_format (OpenAI's) or structured_outputs (vLLM's), not both."""
    wanted = request.structured_outputs
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        if wanted is None:
            return None
        return StructuredOutputsParams(json=wanted.json_, json_object=wanted.json_object, regex=wanted.regex,
                                       choice=wanted.choice, grammar=wanted.grammar)
    if wanted is not None:
        raise SamplingParamError("structured_outputs", "Give response_format or structured_outputs, not both.")
    return StructuredOutputsParams.from_response_format(response_format.model_dump(by_alias=True, exclude_none=True))


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs tokenizer work (chat templates, encoding) on a worker thread: a long prompt would otherwise stall every
    client on the event loop (HF tokenizers release the GIL)."""
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))


def check_token_ids(inputs: InputProcessor, ids: list[int], param: str) -> None:
    """Before anything decodes them: ids outside the vocabulary make the tokenizer raise (or overflow)."""
    try:
        inputs.validate_prompt(ids)
    except ValueError as e:
        raise APIError(400, str(e), param) from None


def check_prompt(inputs: InputProcessor, ids: list[int], params: SamplingParams, param: str) -> None:
    check_token_ids(inputs, ids, param)
    try:
        inputs.check_max_tokens(len(ids), params.max_tokens)
    except ValueError as e:
        raise APIError(400, str(e), "max_tokens") from None
