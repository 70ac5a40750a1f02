"""Issue 16, front end: every request field has a domain checked before the tokenizer or the engine sees it,
every error is OpenAI-shaped with no internals, and a request's cost is bounded (body size, key before body,
body timeout, prompt length, tokenizing off the event loop). Each test here failed before those fixes."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
from urllib.parse import urlsplit

import httpx
import pytest

from microscale import SamplingParams

pytest_plugins = ["live_server"]  # the server fixtures

VOCAB = 4096  # tiny-llama-pycode
INT64_MAX = 2**63 - 1
SURROGATE = "a\ud800b"  # a lone UTF-16 surrogate: json.dumps sends it as the escape \ud800
GREEDY = {"max_tokens": 8, "temperature": 0}


# ---- helpers ------------------------------------------------------------------------------------------------


def _auth(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"}


def _post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {**_auth(server), "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60)


def _openai_error(response: httpx.Response, status: int | None = None) -> dict:
    """The error object of an OpenAI-shaped 4xx/5xx body, checked for leaked internals."""
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in error["message"] and "/" not in error["message"].replace("Bearer KEY", ""), error
    return error


def _completion(server, **fields) -> httpx.Response:
    return _post(server, "/v1/completions", {"prompt": "def add(a, b):", **GREEDY, **fields})


def _chat(server, **fields) -> httpx.Response:
    return _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **GREEDY, **fields})


def _raw(server, request: bytes) -> tuple[int, dict]:
    """Sends raw bytes on a new connection and reads the response (the server must answer without what was not
    sent); returns its status and JSON body."""
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed: {data!r}"
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[:_content_length(data)])


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def _post_head(server, length: int, headers: str = "") -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{headers}\r\n").encode()


# ---- SamplingParams (the Python API) --------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", 2**63), ("top_k", 2**70), ("seed", 2**63), ("seed", -(2**63) - 1), ("n", 2**64), ("max_tokens", 2**63),
    ("temperature", math.nan), ("temperature", math.inf), ("top_p", math.nan), ("min_p", math.nan),
    ("repetition_penalty", math.nan), ("repetition_penalty", math.inf), ("presence_penalty", math.nan),
    ("frequency_penalty", -math.inf), ("stop", ["a"] * 17), ("stop", "x" * 1025), ("stop_token_ids", [2**64]),
])
def test_sampling_params_reject_values_outside_their_domain(field, value):
    with pytest.raises(ValueError, match=field.split("_token_ids")[0]):
        SamplingParams(**{field: value})


def test_tiny_temperatures_are_greedy():
    assert SamplingParams(temperature=1e-45).greedy and SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(top_k=INT64_MAX, seed=-(2**63)).top_k == INT64_MAX  # int64's ends are fine


# ---- findings, one test each ---------------------------------------------------------------------------------


def test_poison_top_k_is_a_400_and_the_server_lives_on(server):
    for top_k in (2**63, 2**70):
        assert _openai_error(_completion(server, top_k=top_k, temperature=1), 400)["param"] == "top_k"
    assert _completion(server).status_code == 200
    assert _completion(server, top_k=INT64_MAX, temperature=1).status_code == 200  # top_k past the vocab: no top-k


@pytest.mark.parametrize("stream", [False, True])
def test_seed_outside_int64_is_a_400(server, stream):
    for seed in (2**63, 2**70, -(2**63) - 1):
        assert _openai_error(_completion(server, seed=seed, stream=stream), 400)["param"] == "seed"
    assert _completion(server, seed=INT64_MAX, temperature=1, stream=stream).status_code == 200


@pytest.mark.parametrize("ids", [[-1], [2**63], [2**70], [VOCAB], [5, VOCAB + 7], [[1, 2], [-5]]])
def test_prompt_token_ids_outside_the_vocabulary_are_a_400(server, ids):
    response = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 2})
    assert _openai_error(response, 400)["param"] == "prompt"


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": SURROGATE}),
    ("/v1/completions", {"prompt": ["ok", SURROGATE]}),
    ("/v1/completions", {"prompt": "ok", "stop": [SURROGATE]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok"}], "model": SURROGATE}),
])
def test_lone_surrogates_are_a_400(server, path, body):
    _openai_error(_post(server, path, body), 400)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"), ("temperature", "1e400"),
    ("repetition_penalty", "NaN"), ("top_p", "NaN"), ("min_p", "Infinity"), ("presence_penalty", "NaN"),
])
def test_non_finite_floats_are_a_400(server, field, value):
    # Python's json module reads NaN / Infinity (and 1e400 as inf), so they reach validation as floats.
    raw = f'{{"prompt": "hi", "max_tokens": 2, "{field}": {value}}}'
    assert _openai_error(_post(server, "/v1/completions", raw), 400)["param"] == field


def test_tiny_temperature_behaves_as_greedy(server):
    greedy = _completion(server).json()["choices"][0]["text"]
    tiny = _completion(server, temperature=1e-45, max_tokens=8).json()["choices"][0]["text"]
    assert tiny == greedy and tiny


def test_n_is_bounded(server):
    for n in (129, 20_000, 2**63):
        assert _openai_error(_completion(server, n=n), 400)["param"] == "n"
    assert len(_completion(server, n=3, max_tokens=1).json()["choices"]) == 3


def test_max_completion_tokens_zero_is_honoured(server):
    error = _openai_error(_chat(server, max_completion_tokens=0, max_tokens=5), 400)
    assert error["param"] == "max_completion_tokens"
    usage = _chat(server, max_completion_tokens=2, max_tokens=5, ignore_eos=True).json()["usage"]
    assert usage["completion_tokens"] == 2


@pytest.mark.parametrize(("path", "field", "value"), [
    (path, field, value) for path in ("/v1/completions", "/v1/chat/completions") for field, value in [
        ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
        ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
        ("logit_bias", {"50": 100}),
    ]
] + [("/v1/completions", "suffix", "}"), ("/v1/completions", "best_of", 3)])
def test_unsupported_fields_are_a_400_naming_them(server, path, field, value):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    error = _openai_error(_post(server, path, {**body, field: value}), 400)
    assert error["param"] == field and field in error["message"]


def test_fields_that_ask_for_nothing_are_accepted(server):
    nothing = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "logit_bias": {}}
    assert _chat(server, **nothing).status_code == 200
    assert _completion(server, **nothing, suffix="", best_of=1).status_code == 200


def test_oversized_body_is_a_413_before_it_is_sent(server):
    status, body = _raw(server, _post_head(server, 17 * 2**20, f"Authorization: Bearer {server.api_key}\r\n"))
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_api_key_is_checked_before_the_body_is_read(server):
    # 200 MB announced, none sent: a server that read the body before the key would wait for it.
    status, body = _raw(server, _post_head(server, 200 * 2**20))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _ = _raw(server, _post_head(server, 10**6, "Authorization: Bearer wrong\r\n") + b"{")
    assert status == 401


def test_ten_megabyte_prompt_is_refused_before_tokenizing(server, monkeypatch):
    calls = []
    tokenizer = server.engine.inputs.tokenizer
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(a) or [])
    error = _openai_error(_post(server, "/v1/completions", {"prompt": "x" * 10_000_000}), 400)
    assert error["param"] == "prompt" and calls == []
    error = _openai_error(_chat(server, messages=[{"role": "user", "content": "y" * 1_000_001}]), 400)
    assert error["param"] == "messages" and calls == []


def test_a_big_prompt_tokenizing_does_not_block_a_small_request(server, monkeypatch):
    """The big prompt's tokenization is held until the small request has been answered: on the event loop it
    would block that answer (and the order below would be reversed once the hold gave up)."""
    tokenizer = server.engine.inputs.tokenizer
    encode, started, release, order = tokenizer.encode, threading.Event(), threading.Event(), []

    def held_encode(text: str, *args, **kwargs):
        if text.startswith("BIG"):
            started.set()
            release.wait(300)  # only turns a hang into a failure
            order.append("big tokenized")
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", held_encode)
    big: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: big.append(_post(server, "/v1/completions",
                                                              {"prompt": "BIG " + "x " * 100, "max_tokens": 2})))
    thread.start()
    try:
        assert started.wait(300)
        assert _completion(server).status_code == 200
        order.append("small answered")
    finally:
        release.set()
        thread.join(300)
    assert order == ["small answered", "big tokenized"]
    assert big[0].status_code == 200


def test_unexpected_errors_are_a_generic_openai_500(server, monkeypatch):
    def broken(*_, **__):
        raise RuntimeError("boom in /secret/path/tokenizer.py")

    monkeypatch.setattr(server.engine.inputs.tokenizer, "encode", broken)
    error = _openai_error(_completion(server), 500)
    assert error["type"] == "server_error" and "boom" not in error["message"]


# ---- the body guard on its own (ASGI level: a body that never finishes, and one past the limit) ---------------


def _run_guard(receive_chunks, limits) -> tuple[list[dict], int]:
    """Runs RequestGuard around an app that must not be reached; returns what it sent and how many body
    messages it read."""
    from microscale.serve.guard import RequestGuard

    async def app(scope, receive, send):
        raise AssertionError("the app should not see this request")

    sent, reads = [], 0

    async def receive():
        nonlocal reads
        reads += 1
        return await receive_chunks()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(RequestGuard(app, limits).__call__(scope, receive, send))
    return sent, reads


def test_a_slow_body_times_out_with_a_408():
    from microscale.serve.limits import ServeLimits

    async def never():  # the client sent its headers and then nothing
        await asyncio.Event().wait()

    sent, _ = _run_guard(never, ServeLimits(body_timeout_s=0.01))
    assert sent[0]["status"] == 408 and json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"


def test_a_chunked_body_is_cut_off_at_the_limit_not_buffered():
    from microscale.serve.limits import ServeLimits

    async def endless():  # chunked (no Content-Length) and never ending
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    sent, reads = _run_guard(endless, ServeLimits(max_request_bytes=4096))
    assert sent[0]["status"] == 413 and reads == 5


# ---- served model name ---------------------------------------------------------------------------------------


def test_served_model_name_defaults_to_the_folder_name(pytestconfig):
    from microscale.serve.async_engine import default_model_name

    model = pytestconfig.rootpath / "models" / "tiny-llama-pycode"
    assert default_model_name(str(model)) == "tiny-llama-pycode"
    assert default_model_name(f"{model}/") == "tiny-llama-pycode"
    assert default_model_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # a hub id is not a path


# ---- the malformed-request table -----------------------------------------------------------------------------

COMPLETION, CHAT = {"prompt": "hi", "max_tokens": 2}, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
NAN, INF = float("nan"), float("inf")
BAD_VALUES = {  # field -> wrong types, out of range, non-finite, too long
    "temperature": ["hot", [], {}, -0.5, NAN, INF, -INF],
    "top_p": ["x", 0, 1.5, -1, NAN, INF],
    "top_k": ["x", 1.5, -2, 2**63, 2**70, -(2**64), NAN],
    "min_p": ["x", -0.1, 1.1, NAN, INF],
    "n": ["x", 0, -1, 129, 20_000, 2**63, 1.5],
    "stop": [5, [1], [""], ["a"] * 17, "x" * 1025, [None], {"a": 1}],
    "seed": ["x", 2**63, -(2**63) - 1, 2**70, 1.5, NAN],
    "presence_penalty": ["x", 5, -5, NAN, INF],
    "frequency_penalty": ["x", 5, -5, NAN, -INF],
    "repetition_penalty": ["x", 0, -1, NAN, INF],
    "max_tokens": ["x", 0, -1, 2**63, 10_000, 1.5],
    "ignore_eos": ["maybe", [], {}],
    "stream": ["maybe", {}],
    "stream_options": ["x", {"include_usage": "x"}],
    "user": [5, SURROGATE],
    "model": [5, "gpt-9", SURROGATE],
}
COMPLETION_ONLY = {
    "prompt": [42, None, [], "", [1, "a"], [-1], [2**63], [VOCAB], [[]], [[1], [-1]], SURROGATE, ["ok", SURROGATE],
               "x " * 600, "x" * 1_000_001, {"text": "hi"}],
    "logprobs": [-1, 21, "x"],
    "echo": ["x"],
}
CHAT_ONLY = {
    "messages": [[], "hello", [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [{"type": "image_url"}]}], [{"role": "user", "content": SURROGATE}],
                 [{"role": "tool", "content": "x"}], [{"content": "hi"}], [None]],
    "max_completion_tokens": [0, -1, "x", 2**63],
    "top_logprobs": [99, -1],
    "logprobs": ["x"],
}
HEADERS_JSON = {"Content-Type": "application/json"}
RAW_CASES = [  # (method, path, body, extra headers)
    *[("POST", p, body, HEADERS_JSON) for p in ("/v1/completions", "/v1/chat/completions") for body in (
        "{not json", "[]", "null", "", "42", '"text"', b'{"prompt": "\xff\xfe"}', b"\xff\xfe\x00", "[" * 100_000,
        '{"prompt": "hi", "max_tokens": 2', '{"prompt": "hi"} trailing',
    )],
    *[("POST", p, json.dumps(COMPLETION), {"Content-Type": ct}) for p in ("/v1/completions", "/v1/chat/completions")
      for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x")],
    *[(m, p, None, {}) for p in ("/v1/completions", "/v1/chat/completions") for m in ("GET", "PUT", "DELETE", "PATCH")],
    ("POST", "/v1/models", "{}", HEADERS_JSON),
    ("DELETE", "/v1/models", None, {}),
    ("POST", "/health", "{}", HEADERS_JSON),
    ("POST", "/version", "{}", HEADERS_JSON),
    ("GET", "/v1/nowhere", None, {}),
]


def _table() -> list[tuple[str, str, object, dict]]:
    cases = []
    for path, base, only in (("/v1/completions", COMPLETION, COMPLETION_ONLY), ("/v1/chat/completions", CHAT,
                                                                                CHAT_ONLY)):
        for field, values in {**BAD_VALUES, **only}.items():
            cases += [("POST", path, json.dumps({**base, field: value}), HEADERS_JSON) for value in values]
    return cases + RAW_CASES


MALFORMED = _table()




def test_malformed_requests_get_openai_shaped_4xx_and_the_server_answers_after(server, reference):
    failures = []
    with httpx.Client(base_url=server.url, headers=_auth(server), timeout=60) as client:
        for method, path, body, headers in MALFORMED:
            response = client.request(method, path, content=body, headers=headers)
            try:
                assert 400 <= response.status_code < 500
                _openai_error(response)
            except (AssertionError, ValueError, KeyError):
                failures.append((method, path, str(body)[:80], response.status_code, response.text[:200]))
    assert not failures, "\n".join(map(str, failures))
    expected = reference.generate(["def add(a, b):"], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
    assert _completion(server).json()["choices"][0]["text"] == expected
