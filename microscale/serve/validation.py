"""Request checks past the protocol's field types (protocol.py), run before anything reaches the tokenizer or the
engine: the server's configurable limits (limits.py), and 400s for fields microscale does not implement (a client
asking for something must not silently get prose instead)."""

from __future__ import annotations

from typing import Any

from microscale.serve.errors import APIError
from microscale.serve.limits import ServeLimits
from microscale.serve.protocol import CompletionRequest

# field -> the values that mean "not asked for" (the only ones microscale can honour).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}
# The completions API has no tools (chat requests take them): a client sending them there would get prose.
_NOT_IN_COMPLETIONS: dict[str, tuple[Any, ...]] = {"tools": (None, []), "tool_choice": (None, "none")}


def check_request(body: Any, limits: ServeLimits) -> None:
    """400 for a request the server will not take; run before tokenizing. `body`: a completion or chat request."""
    unsupported = _UNSUPPORTED | (_NOT_IN_COMPLETIONS if isinstance(body, CompletionRequest) else {})
    for name, accepted in unsupported.items():
        if name in type(body).model_fields and getattr(body, name) not in accepted:
            raise APIError(400, f"{name} is not supported by this server.", name, "unsupported_parameter")
    best_of = getattr(body, "best_of", None)
    if best_of not in (None, body.n):  # best_of == n returns every candidate: the same as none
        raise APIError(400, "best_of is not supported by this server (only best_of == n).", "best_of",
                       "unsupported_parameter")
    if body.n > limits.max_n:
        raise APIError(400, f"n must be at most {limits.max_n}, got {body.n}.", "n")
    check_prompt_chars(body.prompt_chars(), limits, "messages" if "messages" in type(body).model_fields else "prompt")


def check_prompt_chars(chars: int, limits: ServeLimits, param: str, what: str = "prompt") -> None:
    """A 400 naming `param` when a request's text exceeds the server's max_prompt_chars (checked before tokenizing)."""
    if chars > limits.max_prompt_chars:
        raise APIError(400, f"The {what} has {chars} characters; this server takes at most "
                       f"{limits.max_prompt_chars}.", param)
