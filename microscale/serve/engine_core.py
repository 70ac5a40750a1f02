"""The engine process: one LLMEngine stepped in a process of its own, fed by the server's front process.

When the HTTP front (event loop, JSON, SSE) and the engine loop shared one interpreter, every GIL hand-off
between them slowed the steps (benchmarks/gil_contention.py). Here the front sends requests, aborts and
calls through one pipe and gets one StepReport per step back through another. Only what changed travels
(new tokens, text and logprobs), so a step costs the same to report late in a long output as early on.

Messages to the engine process: ("add", request_id, prompt, params, arrival_time), ("abort", request_id),
("call", call_id, method, args), ("shutdown",). From it: ("ready", stats) or ("failed", error_type, message)
once, then ("report", StepReport), ("rejected", request_id, message) (bad input), ("request_error", request_id,
error_type) (adding it raised otherwise), ("reply", call_id, result, error), and ("dead", message) if a step
raised. A step that fails on one request alone aborts that request (its delta carries the error) and goes on;
only a fault of the engine itself ends the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from microscale.config import EngineArgs
from microscale.engine.engine import LLMEngine
from microscale.engine.sequence import Request
from microscale.outputs import SampleLogprobs
from microscale.serve import fault_injection

logger = logging.getLogger(__name__)

_SYSTEM_STATS_PERIOD_S = 1.0
# Engine methods the front may call between steps (the model is only touched on this process's thread).
_CALLABLE = ("prompt_logprobs",)


@dataclass
class CompletionDelta:
    """One sequence's progress since the last report."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: SampleLogprobs | None
    num_output_tokens: int
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class RequestDelta:
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    metrics: dict[str, float]  # arrival_time, first_scheduled_time, first_token_time (time.monotonic())
    error: str | None = None  # the engine aborted the request: this failed on it (the exception's type only)


@dataclass
class StepReport:
    deltas: list[RequestDelta]
    # LLMEngine.get_stats() after the step, plus requests_received and this process's memory figures.
    stats: dict[str, float]
    step_seconds: float | None  # None: no step ran (an update after aborts while idle)


def error_message(e: BaseException) -> tuple[str, str]:
    return type(e).__name__, str(e)


class EngineCore:
    """The loop: take what the front sent (waiting for it when there is nothing to step), step, report."""

    def __init__(self, engine: LLMEngine, inbox: Connection, outbox: Connection) -> None:
        self.engine = engine
        self.inbox, self.outbox = inbox, outbox
        self._sent_tokens: dict[str, list[int]] = {}  # request id -> output tokens reported, per sequence
        self._pending: list[RequestDelta] = []  # aborted requests' last deltas, for the next report
        self._requests_received = 0
        self._system: dict[str, float] = {}
        self._system_time = -_SYSTEM_STATS_PERIOD_S

    def run(self) -> bool:
        """Until the front says shut down or goes away (True), or a step raises (False, after a "dead" message)."""
        try:
            while self._take_messages():
                if self.engine.has_unfinished_requests():
                    self._step()
            return True
        except Exception as e:
            logger.exception("engine loop died")
            self.outbox.send(("dead", "{}: {}".format(*error_message(e))))
            return False

    def _take_messages(self) -> bool:
        try:
            if not self.engine.has_unfinished_requests():
                if self._pending:
                    self._report(None)
                if not self._handle(self.inbox.recv()):
                    return False
            while self.inbox.poll():
                if not self._handle(self.inbox.recv()):
                    return False
        except EOFError:  # the front process is gone
            return False
        return True

    def _handle(self, message: tuple) -> bool:
        kind = message[0]
        if kind == "add":
            self._add(*message[1:])
        elif kind == "abort":
            request = self.engine.abort_request(message[1])
            if request is not None:
                self._pending.append(self._safe_delta(request))
        elif kind == "call":
            self._call(*message[1:])
        elif kind == "shutdown":
            return False
        else:
            raise ValueError(f"unknown message {kind!r} from the server front")
        return True

    def _add(self, request_id: str, prompt: Any, params: Any, arrival_time: float) -> None:
        self._requests_received += 1
        try:
            request = self.engine.add_request(request_id, prompt, params, arrival_time=arrival_time)
        except ValueError as e:
            self.outbox.send(("rejected", request_id, str(e)))
            return
        except Exception as e:  # a bug this request's input hit: it fails, the engine goes on
            logger.exception("request %s could not be added", request_id)
            self.outbox.send(("request_error", request_id, type(e).__name__))
            return
        self._sent_tokens[request_id] = [0] * len(request.seqs)

    def _call(self, call_id: int, method: str, args: tuple) -> None:
        if method not in _CALLABLE:
            self.outbox.send(("reply", call_id, None, ("ValueError", f"{method!r} cannot be called remotely")))
            return
        try:
            result = getattr(self.engine, method)(*args)
        except Exception as e:  # the caller's error (a bad prompt), not the engine's: the loop goes on
            self.outbox.send(("reply", call_id, None, error_message(e)))
        else:
            self.outbox.send(("reply", call_id, result, None))

    def _step(self) -> None:
        started = time.monotonic()
        requests = self.engine.step_requests()
        elapsed = time.monotonic() - started
        self._pending.extend(self._safe_delta(request) for request in requests)
        self._report(elapsed)

    def _report(self, step_seconds: float | None) -> None:
        deltas, self._pending = self._pending, []
        stats = {**self.engine.get_stats(), "requests_received": self._requests_received, **self._system_stats()}
        self.outbox.send(("report", StepReport(deltas, stats, step_seconds)))

    def _safe_delta(self, request: Request) -> RequestDelta:
        """The request's delta; should reporting it fail (say, in its detokenizer), it is aborted with an error."""
        try:
            return self._delta(request)
        except Exception as e:
            logger.exception("request %s could not be reported; aborting it", request.request_id)
            self.engine.abort_request(request.request_id)
            self._sent_tokens.pop(request.request_id, None)
            return RequestDelta(request.request_id, [], True, len(request.prompt_token_ids), request.num_cached_tokens,
                                request.to_metrics(), type(e).__name__)

    def _delta(self, request: Request) -> RequestDelta:
        sent = self._sent_tokens[request.request_id]
        completions = []
        for seq in request.seqs:
            start = seq.num_prompt_tokens + sent[seq.index]
            tokens = seq.token_ids[start:]
            logprobs = None if seq.logprobs is None else seq.logprobs[sent[seq.index] :]
            sent[seq.index] += len(tokens)
            completions.append(CompletionDelta(
                seq.index, tokens, seq.detokenizer.new_text(seq.is_finished), logprobs, seq.num_output_tokens,
                seq.cumulative_logprob if seq.logprobs is not None else None, seq.finish_reason, seq.stop_reason,
            ))
        if request.finished:
            del self._sent_tokens[request.request_id]
        return RequestDelta(request.request_id, completions, request.finished, len(request.prompt_token_ids),
                            request.num_cached_tokens, request.to_metrics(), request.error)

    def _system_stats(self) -> dict[str, float]:
        """Resident memory of this process, and device memory when on CUDA, refreshed at most once a second."""
        now = time.monotonic()
        if now - self._system_time >= _SYSTEM_STATS_PERIOD_S:
            self._system_time = now
            self._system = system_stats(self.engine.device)
        return self._system


def system_stats(device: torch.device) -> dict[str, float]:
    stats: dict[str, float] = {}
    rss = resident_memory_bytes()
    if rss is not None:
        stats["resident_memory_bytes"] = rss
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        stats["gpu_memory_used_bytes"] = total - free
        try:
            stats["gpu_utilization_perc"] = torch.cuda.utilization(device) / 100
        except Exception:  # needs pynvml (or amdsmi); without it the gauge is left out
            pass
    return stats


def resident_memory_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def run_engine_core(args: EngineArgs, inbox: Connection, outbox: Connection, log_level: int) -> None:
    """The engine process's entry point (spawned: a fresh interpreter, no inherited threads)."""
    # Ctrl-C reaches the whole process group; the front decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("microscale").setLevel(log_level)
    try:
        engine = LLMEngine(args)
    except Exception as e:
        outbox.send(("failed", *error_message(e)))
        return
    if fault_injection.enabled():
        fault_injection.install(engine)
    outbox.send(("ready", engine.get_stats()))
    healthy = EngineCore(engine, inbox, outbox).run()
    engine.shutdown()  # tensor-parallel workers
    if not healthy:
        sys.exit(1)
