"""What the server front and the engine process say to each other through their two pipes.

To the engine process: AddRequest, Abort, Call (an engine method run between steps), Shutdown.
From it: Ready (model loaded) or StartupFailed, once; then a StepReport per step, Rejected (bad input),
RequestError (adding a request raised otherwise), Reply (to a Call), and EngineDied if a step raised.
Each side dispatches on the message's type. Only what changed travels in a StepReport (new tokens, text and
logprobs), so a step costs the same to report late in a long output as early on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microscale.engine.device_peaks import DevicePeaks
from microscale.engine.roofline import StepCost
from microscale.outputs import SampleLogprobs
from microscale.sampling_params import SamplingParams

# ---- front -> engine process --------------------------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt: dict[str, Any]  # {"prompt", "prompt_token_ids"}
    params: SamplingParams
    arrival_time: float  # time.monotonic() on the front


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Call:
    """engine.method(*args), answered by a Reply with the same call_id."""

    call_id: int
    method: str
    args: tuple


@dataclass(frozen=True)
class Shutdown:
    pass


ToEngine = AddRequest | Abort | Call | Shutdown

# ---- engine process -> front --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    stats: dict[str, float]  # LLMEngine.get_stats() once the model is loaded
    cache_config: dict[str, str]  # the KV cache's settings, by vLLM's cache_config_info label names
    peaks: DevicePeaks | None = None  # the device's measured peaks (the bandwidth figures' denominator)


@dataclass(frozen=True)
class StartupFailed:
    error_type: str
    message: str


@dataclass(frozen=True)
class CompletionDelta:
    """One sequence's progress since the last report."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: SampleLogprobs | None
    num_output_tokens: int
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass(frozen=True)
class RequestDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    metrics: dict[str, float]  # arrival_time, first_scheduled_time, first_token_time (time.monotonic())
    error: str | None = None  # the engine aborted the request: this failed on it (the exception's type only)


@dataclass(frozen=True)
class StepReport:
    deltas: list[RequestDelta]
    # LLMEngine.get_stats() after the step, plus requests_received and this process's memory figures.
    stats: dict[str, float]
    step_seconds: float | None  # None: no step ran (an update after aborts while idle)
    step_tokens: int = 0  # tokens the step's forward computed (prefill chunks, decodes, drafts)
    step_cost: StepCost | None = None  # its roofline bytes and FLOPs (None: no forward ran)


@dataclass(frozen=True)
class Rejected:
    """The request's input is invalid (a ValueError while adding it): the client's fault."""

    request_id: str
    message: str


@dataclass(frozen=True)
class RequestError:
    """Adding the request raised otherwise: it fails alone, the engine goes on."""

    request_id: str
    error_type: str


@dataclass(frozen=True)
class Reply:
    call_id: int
    result: Any
    error: tuple[str, str] | None  # (exception type, message)


@dataclass(frozen=True)
class EngineDied:
    """A step raised: the engine loop ends after sending this."""

    message: str


FromEngine = Ready | StartupFailed | StepReport | Rejected | RequestError | Reply | EngineDied
