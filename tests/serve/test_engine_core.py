"""The engine process's loop, run on a thread over real pipes: its deltas rebuild exactly what LLM.generate
returns, rejected prompts and remote calls answer without stopping it, and a step that raises reports
EngineDied instead of hanging the front."""

from __future__ import annotations

import threading
from multiprocessing import Pipe

import pytest

from microscale import LLM, SamplingParams
from microscale.outputs import CompletionOutput, RequestOutput
from microscale.serve.async_engine import _apply
from microscale.serve.engine_core import EngineCore
from microscale.serve.messages import Abort, AddRequest, Call, EngineDied, Rejected, Reply, Shutdown, StepReport

MODEL_KNOBS = dict(dtype="float32", max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="module")
def llm(pytestconfig):
    return LLM(str(pytestconfig.rootpath / "models" / "tiny-llama-pycode"), **MODEL_KNOBS)


class CoreOnThread:
    def __init__(self, llm: LLM, start: bool = True) -> None:
        self.inbox_read, self.to_core = Pipe(duplex=False)
        self.from_core, outbox_write = Pipe(duplex=False)
        self.core = EngineCore(llm.engine, self.inbox_read, outbox_write)
        self.result: list[bool] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.core.run()), daemon=True)
        if start:
            self.thread.start()

    def receive(self, kind: type, timeout: float = 30):
        """The next message of type `kind`, skipping others (reports of steps in between)."""
        while True:
            assert self.from_core.poll(timeout), f"no {kind.__name__} message from the engine core"
            message = self.from_core.recv()
            if isinstance(message, kind):
                return message

    def stop(self) -> None:
        self.to_core.send(Shutdown())
        self.thread.join(10)
        assert self.result == [True]


def test_deltas_rebuild_the_offline_outputs(llm):
    prompts = ["def add(a, b):", "class Stack:", "import os\n"]
    params = [
        SamplingParams(temperature=0, max_tokens=24, logprobs=2),
        SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=20, stop=["\n\n", ")"]),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
    ]
    expected = llm.generate(prompts, params)
    core = CoreOnThread(llm, start=False)  # every request waits in the pipe before the first step
    outputs = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids = llm.get_tokenizer().encode(prompt)
        core.to_core.send(AddRequest(f"r{i}", {"prompt": prompt, "prompt_token_ids": ids}, p, 0.0))
        outputs[f"r{i}"] = RequestOutput(f"r{i}", prompt, ids, [CompletionOutput(j, "", []) for j in range(p.n)],
                                         finished=False)
    core.thread.start()
    while not all(o.finished for o in outputs.values()):
        report = core.receive(StepReport)
        assert report.step_seconds is not None and report.stats["requests_received"] == len(prompts)
        for delta in report.deltas:
            _apply(outputs[delta.request_id], delta)
    for i, want in enumerate(expected):
        got = outputs[f"r{i}"]
        for g, w in zip(got.outputs, want.outputs, strict=True):
            assert (g.text, g.token_ids, g.finish_reason, g.stop_reason) == (w.text, w.token_ids, w.finish_reason,
                                                                          w.stop_reason)
            assert g.logprobs == w.logprobs and g.cumulative_logprob == pytest.approx(w.cumulative_logprob)
    core.stop()


def test_rejections_calls_and_aborts_leave_the_loop_running(llm):
    core = CoreOnThread(llm)
    core.to_core.send(AddRequest("bad", {"prompt_token_ids": []}, SamplingParams(), 0.0))
    assert core.receive(Rejected) == Rejected("bad", "The prompt is empty.")
    ids = llm.get_tokenizer().encode("def main():")
    core.to_core.send(Call(1, "prompt_logprobs", (ids, 1)))
    reply = core.receive(Reply)
    call_id, entries, error = reply.call_id, reply.result, reply.error
    assert call_id == 1 and error is None and len(entries) == len(ids) - 1
    core.to_core.send(Call(2, "abort_request", ("x",)))  # not on the list of callable methods
    assert core.receive(Reply).error[0] == "ValueError"
    core.to_core.send(AddRequest("long", {"prompt_token_ids": ids}, SamplingParams(max_tokens=200, ignore_eos=True),
                                 0.0))
    core.receive(StepReport)
    core.to_core.send(Abort("long"))
    while True:  # the abort's delta ends the request with "abort", and the blocks come back
        report = core.receive(StepReport)
        aborted = [d for d in report.deltas if d.finished]
        if aborted:
            assert [c.finish_reason for c in aborted[0].completions] == ["abort"]
            assert report.stats["kv_cache_blocks_free"] == report.stats["kv_cache_blocks_total"]
            break
    core.stop()


def test_a_failing_step_reports_dead(llm, monkeypatch):
    def broken_step():
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(llm.engine, "step_requests", broken_step)
    core = CoreOnThread(llm)
    core.to_core.send(AddRequest("r", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4), 0.0))
    assert core.receive(EngineDied) == EngineDied("RuntimeError: simulated device failure")
    core.thread.join(10)
    assert core.result == [False]
    llm.engine.abort_request("r")  # leave the shared engine clean for other tests
