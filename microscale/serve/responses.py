"""POST /v1/responses (OpenAI's Responses API) over the chat template: the conversation (a stored response's
input and output items when previous_response_id names one, then this request's input items) becomes chat
messages, function calls and their outputs included; the reply, read by the model family's tool-call parser as chat
reads it, becomes output items (a reasoning item for gpt-oss's analysis channel, the message, a function_call item
per call), streamed as Responses events or returned whole, and stored if asked. tools and tool_choice mean what they
mean on chat (chat_tools.py): "required" or a named function constrains decoding to calls."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from microscale.outputs import RequestOutput
from microscale.serve.async_engine import AsyncEngine, EngineDeadError
from microscale.serve.chat_tools import RequestTools
from microscale.serve.errors import APIError
from microscale.serve.limits import ServeLimits
from microscale.serve.params import check_prompt, off_loop, sampling_params
from microscale.serve.protocol import JsonSchemaFormat, ResponseFormat, SamplingRequest
from microscale.serve.response_events import ReplyPart, ResponseEvents, output_items, reply_parts
from microscale.serve.response_store import ResponseStore
from microscale.serve.responses_protocol import (
    INPUT_ITEMS,
    FunctionCallItem,
    IncompleteDetails,
    InputItem,
    InputMessage,
    InputTokensDetails,
    OutputTokensDetails,
    ReasoningItem,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from microscale.serve.streaming import start_requests
from microscale.serve.tool_parsers import ToolParser, template_arguments
from microscale.serve.validation import check_prompt_chars
from microscale.tokenizer import Tokenizer


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param, error_type="invalid_request_error")


def _conversation(body: ResponsesRequest, store: ResponseStore) -> list[InputItem]:
    """Earlier turns (instructions are not carried over, as OpenAI does), then this request's input."""
    items: list[InputItem] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           "previous_response_id", "previous_response_not_found", error_type="invalid_request_error")
        items = previous.conversation()
    return items + body.input_items()


def chat_messages(instructions: str | None, items: list[InputItem]) -> list[dict[str, Any]]:
    """The conversation as chat-completions messages: consecutive function calls are one assistant message's
    tool_calls, each output a `tool` message, a reasoning item the `reasoning_content` of the assistant turn after
    it. A function_call_output must answer a call made before it."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    calls: set[str] = set()
    reasoning = ""
    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning += item.text()
            continue
        if isinstance(item, InputMessage):
            message = {"role": "system" if item.role == "developer" else item.role, "content": item.text()}
        elif isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": template_arguments(item.arguments)}}
            last = messages[-1] if messages else {}
            if last.get("tool_calls") and not reasoning:
                last["tool_calls"].append(call)
                continue
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
        else:
            if item.call_id not in calls:
                raise APIError(400, f"No tool call found for function call output with call_id {item.call_id}.",
                               "input")
            message = {"role": "tool", "tool_call_id": item.call_id, "content": item.text()}
        if message["role"] == "assistant" and reasoning:
            message["reasoning_content"] = reasoning
        if message["role"] != "tool":
            reasoning = ""  # reasoning belongs to the assistant turn right after it
        messages.append(message)
    if not any(m["role"] != "system" for m in messages):
        raise APIError(400, "input must hold at least one message or item.", "input")
    return messages


def _prompt_chars(instructions: str | None, items: list[InputItem]) -> int:
    def chars(item: InputItem) -> int:
        if isinstance(item, FunctionCallItem):
            return len(item.name) + len(item.arguments)
        return len(item.text())

    return len(instructions or "") + sum(chars(item) for item in items)


def _sampling_request(body: ResponsesRequest) -> SamplingRequest:
    """text.format as chat's response_format (the structured outputs it maps to)."""
    fmt = body.text.format
    response_format = None
    if fmt.type == "json_object":
        response_format = ResponseFormat(type="json_object")
    elif fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format of type json_schema needs its schema.", "text.format.schema")
        response_format = ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
            name=fmt.name or "response", schema=fmt.schema_, strict=fmt.strict))
    return SamplingRequest(temperature=body.temperature, top_p=body.top_p, response_format=response_format)


async def _prompt(
    tokenizer: Tokenizer, body: ResponsesRequest, items: list[InputItem], tools: RequestTools
) -> dict[str, Any]:
    messages = chat_messages(body.instructions, items)
    template_kwargs: dict[str, Any] = {"tools": tools.template_tools()}
    if body.reasoning is not None and body.reasoning.effort is not None:
        template_kwargs["reasoning_effort"] = body.reasoning.effort  # gpt-oss's template reads it
    try:
        text = await off_loop(tokenizer.apply_chat_template, messages, add_generation_prompt=True, **template_kwargs)
    except (ValueError, TypeError) as e:  # a template that cannot render this conversation
        raise APIError(400, f"The conversation cannot be rendered by this model's chat template: {e}",
                       "input") from None
    return {"prompt": text, "prompt_token_ids": await off_loop(tokenizer.encode, text, add_special_tokens=False)}


def _reasoning_tokens(tokenizer: Tokenizer, parts: list[ReplyPart]) -> int:
    """The reasoning text's length in tokens (re-encoded: the parsers read decoded text)."""
    reasoning = "".join(p.text for p in parts if p.kind == "reasoning")
    return len(tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0


async def create_response(
    engine: AsyncEngine, model: str, body: ResponsesRequest, store: ResponseStore, limits: ServeLimits,
    tool_family: type[ToolParser] | None = None,
) -> JSONResponse | StreamingResponse:
    """`tool_family`: the model's tool-call format (--tool-call-parser, else the chat template's)."""
    inputs = engine.inputs
    if body.background:
        raise APIError(400, "background responses are not supported by this server.", "background",
                       "unsupported_parameter")
    tools = RequestTools.build([t.as_chat_tool() for t in body.tools], body.tool_choice_name(),
                               body.parallel_tool_calls, tool_family)
    items = _conversation(body, store)
    check_prompt_chars(_prompt_chars(body.instructions, items), limits, "input", what="input")
    prompt = await _prompt(inputs.tokenizer, body, items, tools)
    try:
        params = await sampling_params(inputs, _sampling_request(body), body.max_output_tokens, None, None,
                                       tools.constraint())
    except APIError as e:
        if e.param in ("response_format", "structured_outputs"):
            e.param = "text.format"
        raise
    check_prompt(inputs, prompt["prompt_token_ids"], params, "input")
    response_hex = uuid.uuid4().hex
    response = ResponseObject(
        id=f"resp_{response_hex}", created_at=int(time.time()), status="in_progress", model=model,
        instructions=body.instructions, max_output_tokens=body.max_output_tokens, metadata=body.metadata or {},
        parallel_tool_calls=body.parallel_tool_calls, previous_response_id=body.previous_response_id,
        reasoning=body.reasoning, store=body.store, temperature=body.temperature, text=body.text,
        tool_choice=body.tool_choice or "auto", tools=body.tools, top_p=body.top_p, user=body.user,
    )
    outputs = start_requests(engine, response.id, [prompt], params)
    read = tools.reader(inputs.tokenizer)

    def parts(output: RequestOutput) -> list[ReplyPart]:
        completion = output.outputs[0]
        finished = completion.finish_reason is not None
        return reply_parts(read(completion.text, completion.token_ids, finished), finished)

    def finish(output: RequestOutput, final_parts: list[ReplyPart]) -> ResponseObject:
        """The response once the reply is done; stored with its conversation if asked."""
        completion = output.outputs[0]
        incomplete = completion.finish_reason == "length"
        done = response.model_copy(update=dict(
            status="incomplete" if incomplete else "completed", completed_at=int(time.time()),
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            output=output_items(final_parts, response_hex, incomplete),
            usage=ResponseUsage(
                input_tokens=len(output.prompt_token_ids),
                input_tokens_details=InputTokensDetails(cached_tokens=output.num_cached_tokens),
                output_tokens=len(completion.token_ids),
                output_tokens_details=OutputTokensDetails(
                    reasoning_tokens=_reasoning_tokens(inputs.tokenizer, final_parts)),
                total_tokens=len(output.prompt_token_ids) + len(completion.token_ids),
            ),
        ))
        if body.store:
            answered = INPUT_ITEMS.validate_python([item.model_dump(mode="json") for item in done.output])
            store.put(done.id, done.model_dump_json(by_alias=True).encode(), items + answered)
        return done

    if body.stream:
        events = ResponseEvents(response_hex)

        async def stream() -> AsyncIterator[str]:
            try:
                yield events.lifecycle("response.created", response)
                yield events.lifecycle("response.in_progress", response)
                final = None
                async with aclosing(outputs):
                    async for _, output in outputs:
                        for event in events.update(parts(output)):
                            yield event
                        final = output
                final_parts = parts(final)
                done = finish(final, final_parts)
                for event in events.finish(final_parts, done.output):
                    yield event
                yield events.lifecycle(f"response.{done.status}", done)
            except APIError as e:  # RequestFailedError: the engine failed on this request alone
                yield events.event("error", code=e.code, message=e.message, param=e.param)
            except (EngineDeadError, ValueError) as e:
                yield events.event("error", code=None, message=str(e), param=None)

        return StreamingResponse(stream(), media_type="text/event-stream")

    final = None
    async with aclosing(outputs):  # cancelled (the client left): the request is aborted at once
        async for _, output in outputs:
            final = output
    return JSONResponse(finish(final, parts(final)).dump())
