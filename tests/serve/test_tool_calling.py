"""Tool calling through the official openai client, on tiny models of two families: a random Qwen2 with Qwen2.5's
Hermes template, and models/tiny-gptoss-harmony (trained to speak harmony). Forced calls always validate, the
harmony model calls a tool by itself under "auto", streams equal whole replies, conversations with calls and results
render, and bad tool requests are 400s that name the field."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from conftest import REPO
from live_server import running_server
from tool_models import hermes_model

from microscale.tokenizer import Tokenizer

pytest_plugins = ["live_server"]  # the server fixtures

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "boolean"}},
       "required": ["a", "b"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
HARMONY_MODEL = REPO / "models" / "tiny-gptoss-harmony"


@pytest.fixture(scope="module", params=["hermes", "harmony"])
def tool_server(request, tmp_path_factory):
    model = hermes_model(tmp_path_factory.mktemp("hermes")) if request.param == "hermes" else HARMONY_MODEL
    with running_server(model) as server:
        server.family, server.path = request.param, model
        yield server


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_required_calls_always_validate(tool_server) -> None:
    # One call per reply: after it the grammar allows only the end, where a random model might add calls forever.
    client = tool_server.async_client()

    async def one(seed: int):
        return await client.chat.completions.create(
            model=tool_server.model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
            seed=seed, max_tokens=96, parallel_tool_calls=False)

    async def run_all():
        return await asyncio.gather(*(one(seed) for seed in range(50)))

    for response in asyncio.run(run_all()):
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_choice_and_single_call(tool_server) -> None:
    client = tool_server.client()
    for seed in range(4):
        response = client.chat.completions.create(
            model=tool_server.model, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=96,
            tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
        calls = _calls(response.choices[0].message)
        assert len(calls) == 1 and calls[0][0] == "add"
        jsonschema.validate(calls[0][1], ADD)


def test_the_harmony_model_calls_a_tool_by_itself(tool_server) -> None:
    if tool_server.family != "harmony":
        pytest.skip("the random Hermes model has learned nothing")
    message = tool_server.client().chat.completions.create(
        model=tool_server.model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=128).choices[0]
    assert message.finish_reason == "tool_calls" and message.message.reasoning_content
    [(name, arguments)] = _calls(message.message)
    assert name == "get_weather" and isinstance(arguments, dict)


def _streamed(client, **request) -> tuple[str, list[tuple[str, str]], str]:
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.id:
                    calls.append([call.function.name, ""])
                calls[call.index][1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [tuple(c) for c in calls], finish


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_equals_whole(tool_server, tool_choice) -> None:
    client = tool_server.client()
    request = dict(model=tool_server.model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0,
                   max_tokens=64)
    whole = client.chat.completions.create(**request).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert _streamed(client, **request) == (whole.message.content or "", calls, whole.finish_reason)


def test_a_conversation_with_calls_and_results(tool_server) -> None:
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
    ]
    response = tool_server.client().chat.completions.create(model=tool_server.model, messages=messages, tools=TOOLS,
                                                            max_tokens=8)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The prompt is the template's render of the call (arguments as an object) and of its result.
    tokenizer = Tokenizer.from_pretrained(tool_server.path)
    call = messages[1]["tool_calls"][0]
    rendered = [*ASK, {"role": "assistant", "tool_calls": [{**call, "function": {
        "name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}]}, {**messages[2]}]
    prompt = tokenizer.apply_chat_template(rendered, tools=TOOLS)
    assert "temperature" in prompt and "Oslo" in prompt
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))


@pytest.mark.parametrize(("change", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "f",
                                                  "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_9", "content": "3"}]}, "messages[1].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400s(tool_server, change, param) -> None:
    request = {"model": tool_server.model, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **change}
    request = {k: v for k, v in request.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as raised:
        tool_server.client().chat.completions.create(**request)
    assert raised.value.status_code == 400 and raised.value.body["param"] == param


def test_llm_chat_renders_tools(tmp_path) -> None:
    from microscale import LLM, SamplingParams

    llm = LLM(str(hermes_model(tmp_path)), dtype="float32", max_model_len=512)
    (out,) = llm.chat(ASK, SamplingParams(max_tokens=2), use_tqdm=False, tools=TOOLS)
    assert out.prompt == llm.get_tokenizer().apply_chat_template(ASK, True, tools=TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in out.prompt
