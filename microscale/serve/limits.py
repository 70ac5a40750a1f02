"""ServeLimits: per-server bounds on what one request may cost (the `serve` flags of the same names). No imports
beyond the standard library: the CLI reads its defaults when it builds its parser."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeLimits:
    max_n: int = 128
    max_request_bytes: int = 16 * 2**20
    max_prompt_chars: int = 1_000_000
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    # Stored responses (the Responses API's store=true): the least recently used go first past either bound.
    max_stored_responses: int = 1000
    max_stored_response_bytes: int = 256 * 2**20
