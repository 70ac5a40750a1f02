"""No request can take the engine down: a step that fails on one request aborts only that one (its client gets
an error, the others go on). A fault of the engine itself restarts the engine process (what was in flight ends
with an error, /health says "restarting" until it is back), and once restarts run out the server exits 1.
Faults are injected by prompt markers (serve/fault_injection.py), so nothing here depends on timing."""

from __future__ import annotations

import json

import httpx
import pytest
from live_server import ENGINE_KNOBS, serve_process, wait_until

from microscale import LLM
from microscale.engine.sampler import SamplingBatch
from microscale.engine.sequence import Request
from microscale.sampling_params import SamplingParams
from microscale.serve.fault_injection import ENGINE_FAULT, HOLD, REQUEST_FAULT


def _model(pytestconfig):
    return pytestconfig.rootpath / "models" / "tiny-llama-pycode"


def _poison_sampling(monkeypatch, request: Request) -> None:
    """Building the sampling tensors of any batch with this request raises (as for top_k = 2**63)."""
    build = SamplingBatch.build.__func__

    def faulty(cls, rows, *args):
        if any(row.params is request.params for row in rows):
            raise OverflowError("Python int too large to convert to C long")
        return build(cls, rows, *args)

    monkeypatch.setattr(SamplingBatch, "build", classmethod(faulty))


def _poison_detokenizer(monkeypatch, request: Request) -> None:
    def faulty(token, check_stop=True):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    monkeypatch.setattr(request.seqs[0].detokenizer, "add_token", faulty)


@pytest.mark.parametrize(("poison", "error"), [(_poison_sampling, "OverflowError"),
                                               (_poison_detokenizer, "UnicodeDecodeError")])
def test_a_step_failing_on_one_request_aborts_only_that_one(pytestconfig, monkeypatch, poison, error):
    engine = LLM(str(_model(pytestconfig)), **ENGINE_KNOBS).engine
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    good = engine.add_request("good", "def main():", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, n=2))
    bad = engine.add_request("bad", "import os", params)
    poison(monkeypatch, bad)
    while engine.has_unfinished_requests():  # both are in every batch until bad fails
        engine.step_requests()
    assert bad.error == error and bad.seqs[0].finish_reason == "abort"
    assert good.error is None and [len(s.output_token_ids) for s in good.seqs] == [5, 5]
    stats = engine.get_stats()
    assert stats["kv_cache_blocks_free"] == stats["kv_cache_blocks_total"]


def _complete(url: str, prompt: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4, **body}, timeout=60)


def test_a_poison_request_fails_alone_and_the_server_keeps_serving(pytestconfig):
    with serve_process(_model(pytestconfig), fault_injection=True) as server:
        body = {"prompt": f"def main(): {HOLD}", "max_tokens": 3, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as held:
            lines = held.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # its first token: it now waits
            # The held request is stepped again only with this one: they share the batch whose sampling fails.
            poisoned = _complete(server.url, f"x {REQUEST_FAULT}")
            assert poisoned.status_code == 500, poisoned.text
            error = poisoned.json()["error"]
            assert error["code"] == "request_failed" and "injected" not in error["message"]
            assert _complete(server.url, "import").status_code == 200  # its steps finish the held one too
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def _statuses_until_ok(url: str) -> list[str]:
    """/health's status each time it is asked, until "ok"."""
    seen = []

    def ok() -> bool:
        response = httpx.get(f"{url}/health")
        seen.append(response.json()["status"])
        assert (response.status_code == 200) == (seen[-1] == "ok")
        return seen[-1] == "ok"

    wait_until(ok, lambda: f"/health never said ok: {seen[-5:]}")
    return seen


def test_engine_faults_restart_the_engine_until_restarts_run_out(pytestconfig):
    with serve_process(_model(pytestconfig), "--engine-restarts", "1", fault_injection=True) as server:
        body = {"prompt": f"def main(): {HOLD}", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as held:
            lines = held.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            faulty = _complete(server.url, f"x {ENGINE_FAULT}")  # its forward fails: the engine process dies
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert faulty.status_code == 503 and int(faulty.headers["Retry-After"]) >= 1
        error = faulty.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "restarting" in error["message"]
        assert "injected" not in error["message"]
        assert events[-1] == "[DONE]" and "restarting" in json.loads(events[-2])["error"]["message"]
        statuses = _statuses_until_ok(server.url)
        assert set(statuses[:-1]) <= {"restarting"}, statuses
        assert _complete(server.url, "import").status_code == 200

        faulty = _complete(server.url, f"x {ENGINE_FAULT}")  # no restart left
        assert faulty.status_code == 503 and "could not be restarted" in faulty.json()["error"]["message"]
        assert server.proc.wait(60) == 1, server.output()
