"""The engine process: one LLMEngine stepped in a process of its own, fed by the server's front process.

When the HTTP front (event loop, JSON, SSE) and the engine loop shared one interpreter, every GIL hand-off
between them slowed the steps (benchmarks/gil_contention.py). Here the front sends requests, aborts and
calls through one pipe and gets one StepReport per step back through another (the messages:
serve/messages.py). A step that fails on one request alone aborts that request (its delta carries the error)
and goes on; only a fault of the engine itself ends the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

import torch

from microscale.config import EngineArgs
from microscale.engine.engine import LLMEngine
from microscale.engine.roofline import StepCost
from microscale.engine.sequence import Request
from microscale.serve import fault_injection
from microscale.serve.messages import (
    Abort,
    AddRequest,
    Call,
    CompletionDelta,
    EngineDied,
    Ready,
    Rejected,
    Reply,
    RequestDelta,
    RequestError,
    Shutdown,
    StartupFailed,
    StepReport,
    ToEngine,
)

logger = logging.getLogger(__name__)

_SYSTEM_STATS_PERIOD_S = 1.0
# Engine methods the front may call between steps (the model is only touched on this process's thread).
_CALLABLE = ("prompt_logprobs",)


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
        """Until the front says shut down or goes away (True), or a step raises (False, after an EngineDied message)."""
        try:
            while self._take_messages():
                if self.engine.has_unfinished_requests():
                    self._step()
            return True
        except Exception as e:
            logger.exception("engine loop died")
            self.outbox.send(EngineDied("{}: {}".format(*error_message(e))))
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

    def _handle(self, message: ToEngine) -> bool:
        """False once told to shut down."""
        match message:
            case AddRequest():
                self._add(message)
            case Abort(request_id):
                request = self.engine.abort_request(request_id)
                if request is not None:
                    self._pending.append(self._safe_delta(request))
            case Call():
                self._call(message)
            case Shutdown():
                return False
            case _:
                raise ValueError(f"unknown message {message!r} from the server front")
        return True

    def _add(self, message: AddRequest) -> None:
        self._requests_received += 1
        request_id = message.request_id
        try:
            request = self.engine.add_request(request_id, message.prompt, message.params,
                                              arrival_time=message.arrival_time)
        except ValueError as e:
            self.outbox.send(Rejected(request_id, str(e)))
            return
        except Exception as e:  # a bug this request's input hit: it fails, the engine goes on
            logger.exception("request %s could not be added", request_id)
            self.outbox.send(RequestError(request_id, type(e).__name__))
            return
        self._sent_tokens[request_id] = [0] * len(request.seqs)

    def _call(self, message: Call) -> None:
        if message.method not in _CALLABLE:
            error = ("ValueError", f"{message.method!r} cannot be called remotely")
            self.outbox.send(Reply(message.call_id, None, error))
            return
        try:
            result = getattr(self.engine, message.method)(*message.args)
        except Exception as e:  # the caller's error (a bad prompt), not the engine's: the loop goes on
            self.outbox.send(Reply(message.call_id, None, error_message(e)))
        else:
            self.outbox.send(Reply(message.call_id, result, None))

    def _step(self) -> None:
        started = time.monotonic()
        requests = self.engine.step_requests()
        elapsed = time.monotonic() - started
        self._pending.extend(self._safe_delta(request) for request in requests)
        roofline = self.engine.last_step_roofline
        self._report(elapsed, self.engine.last_step_tokens, None if roofline is None else roofline.cost)

    def _report(self, step_seconds: float | None, step_tokens: int = 0, step_cost: StepCost | None = None) -> None:
        deltas, self._pending = self._pending, []
        stats = {**self.engine.get_stats(), "requests_received": self._requests_received, **self._system_stats()}
        self.outbox.send(StepReport(deltas, stats, step_seconds, step_tokens, step_cost))

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


def cache_config_info(engine: LLMEngine) -> dict[str, str]:
    """The KV cache's settings under vLLM's CacheConfig names (cache_dtype "auto": the model's dtype; the GPU blocks
    are the device's, CPU or GPU; the CPU blocks are the swap space's)."""
    args, shard = engine.args, engine.executor.shard
    settings = {
        "block_size": args.block_size, "cache_dtype": shard.kv_cache_quant or "auto",
        "enable_prefix_caching": args.enable_prefix_caching, "gpu_memory_utilization": args.gpu_memory_utilization,
        "num_cpu_blocks": shard.num_host_blocks, "num_gpu_blocks": shard.num_blocks, "swap_space": args.swap_space,
    }
    return {key: str(value) for key, value in settings.items()}


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
        outbox.send(StartupFailed(*error_message(e)))
        return
    if fault_injection.enabled():
        fault_injection.install(engine)
    outbox.send(Ready(engine.get_stats(), cache_config_info(engine), engine.peaks))
    healthy = EngineCore(engine, inbox, outbox).run()
    engine.shutdown()  # tensor-parallel workers
    if not healthy:
        sys.exit(1)
