"""Fixtures (imported by the test modules: a conftest here would shadow tests/conftest.py's module name):
a real server on a free loopback port (uvicorn in a thread, its engine in its own process as in production;
tests read the engine's state from the stats it reports), shared by the module, plus an offline LLM with the
same engine knobs to compare against; and `microscale serve` as a process of its own (serve_process)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import openai
import pytest
import uvicorn

from microscale import LLM
from microscale.config import EngineArgs
from microscale.distributed.launch import free_port
from microscale.serve.app import build_app
from microscale.serve.async_engine import AsyncEngine
from microscale.serve.fault_injection import ENV_VAR as FAULT_INJECTION_ENV

API_KEY = "test-key"
MODEL_NAME = "tiny"
ENGINE_KNOBS = dict(dtype="float32", max_num_seqs=64, max_model_len=512)


class RunningServer:
    api_key = API_KEY
    model = MODEL_NAME

    def __init__(self, url: str, engine: AsyncEngine) -> None:
        self.url, self.engine = url, engine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        # A hang guard, not a deadline: non-streamed replies arrive whole, minutes late on a loaded machine.
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)

    def wait_idle(self) -> dict[str, float]:
        """The engine's stats once it reports no request (aborts reach it asynchronously) and no KV block in use."""
        def idle(stats: dict[str, float]) -> bool:
            busy = stats["num_requests_running"] + stats["num_requests_waiting"]
            return not busy and stats["kv_cache_blocks_free"] == stats["kv_cache_blocks_total"]

        wait_until(lambda: idle(self.engine.latest_stats),
                   lambda: f"the engine is not idle: {self.engine.latest_stats}")
        return self.engine.latest_stats

    def wait_running(self) -> None:
        """Once the engine reports a request running."""
        wait_until(lambda: self.engine.latest_stats["num_requests_running"] > 0,
                   lambda: f"the engine runs no request: {self.engine.latest_stats}")


def wait_until(ready: Callable[[], bool], failure: Callable[[], str], limit_s: float = 300.0) -> None:
    """Poll observable state until `ready()`. Nothing here races a clock: `limit_s` only turns a hang into a
    failure (`failure()` says what was awaited), far past any loaded machine's wait."""
    deadline = time.monotonic() + limit_s
    while not ready():
        assert time.monotonic() < deadline, failure()
        time.sleep(0.02)  # the polling interval, not a wait for something to happen


@contextmanager
def running_server(model: Path, **app_options) -> Iterator[RunningServer]:
    """`model` served as MODEL_NAME (build_app's `app_options`) until the block ends."""
    engine = AsyncEngine(EngineArgs(model=str(model), **ENGINE_KNOBS), served_model_name=MODEL_NAME)
    engine.start()
    port = free_port()
    config = uvicorn.Config(build_app(engine, API_KEY, **app_options), host="127.0.0.1", port=port,
                            log_level="warning", timeout_graceful_shutdown=2)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started or not thread.is_alive(), lambda: "the server did not start")
    assert uv.started, "the server thread ended before it started"
    yield RunningServer(f"http://127.0.0.1:{port}", engine)
    uv.should_exit = True
    thread.join(10)
    assert not thread.is_alive()
    assert not engine.is_running and not engine.process.is_alive(), "the engine should stop with the server"


@pytest.fixture(scope="module")
def server(pytestconfig):
    with running_server(pytestconfig.rootpath / "models" / "tiny-llama-pycode") as running:
        yield running


@pytest.fixture(scope="module")
def reference(pytestconfig):
    return LLM(str(pytestconfig.rootpath / "models" / "tiny-llama-pycode"), **ENGINE_KNOBS)


class ServeProcess:
    def __init__(self, proc: subprocess.Popen, url: str, log: IO[bytes]) -> None:
        self.proc, self.url, self._log = proc, url, log

    def output(self) -> str:
        """All it printed so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


def _health_ok(server: ServeProcess) -> bool:
    assert server.proc.poll() is None, server.output()
    try:
        return httpx.get(f"{server.url}/health").status_code == 200
    except httpx.TransportError:  # not listening yet
        return False


@contextmanager
def serve_process(model: Path, *flags: str, fault_injection: bool = False) -> Iterator[ServeProcess]:
    """`microscale serve MODEL --served-model-name m ...flags` on a free port, once /health answers 200; killed at
    the end if still running. fault_injection: the engine process takes serve/fault_injection.py's markers."""
    port = free_port()
    cmd = [sys.executable, "-m", "microscale", "serve", str(model), "--port", str(port), "--served-model-name", "m",
           "--max-model-len", "256", "--max-num-seqs", "4", *flags]
    env = {**os.environ, FAULT_INJECTION_ENV: "1"} if fault_injection else None
    log = tempfile.TemporaryFile()  # not a pipe: a full one would block the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServeProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: _health_ok(server), lambda: f"the server did not come up:\n{server.output()}")
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
