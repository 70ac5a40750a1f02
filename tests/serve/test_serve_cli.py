"""`microscale serve` as a process: answers once up, and exits 0 on SIGTERM."""

from __future__ import annotations

import signal

import httpx
from live_server import serve_process


def test_serve_exits_zero_on_sigterm(pytestconfig):
    with serve_process(pytestconfig.rootpath / "models" / "tiny-llama-pycode") as server:
        body = {"model": "m", "prompt": "import", "max_tokens": 4}
        out = httpx.post(f"{server.url}/v1/completions", json=body)
        assert out.status_code == 200 and out.json()["model"] == "m"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
