"""SIGTERM: new requests are refused, streams get --shutdown-drain-seconds to finish, then each one left ends with
an error event and `data: [DONE]` (never a cut body), and the server exits 0. Streams are held open by the
HOLD marker (serve/fault_injection.py), so nothing here depends on timing."""

from __future__ import annotations

import json
import signal
from contextlib import ExitStack

import httpx
from live_server import serve_process

from microscale.serve.fault_injection import HOLD


def test_sigterm_ends_streams_left_after_the_drain_with_an_error_and_done(pytestconfig):
    model = pytestconfig.rootpath / "models" / "tiny-llama-pycode"
    with serve_process(model, "--shutdown-drain-seconds", "0", fault_injection=True) as server, ExitStack() as stack:
        streams = []
        for prompt in ("def main():", "import"):
            body = {"prompt": f"{prompt} {HOLD}", "max_tokens": 100, "stream": True}
            response = stack.enter_context(httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60))
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # running, then held
            streams.append(lines)
        server.proc.send_signal(signal.SIGTERM)
        for lines in streams:
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            assert events[-1] == "[DONE]", events
            error = json.loads(events[-2])["error"]
            assert error["type"] == "overloaded_error" and "shutting down" in error["message"]
        assert server.proc.wait(60) == 0, server.output()
