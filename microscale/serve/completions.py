"""POST /v1/completions: prompts (text or token ids) in, completions out, streamed or whole."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse, StreamingResponse

from microscale.engine.inputs import InputProcessor
from microscale.outputs import SampleLogprobs
from microscale.serve.async_engine import AsyncEngine
from microscale.serve.errors import APIError
from microscale.serve.params import check_prompt, check_token_ids, off_loop, sampling_params
from microscale.serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from microscale.serve.streaming import DeltaTracker, sse_stream, start_requests, usage

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


async def _prompts(inputs: InputProcessor, prompt: str | list) -> list[dict]:
    """Each prompt as {"prompt": text, "prompt_token_ids": ids}."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty.", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise APIError(400, "prompt must not be empty.", "prompt")
            out.append({"prompt": p, "prompt_token_ids": await off_loop(inputs.tokenizer.encode, p)})
        else:
            check_token_ids(inputs, p, "prompt")
            out.append({"prompt": inputs.tokenizer.decode(p) if p else "", "prompt_token_ids": list(p)})
    return out


def _logprobs(
    inputs: InputProcessor, token_ids: list[int], entries: SampleLogprobs, top_n: int, offset: int,
    first_is_none: bool = False,
) -> CompletionLogprobs:
    """OpenAI's legacy format; offset: where the first token's text starts in the choice's text."""
    result = CompletionLogprobs()
    for i, token in enumerate(token_ids):
        text = inputs.tokenizer.decode([token])
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        if first_is_none and i == 0:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        entry = entries[i - 1 if first_is_none else i]
        result.token_logprobs.append(entry[token].logprob)
        top = {e.decoded_token or "": e.logprob for e in entry.values() if e.rank <= top_n}
        result.top_logprobs.append({**top, entry[token].decoded_token or "": entry[token].logprob})
    return result


def _merge_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens, token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs, text_offset=first.text_offset + second.text_offset,
    )


async def create_completion(
    engine: AsyncEngine, model: str, body: CompletionRequest
) -> JSONResponse | StreamingResponse:
    inputs = engine.inputs
    prompts = await _prompts(inputs, body.prompt)
    params = await sampling_params(inputs, body, body.max_tokens, _DEFAULT_MAX_TOKENS, body.logprobs)
    for p in prompts:
        check_prompt(inputs, p["prompt_token_ids"], params, "prompt")
    # Echoed prompts carry their own logprobs (lm-eval's loglikelihood tasks read them).
    echoed: list[CompletionLogprobs | None] = [None] * len(prompts)
    if body.echo and body.logprobs is not None:
        for i, p in enumerate(prompts):
            ids = p["prompt_token_ids"]
            try:
                entries = await engine.call("prompt_logprobs", ids, body.logprobs)
            except ValueError as e:  # no KV cache room for the prompt right now
                raise APIError(400, str(e), "prompt") from None
            echoed[i] = _logprobs(inputs, ids, entries, body.logprobs, 0, first_is_none=True)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    outputs = start_requests(engine, request_id, prompts, params)
    created = int(time.time())
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    tracker = DeltaTracker(params.n)

    def choice(index: int, text: str, token_ids: list[int], entries, finish: str | None, offset: int,
               echo: bool) -> CompletionChoice:
        prompt = prompts[index // params.n]
        logprobs = None
        if body.logprobs is not None:
            start = offset + (len(prompt["prompt"]) if echo else 0)
            logprobs = _logprobs(inputs, token_ids, entries, body.logprobs, start)
            if echo:
                logprobs = _merge_logprobs(echoed[index // params.n], logprobs)
        return CompletionChoice(index=index, text=(prompt["prompt"] if echo else "") + text, logprobs=logprobs,
                                finish_reason=finish)

    if body.stream:
        async def chunks() -> AsyncIterator[str]:
            sent: dict[int, int] = {}
            async for prompt_index, output in outputs:
                for d in tracker.deltas(prompt_index, output):
                    echo = body.echo and d.index not in sent
                    c = choice(d.index, d.text, d.token_ids, d.logprobs, d.finish_reason, sent.get(d.index, 0), echo)
                    sent[d.index] = sent.get(d.index, 0) + len(d.text)
                    yield CompletionResponse(id=request_id, created=created, model=model, choices=[c]).model_dump_json()
            if body.stream_options and body.stream_options.include_usage:
                final = CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                           usage=usage(prompt_tokens, tracker.completion_tokens))
                yield final.model_dump_json()

        return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")

    finals = {}
    async with aclosing(outputs):  # cancelled (the client left): the requests are aborted at once
        async for prompt_index, output in outputs:
            if output.finished:
                finals[prompt_index] = output
    choices = []
    for prompt_index in range(len(prompts)):
        for c in finals[prompt_index].outputs:
            choices.append(choice(prompt_index * params.n + c.index, c.text, c.token_ids, c.logprobs,
                                  c.finish_reason, 0, body.echo))
    completion_tokens = sum(len(c.token_ids) for o in finals.values() for c in o.outputs)
    response = CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                  usage=usage(prompt_tokens, completion_tokens))
    return JSONResponse(response.model_dump())
