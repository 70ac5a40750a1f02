"""The official openai client against a live server: the same text as LLM.generate / LLM.chat, streaming and
not, n=2, stop strings, seeds, logprobs, usage in the last stream chunk, 64 concurrent streams, structured
outputs (response_format, structured_outputs), models.retrieve and the embeddings 404; and vLLM's tokenizer
endpoints (plain HTTP) as lm-eval's remote tokenizer reads them."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from microscale import SamplingParams

pytest_plugins = ["live_server"]  # the server fixtures

PROMPT = "def fibonacci(n):"
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "import os"}]


def test_completion_equals_llm_generate(server, reference):
    expected = reference.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    out = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == expected.outputs[0].text
    assert out.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_equals_llm_chat_streamed_or_not(server, reference):
    expected = reference.chat(CHAT, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0].outputs[0]
    client = server.client()
    whole = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=server.model, messages=CHAT, max_completion_tokens=24,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n2_seed_and_stop(server):
    client = server.client()
    kwargs = dict(model=server.model, prompt="import ", max_tokens=32, temperature=1.0, n=2, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # siblings draw different samples
    stopped = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=64, temperature=0, stop=["\n"])
    assert "\n" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=64, temperature=0, stop="\n",
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_logprobs(server, reference):
    client = server.client()
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) >= 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    echoed = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                       echo=True)
    elp = echoed.choices[0].logprobs
    n_prompt = echoed.usage.prompt_tokens
    assert echoed.choices[0].text == PROMPT + out.choices[0].text
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(v <= 0 for v in elp.token_logprobs[1:n_prompt])
    assert elp.token_logprobs[n_prompt:] == lp.token_logprobs
    chat = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy picks the top token


def test_prompt_forms(server, reference):
    ids = reference.get_tokenizer().encode(PROMPT)
    client = server.client()
    by_text = client.completions.create(model=server.model, prompt=[PROMPT, "import os"], max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=8, temperature=0)
    by_id_lists = client.completions.create(model=server.model, prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.text for c in by_id_lists.choices] == [by_text.choices[0].text] * 2


def test_64_concurrent_streams_match_greedy(server, reference):
    prompts = [f"def function_{i}(x):\n    return x + {i}" for i in range(64)]
    expected = reference.generate(prompts, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)

    async def stream(client, prompt: str) -> str:
        chunks = await client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in chunks])

    async def run_all() -> list[str]:
        async with server.async_client() as client:
            return await asyncio.gather(*(stream(client, p) for p in prompts))

    texts = asyncio.run(run_all())
    assert texts == [o.outputs[0].text for o in expected]
    server.wait_idle()


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_response_format_json_schema_validates(server):
    """OpenAI's response_format on chat (streamed and not) and completions; vLLM's structured_outputs as an extra."""
    client = server.client()
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    texts = []
    for seed in range(4):
        out = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=64, temperature=1.0,
                                             seed=seed, response_format=response_format)
        assert out.choices[0].finish_reason == "stop"
        texts.append(out.choices[0].message.content)
    stream = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=64, temperature=1.0, seed=0,
                                            response_format=response_format, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == texts[0]
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=64, temperature=1.0, seed=5,
                                    extra_body={"response_format": response_format})
    texts.append(out.choices[0].text)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert out.choices[0].text in ("yes", "no")


def test_invalid_structured_outputs_are_a_400(server):
    client = server.client()
    bad = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "xml"}},
        {"extra_body": {"structured_outputs": {"regex": "[0-9"}}},
        {"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}},
        {"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"choice": ["a"]}}},
    ]
    for fields in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=4, **fields)
        assert caught.value.status_code == 400, fields
    assert client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=2).choices  # still serving


def test_a_grammar_past_the_compile_limit_is_a_400(server, monkeypatch):
    """A 3000-value enum needs more lexer fuel (or wall time) than 0.1 ms allows: a 400 naming the knob."""
    monkeypatch.setattr(server.engine.inputs, "structured_outputs_max_compile_ms", 0.1)
    schema = {"enum": [f"value-{i}" for i in range(3000)]}
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "costly", "schema": schema}})
    assert "structured_outputs_max_compile_ms" in caught.value.message
    assert caught.value.body["param"] == "structured_outputs"


# ---- models, embeddings, and vLLM's tokenizer endpoints ---------------------------------------------------------


def test_model_retrieve_and_embeddings_are_openai_404s(server):
    client = server.client()
    card = client.models.retrieve(server.model)
    assert (card.id, card.object, card.max_model_len) == (server.model, "model", 512)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("org/other-model")
    assert unknown.value.code == "model_not_found" and "'org/other-model' does not exist" in unknown.value.message
    with pytest.raises(openai.NotFoundError) as embeddings:
        client.embeddings.create(model=server.model, input="import os")
    assert "does not serve embeddings" in embeddings.value.message


def test_tokenize_and_detokenize_in_vllms_shapes(server):
    # As vLLM's, these routes sit outside /v1 and take no API key; lm-eval's remote tokenizer calls them.
    client, tokenizer = server.client(), server.engine.inputs.tokenizer
    prompt_tokens = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    chat_tokens = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=1).usage.prompt_tokens

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", json=body, timeout=60)  # a hang guard, not a deadline

    tokenized = post("/tokenize", {"model": server.model, "prompt": PROMPT, "return_token_strs": True}).json()
    assert tokenized.keys() == {"count", "max_model_len", "tokens", "token_strs"}
    assert tokenized["count"] == len(tokenized["tokens"]) == prompt_tokens and tokenized["max_model_len"] == 512
    assert tokenized["token_strs"] == [tokenizer.id_to_token(t) for t in tokenized["tokens"]]
    chat = post("/tokenize", {"messages": CHAT}).json()  # rendered as /v1/chat/completions renders it
    assert chat["count"] == chat_tokens and chat["token_strs"] is None
    special = tokenizer.encode(tokenizer.eos_token, add_special_tokens=False)
    assert post("/detokenize", {"tokens": special + tokenized["tokens"]}).json() == {
        "prompt": tokenizer.eos_token + PROMPT}  # special tokens kept: a round trip gives back what was tokenized
    for path, body, status, param in [("/tokenize", {"prompt": PROMPT, "messages": CHAT}, 400, None),
                                      ("/tokenize", {"prompt": PROMPT, "model": "other"}, 404, "model"),
                                      ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
                                      ("/detokenize", {"tokens": [-1]}, 400, "tokens.0")]:
        response = post(path, body)
        assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def test_tokenizer_info_is_what_lm_eval_reads(server):
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=60).json()
    tokenizer = server.engine.inputs.tokenizer
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template and info["tokenizer_class"]
    assert info["added_tokens_decoder"]["0"] == "<|endoftext|>"  # AddedToken objects as their text, as vLLM's
