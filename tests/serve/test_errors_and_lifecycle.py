"""Bad input gets OpenAI-style 4xx (never 500), auth/model/overload errors, client disconnects free their KV
blocks, and the health/version/schema routes."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest

pytest_plugins = ["live_server"]  # the server fixtures

LONG_PROMPT = "x " * 600  # past max_model_len=512


def _post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    auth = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers={**auth, **(headers or {})}, timeout=300)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


MALFORMED = [
    ("/v1/completions", "{not json"),
    ("/v1/completions", "[]"),
    ("/v1/completions", {}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": 42}),
    ("/v1/completions", {"prompt": [1, "a"]}),
    ("/v1/completions", {"prompt": [10**9]}),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}),
    ("/v1/completions", {"prompt": "hi", "n": 0}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000}),
    ("/v1/completions", {"prompt": LONG_PROMPT}),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}),
    ("/v1/completions", {"prompt": "hi", "stream": "maybe"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99, "logprobs": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 5}),
]


@pytest.mark.parametrize(("path", "body"), MALFORMED)
def test_malformed_bodies_get_400(server, path, body):
    _assert_openai_error(_post(server, path, body), 400)


def test_auth_model_and_routes(server):
    body = {"prompt": "hi", "max_tokens": 2}
    _assert_openai_error(_post(server, "/v1/completions", body, {"Authorization": ""}), 401)
    _assert_openai_error(_post(server, "/v1/completions", body, {"Authorization": "Bearer wrong"}), 401)
    _assert_openai_error(httpx.get(f"{server.url}/v1/models"), 401)
    error = _assert_openai_error(_post(server, "/v1/completions", {**body, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found"
    auth = {"Authorization": f"Bearer {server.api_key}"}
    _assert_openai_error(httpx.get(f"{server.url}/v1/nowhere"), 401)  # every /v1 path needs the key
    _assert_openai_error(httpx.get(f"{server.url}/v1/nowhere", headers=auth), 404)
    models = httpx.get(f"{server.url}/v1/models", headers=auth).json()
    assert [m["id"] for m in models["data"]] == [server.model]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert "/v1/chat/completions" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_over_max_waiting_gets_503_with_retry_after(server):
    server.engine.max_waiting = 0
    try:
        response = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    finally:
        server.engine.max_waiting = None
    _assert_openai_error(response, 503)
    assert int(response.headers["Retry-After"]) >= 1


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"prompt": "def main():", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=300) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        stats = server.engine.latest_stats
        assert stats["kv_cache_blocks_free"] < stats["kv_cache_blocks_total"]
    server.wait_idle()


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "def main():"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_disconnect_during_a_non_streamed_request_aborts_it(server, path, body):
    generated_before = server.wait_idle()["generation_tokens"]
    payload = json.dumps({**body, "max_tokens": 480, "temperature": 0, "ignore_eos": True}).encode()
    url = urlsplit(server.url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {server.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head + payload)
        server.wait_running()  # the client gives up (its connection closes) once the engine runs the request
    generated = server.wait_idle()["generation_tokens"] - generated_before
    assert 0 < generated < 480  # started, then aborted rather than run to its end


def test_health_fails_once_the_engine_process_dies(pytestconfig):
    """The engine process killed mid-stream (no restarts allowed): the stream ends with an error event, /health
    says "failed" and new requests get 503 (never a hang)."""
    import os
    import signal

    from fastapi.testclient import TestClient

    from microscale.config import EngineArgs
    from microscale.serve.app import build_app
    from microscale.serve.async_engine import AsyncEngine

    model = pytestconfig.rootpath / "models" / "tiny-llama-pycode"
    engine = AsyncEngine(EngineArgs(model=str(model), dtype="float32", max_model_len=512))
    engine.start()
    body = {"prompt": "hi", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with TestClient(build_app(engine)) as client:
        assert client.get("/health").status_code == 200
        with client.stream("POST", "/v1/completions", json=body) as response:
            os.kill(engine.process.pid, signal.SIGKILL)
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "could not be restarted" in error["message"], events[-2]
        assert engine.error == "the engine process exited (code -9)"  # for the log, not for clients
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        _assert_openai_error(client.post("/v1/completions", json={"prompt": "hi"}), 503)
