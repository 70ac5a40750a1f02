"""The speculative_config of `LLM(...)` and `--speculative-config` (vLLM's names and defaults)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft")
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's n when neither bound is given


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup: propose what followed the last n tokens' latest earlier occurrence in the
    request's own tokens) or "draft" (a smaller model on the same tokenizer, from the folder `model`).
    num_speculative_tokens: k, the most tokens proposed per step. prompt_lookup_min/max: the n-gram sizes tried,
    longest first (one given: both are it; neither: 5, as vLLM). disable_by_batch_size: no speculation while more
    requests than this run (None: always speculate), where verifying drafts stops paying for itself."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        _positive_int("num_speculative_tokens", self.num_speculative_tokens)
        if self.disable_by_batch_size is not None:
            _positive_int("disable_by_batch_size", self.disable_by_batch_size)
        if self.method == "draft":
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative_config.model (the draft model's folder) is required for method 'draft'.")
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("speculative_config.prompt_lookup_min/max apply to method 'ngram' only.")
            return
        if self.model is not None:
            raise ValueError("speculative_config.model is for method 'draft'; method 'ngram' needs no model.")
        low = self.prompt_lookup_min if self.prompt_lookup_min is not None else self.prompt_lookup_max
        high = self.prompt_lookup_max if self.prompt_lookup_max is not None else self.prompt_lookup_min
        low = DEFAULT_PROMPT_LOOKUP if low is None else low
        high = DEFAULT_PROMPT_LOOKUP if high is None else high
        _positive_int("prompt_lookup_min", low)
        _positive_int("prompt_lookup_max", high)
        if low > high:
            raise ValueError(
                f"speculative_config.prompt_lookup_min ({low}) must not exceed prompt_lookup_max ({high}).")
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(d).__name__}.")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {', '.join(known)}.")
        missing = [name for name in ("method", "num_speculative_tokens") if name not in d]
        if missing:
            raise ValueError(f"speculative_config needs {' and '.join(missing)}.")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """From `--speculative-config`'s JSON text."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}.") from None
        return cls.from_dict(d)


def _positive_int(name: str, value: Any) -> None:
    # bool is an int to Python, but `true` for a count is a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"speculative_config.{name} must be a positive integer, got {value!r}.")
