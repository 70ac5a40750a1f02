"""`microscale serve` as a process: announces itself once listening, logs an access line per request, exits 0 on
SIGTERM, and cuts off clients whose headers never arrive; a busy or invalid port fails at once, in one line."""

from __future__ import annotations

import signal
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from live_server import serve_process

from microscale.cli import main


def test_serve_logs_each_request_and_exits_zero_on_sigterm(pytestconfig):
    with serve_process(pytestconfig.rootpath / "models" / "tiny-llama-pycode") as server:
        assert f"microscale: serving m at {server.url}/v1" in server.output()
        body = {"model": "m", "prompt": "import", "max_tokens": 4}
        out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)  # a hang guard, not a deadline
        assert out.status_code == 200 and out.json()["model"] == "m"
        assert httpx.get(f"{server.url}/v1/models/nope", timeout=300).status_code == 404
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(300) == 0
        access = [line for line in server.output().splitlines() if "HTTP/1.1" in line]
        for line in ('"POST /v1/completions HTTP/1.1" 200', '"GET /v1/models/nope HTTP/1.1" 404'):
            assert any(line in logged for logged in access), access


def test_a_connection_whose_headers_never_end_is_closed(pytestconfig):
    with serve_process(pytestconfig.rootpath / "models" / "tiny-llama-pycode", "--header-timeout", "0.5",
                       "--disable-log-requests") as server:
        url = urlsplit(server.url)
        with socket.create_connection((url.hostname, url.port)) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends them
            # Everyone else is served meanwhile (the timeout only turns a hang into a failure).
            assert httpx.get(f"{server.url}/health", timeout=300).status_code == 200
            slow.settimeout(120)  # only turns a hang into a failure: the server closes it long before
            assert slow.recv(1024) == b""  # closed by the server, with nothing sent
        assert "HTTP/1.1" not in server.output()  # --disable-log-requests: no access lines


@pytest.mark.parametrize("port", ["busy", "70000"])
def test_a_port_it_cannot_listen_on_fails_at_once_in_one_line(pytestconfig, capsys, port):
    # The port is bound before the model loads: nothing else (no engine process) has started when this fails.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if port == "busy":
            port = str(taken.getsockname()[1])
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", str(pytestconfig.rootpath / "models" / "tiny-llama-pycode"), "--port", port])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "Traceback" not in err
    reason = "Address already in use" if port != "70000" else "port must be 0-65535"
    assert err.startswith(f"microscale serve: error: cannot listen on 127.0.0.1:{port}: ") and reason in err
