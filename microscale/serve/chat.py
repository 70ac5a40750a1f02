"""POST /v1/chat/completions: messages (and tools) rendered with the model's chat template, one assistant reply per
choice, parsed into content, reasoning and tool calls by the model family's parser."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse, StreamingResponse

from microscale.outputs import SampleLogprobs
from microscale.serve.async_engine import AsyncEngine
from microscale.serve.chat_replies import ReplyDeltas, assistant_message, finish_reason
from microscale.serve.chat_tools import RequestTools, template_messages
from microscale.serve.errors import APIError
from microscale.serve.params import check_prompt, off_loop, sampling_params
from microscale.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
)
from microscale.serve.streaming import DeltaTracker, sse_stream, start_requests, usage
from microscale.serve.tool_parsers import ToolParser


def _logprobs(token_ids: list[int], entries: SampleLogprobs, top_n: int) -> ChoiceLogprobs:
    content = []
    for token, entry in zip(token_ids, entries):
        chosen = entry[token]
        top = sorted((e for e in entry.values() if e.rank <= top_n), key=lambda e: e.rank)
        content.append(TokenLogprob(
            token=chosen.decoded_token or "", logprob=chosen.logprob, bytes=list((chosen.decoded_token or "").encode()),
            top_logprobs=[TopLogprob(token=e.decoded_token or "", logprob=e.logprob,
                                     bytes=list((e.decoded_token or "").encode())) for e in top],
        ))
    return ChoiceLogprobs(content=content)


async def create_chat_completion(
    engine: AsyncEngine, model: str, body: ChatCompletionRequest, tool_family: type[ToolParser] | None = None,
) -> JSONResponse | StreamingResponse:
    """`tool_family`: the model's tool-call format (--tool-call-parser, else the chat template's)."""
    inputs = engine.inputs
    tools = RequestTools.from_request(body, tool_family)
    messages = template_messages(body.messages)
    try:
        text = await off_loop(inputs.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                              tools=tools.template_tools())
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    # The template already holds any BOS token it wants.
    ids = await off_loop(inputs.tokenizer.encode, text, add_special_tokens=False)
    prompt = {"prompt": text, "prompt_token_ids": ids}
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = await sampling_params(inputs, body, max_tokens, None, top_n, tools.constraint())
    check_prompt(inputs, prompt["prompt_token_ids"], params, "messages")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    outputs = start_requests(engine, request_id, [prompt], params)
    created = int(time.time())
    prompt_tokens = len(prompt["prompt_token_ids"])
    tracker = DeltaTracker(params.n)
    read = tools.reader(inputs.tokenizer)

    def logprobs(token_ids: list[int], entries: SampleLogprobs | None) -> ChoiceLogprobs | None:
        return None if top_n is None else _logprobs(token_ids, entries or [], top_n)

    if body.stream:
        replies = ReplyDeltas(read)

        async def chunks() -> AsyncIterator[str]:
            def chunk(choices: list[ChatChunkChoice], **extra) -> str:
                return ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices,
                                           **extra).model_dump_json()

            # OpenAI opens each choice with its role and an empty content.
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(params.n)])
            async for _, output in outputs:
                for d in tracker.deltas(0, output):
                    choice = next(c for c in output.outputs if c.index == d.index)
                    finished = d.finish_reason is not None
                    delta = replies.delta(d.index, choice.text, choice.token_ids, finished)
                    yield chunk([ChatChunkChoice(
                        index=d.index, delta=delta, logprobs=logprobs(d.token_ids, d.logprobs),
                        finish_reason=finish_reason(d.finish_reason, replies.has_tool_calls(d.index)),
                    )])
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], usage=usage(prompt_tokens, tracker.completion_tokens))

        return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")

    final = None
    async with aclosing(outputs):  # cancelled (the client left): the requests are aborted at once
        async for _, output in outputs:
            final = output
    choices = []
    for c in final.outputs:
        reply = read(c.text, c.token_ids, True)
        choices.append(ChatChoice(index=c.index, message=assistant_message(reply),
                                  logprobs=logprobs(c.token_ids, c.logprobs),
                                  finish_reason=finish_reason(c.finish_reason, bool(reply.tool_calls))))
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    response = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                      usage=usage(prompt_tokens, completion_tokens))
    return JSONResponse(response.model_dump())
