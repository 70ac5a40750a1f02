"""The Responses API through the official openai client against a live server: responses.create / stream /
retrieve / delete, every event and object validated by the client's own types, streamed == non-streamed, a
function-call loop carried by previous_response_id, bad input as OpenAI-style 4xx, and the store's bounds. gpt-oss
reasoning items from harmony replies, token by token, on a tokenizer with harmony's markers."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from test_tool_parsers import HARMONY_REPLIES, harmony_tokenizer  # noqa: F401 (a fixture)

from microscale.serve.response_events import ResponseEvents, output_items
from microscale.serve.response_store import ResponseStore
from microscale.serve.responses import _Reply, chat_messages
from microscale.serve.responses_protocol import INPUT_ITEMS, InputMessage, ResponseObject

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
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}


def _without_ids(response: dict) -> dict:
    """What two runs of the same request share: all but ids, times and prefix-cache hits."""
    fields = {k: v for k, v in response.items() if k not in ("id", "created_at", "completed_at")}
    fields["output"] = [{k: v for k, v in item.items() if k != "id"} for item in response["output"]]
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


def test_function_call_loop_through_previous_response_id(server):
    """Turn 1 holds a function call; turn 2 answers it by call_id through previous_response_id alone: its prompt
    is exactly the whole conversation sent inline (function call and output included)."""
    client = server.client()
    kwargs = dict(model=server.model, tools=[TOOL], max_output_tokens=8, temperature=0)
    first = client.responses.create(input=[{"role": "user", "content": "Weather in Paris?"}, CALL], **kwargs)
    result = {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear"}'}
    second = client.responses.create(previous_response_id=first.id, input=[result], **kwargs)
    assert second.previous_response_id == first.id
    inline = client.responses.create(input=[{"role": "user", "content": "Weather in Paris?"}, CALL,
                                            *[item.model_dump() for item in first.output], result], **kwargs)
    assert second.output_text == inline.output_text
    assert second.usage.input_tokens == inline.usage.input_tokens > first.usage.input_tokens
    third = client.responses.create(previous_response_id=second.id, input="Thanks.", **kwargs)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    with pytest.raises(openai.BadRequestError, match="call_2"):  # no call call_2 anywhere in the conversation
        client.responses.create(previous_response_id=second.id, input=[{**result, "call_id": "call_2"}], **kwargs)


@pytest.mark.parametrize("fields, status, param", [
    ({"previous_response_id": "resp_missing"}, 404, "previous_response_id"),
    ({"model": "other"}, 404, "model"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, 400, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "1"}]}, 400, "input"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
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


def test_conversation_renders_function_calls_through_the_gpt_oss_template(harmony_tokenizer):  # noqa: F811
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
    prompt = harmony_tokenizer.apply_chat_template(messages, tools=tools)
    assert "<|channel|>analysis<|message|>I should call the tool.<|end|>" in prompt
    assert '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}' in prompt
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"clear"<|end|>' in prompt


def test_harmony_reply_streams_a_reasoning_item_then_the_message(harmony_tokenizer):  # noqa: F811
    """Token by token, as a stream: the events validate, their deltas add up to the final items (reasoning first)."""
    ids = harmony_tokenizer.encode(HARMONY_REPLIES["final"], add_special_tokens=False)
    reply, events = _Reply(harmony_tokenizer), ResponseEvents("abc")

    class Output:  # the fields of CompletionOutput the reply reads
        def __init__(self, n: int) -> None:
            self.token_ids, self.text = ids[:n], harmony_tokenizer.decode(ids[:n])
            self.finish_reason = "stop" if n == len(ids) else None

    sent = [e for n in range(1, len(ids) + 1) for e in events.update(reply.parts(Output(n)))]
    parts = reply.parts(Output(len(ids)))
    items = output_items(parts, "abc", incomplete=False)
    sent += events.finish(items)
    payloads = [json.loads(e.split("data: ", 1)[1]) for e in sent]
    for payload in payloads:
        EVENTS.validate_python(payload)
    assert [item.type for item in items] == ["reasoning", "message"]
    assert items[0].content[0].text == "The user wants a sum: 2 + 2 = 4, naïvely."
    assert items[1].content[0].text == "It is 4 — ünïcödé too."
    reasoning = "".join(p["delta"] for p in payloads if p["type"] == "response.reasoning_text.delta")
    content = "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta")
    assert (reasoning, content) == (items[0].content[0].text, items[1].content[0].text)
    kinds = [p["type"] for p in payloads]
    assert kinds.index("response.output_item.done") < kinds.index("response.output_text.delta")  # one item at a time
    done = [p["item"] for p in payloads if p["type"] == "response.output_item.done"]
    assert done == [item.model_dump(mode="json") for item in items]
    assert reply.reasoning_tokens(parts) > 0
    response = ResponseObject(id="resp_abc", created_at=0, status="completed", model="m", parallel_tool_calls=True,
                              store=True, text={}, tool_choice="auto", tools=[], output=items)
    assert Response.model_validate(response.dump()).output_text == items[1].content[0].text
