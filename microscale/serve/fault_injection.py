"""Test-only fault injection for the engine process, so the server's fault handling can be tested without timing.

Off unless the environment variable MICROSCALE_FAULT_INJECTION=1 reaches the engine process; then install()
wraps a few of the engine's methods (nothing else changes, and nothing is wrapped without it). A request whose
prompt text contains one of these markers triggers a fault:

- REQUEST_FAULT: building its sampling tensors raises, as for a parameter a tensor cannot hold (one bad request);
- ENGINE_FAULT: the forward of any batch it is in raises (a fault of the engine, failing everyone);
- HOLD: it is no longer stepped after its first token while only such requests are left, so a test can hold a
  stream open for as long as it needs (the engine still answers messages: aborts, new requests, shutdown).
"""

from __future__ import annotations

import os
from typing import Any

from microscale.engine.engine import LLMEngine
from microscale.engine.sampler import SamplingBatch, SamplingRow
from microscale.engine.sequence import Request

ENV_VAR = "MICROSCALE_FAULT_INJECTION"
REQUEST_FAULT = "<fault:request>"
ENGINE_FAULT = "<fault:engine>"
HOLD = "<fault:hold>"


def enabled() -> bool:
    return os.environ.get(ENV_VAR) == "1"


def _marked(request: Request, marker: str) -> bool:
    return request.prompt is not None and marker in request.prompt


def install(engine: LLMEngine) -> None:
    build = SamplingBatch.build.__func__

    def faulty_build(cls: type[SamplingBatch], rows: list[SamplingRow], *args: Any) -> SamplingBatch:
        # A row carries its request's parameters: here one object per request (each arrives pickled on its own).
        marked = {id(r.params) for r in engine.requests.values() if _marked(r, REQUEST_FAULT)}
        if any(id(row.params) in marked for row in rows):
            raise OverflowError("injected request fault")
        return build(cls, rows, *args)

    execute = engine.executor.execute

    def faulty_execute(chunks: list, *args: Any) -> Any:
        if any(_marked(chunk.seq.request, ENGINE_FAULT) for chunk in chunks):
            raise RuntimeError("injected engine fault")
        return execute(chunks, *args)

    has_unfinished = engine.has_unfinished_requests

    def has_unfinished_unheld() -> bool:
        held = [r for r in engine.requests.values() if _marked(r, HOLD) and r.first_token_time is not None]
        return has_unfinished() and len(held) < len(engine.requests)

    SamplingBatch.build = classmethod(faulty_build)  # this process only: the engine process is the test's own
    engine.executor.execute = faulty_execute
    engine.has_unfinished_requests = has_unfinished_unheld
