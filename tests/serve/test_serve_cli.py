"""`microscale serve` as a process: answers once up, exits 0 on SIGTERM, and cuts off clients whose headers never
arrive."""

from __future__ import annotations

import signal
import socket
from urllib.parse import urlsplit

import httpx
from live_server import serve_process


def test_serve_exits_zero_on_sigterm(pytestconfig):
    with serve_process(pytestconfig.rootpath / "models" / "tiny-llama-pycode") as server:
        body = {"model": "m", "prompt": "import", "max_tokens": 4}
        out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)  # a hang guard, not a deadline
        assert out.status_code == 200 and out.json()["model"] == "m"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(300) == 0


def test_a_connection_whose_headers_never_end_is_closed(pytestconfig):
    with serve_process(pytestconfig.rootpath / "models" / "tiny-llama-pycode", "--header-timeout", "0.5") as server:
        url = urlsplit(server.url)
        with socket.create_connection((url.hostname, url.port)) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends them
            # Everyone else is served meanwhile (the timeout only turns a hang into a failure).
            assert httpx.get(f"{server.url}/health", timeout=300).status_code == 200
            slow.settimeout(120)  # only turns a hang into a failure: the server closes it long before
            assert slow.recv(1024) == b""  # closed by the server, with nothing sent
