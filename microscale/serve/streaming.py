"""Shared by completions and chat: running several engine requests as one, turning cumulative outputs into
per-choice deltas, and Server-Sent Events framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from microscale.outputs import RequestOutput, SampleLogprobs
from microscale.serve.async_engine import AsyncEngine, EngineDeadError
from microscale.serve.errors import APIError, error_body
from microscale.serve.protocol import Usage

_DONE = object()


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from all streams as they come. Closing this early closes every stream (each
    aborts its request)."""
    if len(streams) == 1:  # the common case (one prompt): no relay task and queue per token
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, _DONE))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def start_requests(
    engine: AsyncEngine, request_id: str, prompts: list[dict], params
) -> AsyncIterator[tuple[int, RequestOutput]]:
    engine.check_admission(len(prompts))
    return merge([engine.generate(f"{request_id}-{i}", p, params) for i, p in enumerate(prompts)])


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None
    finish_reason: str | None


class DeltaTracker:
    """What each choice (prompt i, sample j -> index i * n + j) gained since the last output."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._text: dict[int, int] = {}
        self._tokens: dict[int, int] = {}
        self._done: set[int] = set()
        self.completion_tokens = 0

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        found = []
        for c in output.outputs:
            index = prompt_index * self.n + c.index
            if index in self._done:
                continue
            sent_text, sent_tokens = self._text.get(index, 0), self._tokens.get(index, 0)
            text, tokens = c.text[sent_text:], c.token_ids[sent_tokens:]
            if not text and not tokens and c.finish_reason is None:
                continue
            logprobs = c.logprobs[sent_tokens : len(c.token_ids)] if c.logprobs is not None else None
            self._text[index] = max(sent_text, len(c.text))
            self._tokens[index] = len(c.token_ids)
            if c.finish_reason is not None:
                self._done.add(index)
                self.completion_tokens += len(c.token_ids)
            found.append(ChoiceDelta(index, text, tokens, logprobs, c.finish_reason))
        return found


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


async def sse_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """`data: {...}` events, an error event if the engine stopped mid-stream, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except APIError as e:  # RequestFailedError: the engine failed on this request alone
        yield sse(json.dumps(error_body(e.status, e.message, e.param, e.code)))
    except (EngineDeadError, ValueError) as e:
        yield sse(json.dumps(error_body(503 if isinstance(e, EngineDeadError) else 400, str(e))))
    yield sse("[DONE]")
