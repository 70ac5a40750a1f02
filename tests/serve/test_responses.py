"""The Responses API through the official openai client against live servers (the bundled tiny models: pycode
llama, and gpt-oss fine-tuned to speak harmony): responses.create / stream / retrieve / delete, every event and
object validated by the client's own types, streamed == non-streamed, reasoning and function_call items from the
model itself, a function-call loop carried by previous_response_id, bad input as OpenAI-style 4xx, the store's
bounds, and harmony replies streamed token by token."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from live_server import running_server
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from microscale.serve.response_events import ResponseEvents, output_items, reply_parts
from microscale.serve.response_store import ResponseStore
from microscale.serve.responses import chat_messages
from microscale.serve.responses_protocol import INPUT_ITEMS, InputMessage, ResponseObject
from microscale.serve.tool_parsers import reply_parser
from microscale.serve.tool_parsers.harmony import HarmonyParser

pytest_plugins = ["live_server"]  # the server fixtures

EVENTS = TypeAdapter(ResponseStreamEvent)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_FORMAT = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"], "additionalProperties": False}}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
HARMONY_REPLIES = {
    "reasoning, message": ("<|channel|>analysis<|message|>The user wants a sum: 2 + 2 = 4, naïvely.<|end|>"
                           "<|start|>assistant<|channel|>final<|message|>It is 4 — ünïcödé too.<|return|>"),
    "reasoning, preamble, call": ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
                                  "<|channel|>commentary<|message|>Let me check — ü.<|end|><|start|>assistant"
                                  "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                                  '{"city": "Zürich"}<|call|>'),
}


ADD = {"type": "function", "name": "add", "description": "Add two numbers.",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                       "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                      "required": ["a", "b"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def harmony_server(pytestconfig):
    with running_server(pytestconfig.rootpath / "models" / "tiny-gptoss-harmony") as server:
        yield server


def _without_ids(response: dict) -> dict:
    """What two runs of the same request share: all but ids, times and prefix-cache hits."""
    fields = {k: v for k, v in response.items() if k not in ("id", "created_at", "completed_at")}
    fields["output"] = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]
    fields["usage"] = {**response["usage"], "input_tokens_details": None}
    return fields


def _raw_events(server, **request) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/v1/responses", json={**request, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {server.api_key}"}) as stream:
        return [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]


def test_create_equals_chat_and_parses_as_openai_types(server):
    client = server.client()
    chat = client.chat.completions.create(model=server.model, max_tokens=16, temperature=0, messages=[
        {"role": "system", "content": "You write Python."}, {"role": "user", "content": "import os"}])
    raw = client.responses.with_raw_response.create(model=server.model, instructions="You write Python.",
                                                    input="import os", max_output_tokens=16, temperature=0,
                                                    metadata={"run": "1"})
    Response.model_validate(raw.http_response.json(), strict=False)
    out = raw.parse()
    assert out.output_text == chat.choices[0].message.content
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in out.output] == ["message"] and out.output[0].status == "incomplete"
    assert out.usage.input_tokens == chat.usage.prompt_tokens and out.usage.output_tokens == 16
    assert out.usage.total_tokens == out.usage.input_tokens + 16
    assert out.usage.output_tokens_details.reasoning_tokens == 0
    assert out.metadata == {"run": "1"} and out.instructions == "You write Python." and out.max_output_tokens == 16
    parts = client.responses.create(model=server.model, max_output_tokens=16, temperature=0, input=[
        {"role": "developer", "content": [{"type": "input_text", "text": "You write "}, {"type": "input_text",
                                                                                         "text": "Python."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "import os"}]}])
    assert parts.output_text == out.output_text  # developer messages are system messages, as on chat


def test_stream_events_in_order_and_equal_to_non_streamed(server):
    request = dict(model=server.model, input="def fibonacci(n):", max_output_tokens=12, temperature=0)
    whole = server.client().responses.with_raw_response.create(**request).http_response.json()
    events = _raw_events(server, **request)
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == \
        final["output"][0]["content"][0]["text"]
    assert events[-2]["item"] == final["output"][0]
    assert _without_ids(final) == _without_ids(whole)


def test_stream_helper_with_json_schema(server):
    client = server.client()
    request = dict(model=server.model, input="import os", temperature=0, max_output_tokens=64, text=JSON_FORMAT)
    whole = client.responses.create(**request)
    with client.responses.stream(**request) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.incomplete_details is None
    assert "".join(deltas) == final.output_text == whole.output_text
    jsonschema.validate(json.loads(final.output_text), SCHEMA)
    assert final.text.format.type == "json_schema" and final.text.format.name == "person"
    assert client.responses.retrieve(whole.id).text.format.schema_ == SCHEMA
    assert final.usage.output_tokens == whole.usage.output_tokens and final.output[0].status == "completed"


def test_retrieve_delete_cancel(server):
    client = server.client()
    out = client.responses.create(model=server.model, input="import os", max_output_tokens=4, temperature=0)
    assert client.responses.retrieve(out.id) == out
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(out.id)
    deleted = httpx.delete(f"{server.url}/v1/responses/{out.id}",
                           headers={"Authorization": f"Bearer {server.api_key}"})
    assert deleted.json() == {"id": out.id, "object": "response.deleted", "deleted": True}
    for call in (client.responses.retrieve, client.responses.delete, client.responses.cancel):
        with pytest.raises(openai.NotFoundError) as caught:
            call(out.id)
        error = caught.value.body
        assert error["type"] == "invalid_request_error" and out.id in error["message"]
    unstored = client.responses.create(model=server.model, input="import os", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("question, kinds", [
    ("What is 2 + 3?", ["reasoning", "message"]),
    ("What is the weather in Paris?", ["reasoning", "function_call"]),
])
def test_gpt_oss_reasoning_and_calls_streamed_equal_whole(harmony_server, question, kinds):
    """gpt-oss answers or calls a tool by itself (tool_choice auto); the stream's items come one after the other,
    each with its own events, and its final response is the non-streamed one."""
    request = dict(model=harmony_server.model, input=question, tools=[TOOL, ADD], temperature=0,
                   max_output_tokens=150)
    whole = harmony_server.client().responses.with_raw_response.create(**request).http_response.json()
    assert whole["status"] == "completed" and [item["type"] for item in whole["output"]] == kinds
    assert 0 < whole["usage"]["output_tokens_details"]["reasoning_tokens"] < whole["usage"]["output_tokens"]
    events = _raw_events(harmony_server, **request)
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = {"reasoning": ["response.reasoning_text.delta"], "message": ["response.output_text.delta"],
              "function_call": ["response.function_call_arguments.delta"]}
    expected = ["response.created", "response.in_progress"]
    for kind in kinds:
        if kind == "function_call":
            expected += ["response.output_item.added", *deltas[kind], "response.function_call_arguments.done",
                         "response.output_item.done"]
        else:
            expected += ["response.output_item.added", "response.content_part.added", *deltas[kind],
                         deltas[kind][0].replace("delta", "done"), "response.content_part.done",
                         "response.output_item.done"]
    expected.append("response.completed")
    kinds_sent = [e["type"] for e in events]
    assert [k for i, k in enumerate(kinds_sent) if k != kinds_sent[i - 1] or not k.endswith("delta")] == expected
    final = events[-1]["response"]
    for index, item in enumerate(final["output"]):
        text = item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"]
        assert "".join(e["delta"] for e in events if e.get("output_index") == index and "delta" in e) == text
    assert _without_ids(final) == _without_ids(whole)


def test_function_call_loop_through_previous_response_id(harmony_server):
    """gpt-oss calls the tool by itself; turn 2 answers the call by its call_id through previous_response_id alone,
    and its prompt is exactly the whole conversation sent inline (the function call and its output included)."""
    client, model = harmony_server.client(), harmony_server.model
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model=model, tools=[TOOL], temperature=0, max_output_tokens=150)
    first = client.responses.create(input=ask, **kwargs)
    assert first.status == "completed" and [item.type for item in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    assert client.responses.retrieve(first.id) == first
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}
    second = client.responses.create(previous_response_id=first.id, input=[result], **kwargs)
    inline = client.responses.create(input=[*ask, *[item.to_dict() for item in first.output], result], **kwargs)
    assert second.previous_response_id == first.id and second.status == "completed"
    assert [item.type for item in second.output] == ["reasoning", "message"] and second.output_text
    assert _without_ids(second.model_dump(mode="json"))["output"] == _without_ids(inline.model_dump(mode="json"))[
        "output"]
    assert second.usage.input_tokens == inline.usage.input_tokens > first.usage.input_tokens
    thanks, short = {"role": "user", "content": "Thanks."}, {**kwargs, "max_output_tokens": 4}
    third = client.responses.create(previous_response_id=second.id, input=[thanks], **short)
    third_inline = client.responses.create(input=[*ask, *[item.to_dict() for item in first.output], result,
                                                  *[item.to_dict() for item in second.output], thanks], **short)
    assert third.usage.input_tokens == third_inline.usage.input_tokens
    with pytest.raises(openai.BadRequestError, match="call_2"):  # no call call_2 anywhere in the conversation
        client.responses.create(previous_response_id=second.id, input=[{**result, "call_id": "call_2"}], **kwargs)


def test_named_tool_choice_forces_a_valid_call(harmony_server):
    """tool_choice naming a function constrains decoding to a call of it, even where the model would not call it;
    the stream helper assembles the same call."""
    client = harmony_server.client()
    request = dict(model=harmony_server.model, input="What is the weather in Paris?", tools=[TOOL, ADD],
                   tool_choice={"type": "function", "name": "add"}, temperature=0, max_output_tokens=64)
    whole = client.responses.create(**request)
    assert [(item.type, item.name) for item in whole.output] == [("function_call", "add")]
    jsonschema.validate(json.loads(whole.output[0].arguments), ADD["parameters"])
    assert whole.tool_choice.name == "add"
    with client.responses.stream(**request) as stream:
        helper = stream.get_final_response()
    assert [(c.name, c.arguments) for c in helper.output] == [("add", whole.output[0].arguments)]
    with pytest.raises(openai.BadRequestError) as caught:  # a forced call cannot also be JSON text
        client.responses.create(**{**request, "text": JSON_FORMAT})
    assert caught.value.body["param"] == "tool_choice"


@pytest.mark.parametrize("fields, status, param", [
    ({"previous_response_id": "resp_missing"}, 404, "previous_response_id"),
    ({"model": "other"}, 404, "model"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, 400, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "1"}]}, 400, "input"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"tools": [TOOL]}, 400, "tools"),  # the bundled model's template writes no tool-call format
    ({"tools": [{**TOOL, "name": "no spaces"}]}, 400, "tools.0.name"),
    ({"tools": [{"type": "web_search"}]}, 400, None),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, None),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400, None),
    ({"input": []}, 400, "input"),
    ({"background": True}, 400, "background"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
    ({"temperature": -1}, 400, "temperature"),
])
def test_bad_input_is_an_openai_style_4xx(server, fields, status, param):
    body = {"model": server.model, "input": "import os", "max_output_tokens": 2, **fields}
    reply = httpx.post(f"{server.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {server.api_key}"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    if param is not None:
        assert error["param"] == param
    if "previous_response_id" in fields:
        assert error == {"message": "Previous response with id 'resp_missing' not found.",
                         "type": "invalid_request_error", "param": "previous_response_id",
                         "code": "previous_response_not_found"}


def test_store_is_bounded_in_entries_and_bytes():
    items = [InputMessage(role="user", content="x" * 100)]
    store = ResponseStore(max_responses=3, max_bytes=10_000)
    for i in range(4):
        store.put(f"r{i}", b"{}", items)
    assert len(store) == 3 and store.get("r0") is None  # the least recently used went first
    store.get("r1")  # now the most recent
    store.put("r4", b"{}", items)
    assert store.get("r2") is None and store.get("r1") is not None
    assert store.bytes == sum(store.get(k).size for k in ("r1", "r3", "r4"))
    store.put("big", b"{}", [InputMessage(role="user", content="x" * 20_000)])
    assert store.get("big") is None and len(store) == 3  # larger than the whole bound: not stored, nothing evicted
    small = ResponseStore(max_responses=100, max_bytes=3 * store.get("r1").size)
    for i in range(5):
        small.put(f"r{i}", b"{}", items)
    assert len(small) == 3 and small.bytes <= small.max_bytes
    assert small.delete("r4") and not small.delete("r4") and len(small) == 2
    assert small.get("r3").conversation() == items


def test_conversation_renders_function_calls_through_the_gpt_oss_template(harmony_server):
    items = INPUT_ITEMS.validate_python([
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "I should call the tool."}]},
        CALL,
        {"type": "function_call_output", "call_id": "call_1", "output": "clear"},
    ])
    messages = chat_messages("Be brief.", items)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "clear"},
    ]
    tools = [{"type": "function", "function": {k: TOOL[k] for k in ("name", "description", "parameters")}}]
    prompt = harmony_server.engine.inputs.tokenizer.apply_chat_template(messages, tools=tools)
    assert "<|channel|>analysis<|message|>I should call the tool.<|end|>" in prompt
    assert '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}' in prompt
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"clear"<|end|>' in prompt


@pytest.mark.parametrize("name", HARMONY_REPLIES)
def test_harmony_replies_stream_their_items_token_by_token(harmony_server, name):
    """Each reply cut at every token boundary, as a stream: the events validate, each item's deltas add up to the
    final item, items come one at a time in output order (reasoning, message, calls)."""
    tokenizer = harmony_server.engine.inputs.tokenizer
    parser = reply_parser(tokenizer, HarmonyParser, with_tools=True)
    ids = tokenizer.encode(HARMONY_REPLIES[name], add_special_tokens=False)

    def parts(n: int):
        return reply_parts(parser.parse(tokenizer.decode(ids[:n]), ids[:n], n == len(ids)), n == len(ids))

    events = ResponseEvents("abc")
    sent = [e for n in range(1, len(ids) + 1) for e in events.update(parts(n))]
    final = parts(len(ids))
    items = output_items(final, "abc", incomplete=False)
    sent += events.finish(final, items)
    payloads = [json.loads(e.split("data: ", 1)[1]) for e in sent]
    for payload in payloads:
        EVENTS.validate_python(payload)
    assert ", ".join(item.type for item in items).replace("function_call", "call") == name.replace("preamble",
                                                                                                    "message")
    texts = [item.arguments if item.type == "function_call" else item.content[0].text for item in items]
    for index, text in enumerate(texts):
        assert "".join(p["delta"] for p in payloads if p.get("output_index") == index and "delta" in p) == text
    assert [p["item"] for p in payloads if p["type"] == "response.output_item.done"] == \
        [item.model_dump(mode="json") for item in items]
    opened = [p["output_index"] for p in payloads if p["type"] == "response.output_item.added"]
    closed = [p["output_index"] for p in payloads if p["type"] == "response.output_item.done"]
    assert opened == closed == list(range(len(items)))
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    response = ResponseObject(id="resp_abc", created_at=0, status="completed", model="m", parallel_tool_calls=True,
                              store=True, text={}, tool_choice="auto", tools=[], output=items)
    assert Response.model_validate(response.dump()).output_text == (texts[1] if len(texts) > 1 else "")
