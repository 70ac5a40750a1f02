"""Turn a request's fields into SamplingParams and checked token ids (ValueErrors become 400s)."""

from __future__ import annotations

from typing import Any

from microscale.engine.inputs import InputProcessor
from microscale.sampling_params import SamplingParams
from microscale.serve.errors import APIError
from microscale.serve.protocol import SamplingRequest

_PASSED_THROUGH = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)


def sampling_params(
    inputs: InputProcessor, request: SamplingRequest, max_tokens: int | None, default_max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    """Fields the client left out fall back to the model's generation_config, then to SamplingParams'."""
    overrides: dict[str, Any] = {k: getattr(request, k) for k in _PASSED_THROUGH if getattr(request, k) is not None}
    if max_tokens is None:
        max_tokens = inputs.generation_defaults.get("max_tokens", default_max_tokens)
    overrides.update(n=request.n, max_tokens=max_tokens, ignore_eos=request.ignore_eos, logprobs=logprobs)
    try:
        return inputs.default_sampling_params(**overrides)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def check_prompt(inputs: InputProcessor, ids: list[int], params: SamplingParams, param: str) -> None:
    try:
        inputs.validate_prompt(ids)
    except ValueError as e:
        raise APIError(400, str(e), param) from None
    max_len = inputs.max_model_len
    if params.max_tokens is not None and len(ids) + params.max_tokens > max_len:
        raise APIError(
            400, f"The prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: more than the context "
            f"length ({max_len}); shorten the prompt or lower max_tokens.", "max_tokens",
        )
