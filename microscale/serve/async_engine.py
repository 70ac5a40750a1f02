"""AsyncEngine: the server front's handle on an engine process, streaming its outputs to asyncio callers.

The engine (model, KV cache, scheduler) lives in a spawned process (serve/engine_core.py), so torch work
never competes with the event loop for the GIL. This side keeps what needs no model: the tokenizer and
prompt checks (`inputs`), the metrics, and one stream per request. A sender thread writes to the engine's
pipe (a busy engine never blocks the event loop); a reader thread takes its reports and hands each request's
delta to the event loop that waits for it. Should the engine process die (a fault of the engine, not of one
request: those only fail their own request), what was in flight ends with EngineDeadError and the reader thread
starts another, up to max_restarts times; after that the engine is "failed" and on_failed is called.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal

from microscale.config import EngineArgs
from microscale.engine.inputs import InputProcessor
from microscale.outputs import CompletionOutput, RequestOutput
from microscale.sampling_params import SamplingParams
from microscale.serve.engine_core import run_engine_core
from microscale.serve.errors import APIError
from microscale.serve.messages import (
    Abort,
    AddRequest,
    Call,
    EngineDied,
    FromEngine,
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
from microscale.serve.metrics import ServerMetrics
from microscale.serve.seed_figures import Nvml, gpu_indices

logger = logging.getLogger(__name__)

_STARTUP_POLL_S = 0.1
_EXIT_WAIT_S = 10.0

EngineState = Literal["ok", "restarting", "failed", "stopping"]
# What clients are told (never the engine's exception: that is logged).
_UNAVAILABLE = {
    "restarting": "The engine stopped unexpectedly and is restarting; retry shortly.",
    "failed": "The engine stopped unexpectedly and could not be restarted.",
    "stopping": "The server is shutting down.",
}


class EngineOverloadedError(Exception):
    """The waiting queue is full: the client should retry later."""


class EngineDeadError(Exception):
    """The engine is not there to serve (it stopped and restarts, it failed, or the server shuts down)."""


class RequestFailedError(APIError):
    """The engine failed on this request alone and aborted it; the other requests went on."""

    def __init__(self, error_type: str) -> None:
        super().__init__(500, f"The engine failed on this request ({error_type}) and aborted it.",
                         code="request_failed")


def _remote_error(error_type: str, message: str) -> Exception:
    """The engine process's exception as the front should raise it: ValueErrors stay the caller's fault."""
    return ValueError(message) if error_type == "ValueError" else RuntimeError(f"{error_type}: {message}")


class _Stream:
    """Where one request's deltas go: an asyncio queue on the caller's loop, filled from the reader thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()

    def put(self, item: RequestDelta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[_Stream, RequestDelta]]) -> None:
    for stream, delta in items:
        stream.queue.put_nowait(delta)


def _apply(output: RequestOutput, delta: RequestDelta) -> None:
    for d in delta.completions:
        c = output.outputs[d.index]
        c.token_ids.extend(d.token_ids)
        c.text += d.text
        if d.logprobs is not None:
            if c.logprobs is None:
                c.logprobs = []
            c.logprobs.extend(d.logprobs)
        c.cumulative_logprob, c.finish_reason, c.stop_reason = d.cumulative_logprob, d.finish_reason, d.stop_reason
    output.finished = delta.finished
    output.num_cached_tokens = delta.num_cached_tokens
    output.metrics = delta.metrics


def default_model_name(model: str) -> str:
    """A local model is served as its folder's name (its path would leak the server's layout), a hub id as is."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


class AsyncEngine:
    def __init__(
        self, args: EngineArgs, max_waiting: int | None = None, max_restarts: int = 0, *,
        served_model_name: str | None = None,
    ) -> None:
        """`served_model_name`: what clients call the model (default: default_model_name(args.model)); the
        server's routes and its metrics' model_name label take it from here."""
        self.args = args
        self.served_model_name = served_model_name or default_model_name(args.model)
        self.max_restarts = max_restarts
        self.restarts = 0
        self.state: EngineState = "ok"
        self.on_failed: Callable[[], None] | None = None  # called (from the reader thread) once the engine fails
        self.inputs = InputProcessor(args)  # fails here, before any process starts, on a bad model path
        # Requests allowed to wait for a slot (in the scheduler or on their way to it); None: no limit.
        self.max_waiting = max_waiting
        gpus = gpu_indices(args.device, args.tensor_parallel_size)
        self.metrics = ServerMetrics(self.inputs.max_model_len, self.served_model_name, args.max_num_seqs,
                                     args.max_num_batched_tokens, Nvml.open(gpus) if gpus else None)
        self.latest_stats: dict[str, float] = {}  # the engine's stats in its last report
        self.error: str | None = None  # why the engine process last died, for logs (clients are not told)
        self.process: multiprocessing.process.BaseProcess | None = None
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._num_sent = 0  # requests sent to the engine process (it reports how many it received)
        self._outbox: queue.SimpleQueue[ToEngine | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._lock = threading.Lock()  # a stream or call registers, or the engine is lost, never both at once

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the engine process and wait until its model is loaded; its load errors are raised here."""
        self._spawn()
        # shutdown() runs at exit, before multiprocessing joins its children (the engine process is no daemon).
        atexit.register(self.shutdown)
        self._threads = [threading.Thread(target=self._send_loop, name="microscale-engine-send", daemon=True),
                         threading.Thread(target=self._read_loop, name="microscale-engine-read", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
        to_engine_read, to_engine = ctx.Pipe(duplex=False)
        from_engine, from_engine_write = ctx.Pipe(duplex=False)
        log_level = logging.getLogger("microscale").getEffectiveLevel()
        # Not a daemon: a daemonic process may not start children (its tensor-parallel workers).
        self.process = ctx.Process(target=run_engine_core, name="microscale-engine",
                                   args=(self.args, to_engine_read, from_engine_write, log_level))
        self.process.start()
        # Only the engine process holds these ends now, so each side sees EOF when the other dies.
        to_engine_read.close()
        from_engine_write.close()
        while not from_engine.poll(_STARTUP_POLL_S):
            if not self.process.is_alive():
                raise RuntimeError(f"The engine process exited (code {self.process.exitcode}) while loading the model.")
        message: Ready | StartupFailed = from_engine.recv()
        if isinstance(message, StartupFailed):
            self.process.join()
            raise _remote_error(message.error_type, message.message)
        self._num_sent = 0
        self.metrics.new_engine(message.cache_config, message.peaks)
        self._record_stats(message.stats)
        self._to_engine, self._from_engine = to_engine, from_engine

    @property
    def is_running(self) -> bool:
        return (self.state == "ok" and self.process is not None and self.process.is_alive()
                and all(t.is_alive() for t in self._threads))

    def shutdown(self, timeout: float = _EXIT_WAIT_S) -> None:
        """Stop taking requests and stop the engine process (it aborts what is in flight; open streams end)."""
        if self.process is None or self._stopping:
            return
        with self._lock:
            self._stopping = True
            self.state = "stopping"
        atexit.unregister(self.shutdown)
        self._outbox.put(Shutdown())
        self._outbox.put(None)
        self._reap(timeout)
        for thread in self._threads:
            thread.join(timeout)

    def stop_accepting(self) -> None:
        """New requests get 503 from now on (the server is draining before it shuts down)."""
        with self._lock:
            self.state = "stopping"

    def _set_state(self, state: EngineState) -> None:
        with self._lock:
            if self.state != "stopping":  # a restart during the drain does not take requests again
                self.state = state

    def end_streams(self) -> None:
        """End every open stream and pending call with EngineDeadError (what shutting down left in flight)."""
        self._end_all(EngineDeadError(_UNAVAILABLE["stopping"]))

    def _reap(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine process did not stop in %.0f s; terminating it", timeout)
            self.process.terminate()
            self.process.join(timeout)

    # ---- calls from the event loop --------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: dict[str, Any], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request ({"prompt", "prompt_token_ids"}) as the engine produces them, the
        last one finished. The same object grows from one yield to the next. Closing the iterator early (a
        client that went away) aborts the request, which frees its KV blocks."""
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            self._check_accepting()
            self._streams[request_id] = stream
        self._num_sent += 1
        self._outbox.put(AddRequest(request_id, prompt, params, time.monotonic()))
        output = RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"],
                               [CompletionOutput(i, "", []) for i in range(params.n)], finished=False)
        try:
            while True:
                item = await stream.queue.get()
                # Several steps may be waiting (a slow client, a busy event loop): one chunk carries them all.
                while True:
                    if isinstance(item, BaseException):
                        raise item
                    if item.error is not None:
                        raise RequestFailedError(item.error)
                    _apply(output, item)
                    if stream.queue.empty():
                        break
                    item = stream.queue.get_nowait()
                yield output
                if output.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not output.finished:
                self._outbox.put(Abort(request_id))

    def check_admission(self, num_requests: int = 1) -> None:
        """Raise (before any work starts) unless num_requests more can be taken now."""
        self._check_accepting()
        stats = self.latest_stats
        waiting = stats["num_requests_waiting"] + self._num_sent - stats["requests_received"]
        if self.max_waiting is not None and waiting + num_requests > self.max_waiting:
            raise EngineOverloadedError(f"{waiting} requests are waiting (limit {self.max_waiting}); retry later.")

    async def call(self, method: str, *args: Any) -> Any:
        """engine.method(*args) in the engine process, between steps (work that uses the model, like prompt
        logprobs)."""
        loop = asyncio.get_running_loop()
        call_id = next(self._call_ids)
        future = loop.create_future()
        with self._lock:
            self._check_accepting()
            self._calls[call_id] = (loop, future)
        self._outbox.put(Call(call_id, method, args))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _check_accepting(self) -> None:
        if self.state != "ok":
            raise EngineDeadError(_UNAVAILABLE[self.state])

    # ---- the sender and reader threads ----------------------------------------------------------------

    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._to_engine.send(message)  # the current engine process's pipe (a restart replaces it)
            except OSError:  # that process is gone: the reader thread restarts it; what was in flight has ended
                pass

    def _read_loop(self) -> None:
        """Relay the engine process's messages; each time it dies, end what was in flight and start another, until
        restarts run out."""
        try:
            while (lost := self._relay()) is not None and not self._stopping:
                self.error = lost
                logger.error("the engine stopped: %s", lost)
                if not self._restart():
                    if self.on_failed is not None:
                        self.on_failed()
                    return
        finally:
            self._outbox.put(None)
            self.end_streams()

    def _relay(self) -> str | None:
        """Until the engine process stops: None if it was told to, else why it died."""
        try:
            while True:
                message: FromEngine = self._from_engine.recv()
                match message:
                    case StepReport():
                        self._on_report(message)
                    case Rejected(request_id, error):
                        self._fail_stream(request_id, ValueError(error))
                    case RequestError(request_id, error_type):
                        self._fail_stream(request_id, RequestFailedError(error_type))
                    case Reply():
                        self._on_reply(message)
                    case EngineDied(why):
                        return why
        except (EOFError, OSError):
            if self._stopping:
                return None
            self.process.join(1.0)
            return f"the engine process exited (code {self.process.exitcode})"

    def _restart(self) -> bool:
        """End what was in flight, then start a new engine process if restarts are left (True once it is up)."""
        state: EngineState = "restarting" if self.restarts < self.max_restarts else "failed"
        self._set_state(state)
        self._end_all(EngineDeadError(_UNAVAILABLE[state]))
        self._reap(_EXIT_WAIT_S)
        if state == "failed":
            return False
        self.restarts += 1
        logger.warning("restarting the engine process (restart %d of %d)", self.restarts, self.max_restarts)
        try:
            self._spawn()
        except Exception:
            logger.exception("the engine process could not be restarted")
            self._set_state("failed")
            return False
        if self._stopping:  # shut down while it started (the sender thread is gone): this one stops too
            with suppress(OSError):
                self._to_engine.send(Shutdown())
            return False
        self._set_state("ok")
        return True

    def _on_report(self, report: StepReport) -> None:
        self._record_stats(report.stats)
        self.metrics.record_report(report)
        # One wake-up per event loop and step, not one per request (each costs the loop a self-pipe read).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestDelta]]] = {}
        for delta in report.deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, delta))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _record_stats(self, stats: dict[str, float]) -> None:
        self.latest_stats = {"requests_received": 0, **stats}
        self.metrics.record_stats(self.latest_stats)

    def _on_reply(self, reply: Reply) -> None:
        pending = self._calls.get(reply.call_id)
        if pending is None:
            return  # the caller left
        loop, future = pending
        outcome = _remote_error(*reply.error) if reply.error is not None else None
        loop.call_soon_threadsafe(_settle, future, reply.result, outcome)

    def _fail_stream(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)

    def _end_all(self, error: EngineDeadError) -> None:
        """End every open stream and pending call with error."""
        with self._lock:
            streams, calls = list(self._streams), list(self._calls.values())
        for request_id in streams:
            self._fail_stream(request_id, error)
        for loop, future in calls:
            loop.call_soon_threadsafe(_settle, future, None, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
