"""Fixtures (imported by the test modules: a conftest here would shadow tests/conftest.py's module name):
a real server on a free loopback port (uvicorn in a thread, so tests can look at its engine), shared by
the module, plus an offline LLM with the same engine knobs to compare against."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import uvicorn

from microscale import LLM
from microscale.config import EngineArgs
from microscale.engine.engine import LLMEngine
from microscale.serve.app import build_app
from microscale.serve.async_engine import AsyncEngine

API_KEY = "test-key"
MODEL_NAME = "tiny"
ENGINE_KNOBS = dict(dtype="float32", max_num_seqs=64, max_model_len=512)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    api_key = API_KEY
    model = MODEL_NAME

    def __init__(self, url: str, engine: AsyncEngine) -> None:
        self.url, self.engine = url, engine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine holds no request (aborts reach the loop thread asynchronously)."""
        deadline = time.monotonic() + timeout
        while self.engine.engine.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)  # let the loop thread finish the step it may be in


@pytest.fixture(scope="module")
def server(pytestconfig):
    model = pytestconfig.rootpath / "models" / "tiny-llama-pycode"
    engine = AsyncEngine(LLMEngine(EngineArgs(model=str(model), **ENGINE_KNOBS)))
    port = _free_port()
    config = uvicorn.Config(build_app(engine, MODEL_NAME, API_KEY), host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield RunningServer(f"http://127.0.0.1:{port}", engine)
    uv.should_exit = True
    thread.join(10)
    assert not thread.is_alive()
    assert not engine.is_running, "the engine loop thread should stop with the server"


@pytest.fixture(scope="module")
def reference(pytestconfig):
    return LLM(str(pytestconfig.rootpath / "models" / "tiny-llama-pycode"), **ENGINE_KNOBS)
