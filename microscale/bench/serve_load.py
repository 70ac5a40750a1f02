"""Online load against any OpenAI-compatible server: streamed /v1/completions requests, at most
`max_concurrency` in flight and/or arriving as a Poisson process of `request_rate` per second.

Each request's TTFT is the time to the first chunk carrying text, ITL the gaps between later such chunks, E2E
the time to the end of the stream; output tokens come from the usage chunk (stream_options.include_usage)
or, when a server sends none, the number of text chunks. A failed request is counted with its error, never
retried and never dropped from the totals.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

from microscale.bench import BenchError
from microscale.bench.datasets import BenchRequest
from microscale.bench.report import RequestTiming, summarize_run


@dataclass
class LoadSettings:
    base_url: str
    model: str
    max_concurrency: int | None = None
    request_rate: float = float("inf")
    seed: int = 0
    prompt_format: str = "tokens"  # "tokens": token-id prompts (exact lengths); "text": the decoded text
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 3600.0


def list_models(base_url: str, api_key: str | None = None) -> list[str]:
    """The served model names (GET /v1/models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return [m["id"] for m in response.json()["data"]]


def run_load(settings: LoadSettings, requests: list[BenchRequest]) -> dict[str, Any]:
    """Send every request (after one untimed warm-up) and summarise them as one run."""
    return asyncio.run(_run_load(settings, requests))


async def _run_load(settings: LoadSettings, requests: list[BenchRequest]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=settings.max_concurrency or len(requests), max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    async with httpx.AsyncClient(base_url=settings.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(settings.timeout_s, connect=30)) as client:
        warm = await _one_request(client, settings, BenchRequest(requests[0].prompt_token_ids, 4,
                                                                  requests[0].prompt))
        if warm.error is not None:
            raise BenchError(f"the warm-up request failed: {warm.error}")
        gate = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
        rng = random.Random(settings.seed)

        async def limited(request: BenchRequest) -> RequestTiming:
            if gate is None:
                return await _one_request(client, settings, request)
            async with gate:
                return await _one_request(client, settings, request)

        start = time.perf_counter()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(limited(request)))
            if settings.request_rate != float("inf"):  # Poisson arrivals: exponential gaps
                await asyncio.sleep(rng.expovariate(settings.request_rate))
        timings = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    rate = None if settings.request_rate == float("inf") else settings.request_rate
    return summarize_run(list(timings), duration, max_concurrency=settings.max_concurrency, request_rate=rate)


def _body(settings: LoadSettings, request: BenchRequest) -> dict[str, Any]:
    use_text = settings.prompt_format == "text" and request.prompt is not None
    return {
        "model": settings.model,
        "prompt": request.prompt if use_text else request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Exact output lengths: vLLM, SGLang, LMDeploy and microscale take these extra fields.
        "ignore_eos": True,
        "min_tokens": request.output_len,
    }


async def _one_request(client: httpx.AsyncClient, settings: LoadSettings, request: BenchRequest) -> RequestTiming:
    timing = RequestTiming(len(request.prompt_token_ids), 0)
    start = time.perf_counter()
    last = None
    chunks_with_text = 0
    try:
        async with client.stream("POST", "/v1/completions", json=_body(settings, request)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")[:300]
                timing.error = f"HTTP {response.status_code}: {body}"
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    timing.error = f"stream error: {chunk['error']}"
                    return timing
                now = time.perf_counter() - start
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    chunks_with_text += 1
                    if last is None:
                        timing.ttft = now
                    else:
                        timing.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    timing.output_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        timing.error = f"{type(e).__name__}: {e}"
        return timing
    timing.e2e = time.perf_counter() - start
    timing.output_tokens = timing.output_tokens or chunks_with_text
    return timing
