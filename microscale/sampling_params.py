"""Per-request sampling parameters, with the names and defaults vLLM users know."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the sampler's top_k column and torch generators take int64
GREEDY_BELOW = 1e-5  # smaller temperatures overflow float32 logits / temperature: they mean greedy
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024


class SamplingParamError(ValueError):
    """A field outside its domain; `param` names it (the server reports it as the 400's param)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise SamplingParamError(param, message)


def _int64(param: str, value: int) -> None:
    _check(isinstance(value, int) and INT64_MIN <= value <= INT64_MAX, param,
           f"{param} must be an integer that fits int64, got {value!r}.")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the output to a language (vLLM's names): exactly one of a JSON Schema (`json`, a dict or its JSON
    text), any JSON object (`json_object`), a regular expression (`regex`), one of fixed strings (`choice`), or a
    Lark grammar (`grammar`, llguidance's dialect)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        _check(len(given) == 1, "structured_outputs",
               "structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
               f"got {given or 'none'}.")
        _check(self.choice is None or (len(self.choice) > 0 and all(isinstance(c, str) and c for c in self.choice)),
               "structured_outputs", "structured_outputs.choice must be a non-empty list of non-empty strings.")

    @classmethod
    def from_response_format(cls, response_format: dict) -> StructuredOutputsParams | None:
        """OpenAI's response_format: {"type": "text"} (None: nothing to constrain), {"type": "json_object"}, or
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}."""
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        _check(kind in ("text", "json_object", "json_schema"), "response_format",
               f"response_format.type must be text, json_object or json_schema, got {kind!r}.")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True)
        json_schema = response_format.get("json_schema")
        schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
        _check(isinstance(schema, dict), "response_format",
               "response_format json_schema needs its json_schema object, with the schema under \"schema\".")
        return cls(json=schema)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # StructuredOutputsParams, or the same as a dict (e.g. a line of a prompts file)
    structured_outputs: StructuredOutputsParams | dict | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError:
                raise SamplingParamError("structured_outputs", "structured_outputs keys are json, json_object, regex, "
                                         f"choice, grammar; got {sorted(self.structured_outputs)}.") from None
        self._validate()
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0

    def _validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value), name,
                   f"{name} must be a finite number, got {value!r}.")
        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"):
            if getattr(self, name) is not None:
                _int64(name, getattr(self, name))
        for token in self.stop_token_ids:
            _int64("stop_token_ids", token)
        _check(self.n >= 1, "n", f"n must be at least 1, got {self.n}.")
        _check(self.temperature >= 0, "temperature", f"temperature must be non-negative, got {self.temperature}.")
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        _check(self.top_k >= 0, "top_k", f"top_k must be -1 (disabled) or a positive integer, got {self.top_k}.")
        _check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"repetition_penalty must be positive, got {self.repetition_penalty}.")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check(self.min_tokens >= 0, "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}.")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).")
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs",
               f"logprobs must be non-negative, got {self.logprobs}.")
        _check(len(self.stop_strings) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings.")
        _check(all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop_strings), "stop",
               f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
