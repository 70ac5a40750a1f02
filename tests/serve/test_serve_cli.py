"""`microscale serve` as a process: answers once up, and exits 0 on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx


def test_serve_exits_zero_on_sigterm(pytestconfig):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = pytestconfig.rootpath / "models" / "tiny-llama-pycode"
    cmd = [sys.executable, "-m", "microscale", "serve", str(model), "--port", str(port), "--served-model-name", "m",
           "--max-model-len", "256", "--max-num-seqs", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": "m", "prompt": "import", "max_tokens": 4}
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
        assert out.status_code == 200 and out.json()["model"] == "m"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
