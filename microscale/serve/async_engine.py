"""AsyncEngine: one LLMEngine stepped by a background thread, streaming outputs to asyncio callers.

Only the loop thread touches the engine's state (requests, KV blocks); callers on the event loop hand it work
through a thread-safe inbox and get outputs back through per-request asyncio queues, so torch work never
blocks the event loop and the engine needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from microscale.engine.engine import LLMEngine, PromptType
from microscale.outputs import RequestOutput
from microscale.sampling_params import SamplingParams
from microscale.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineOverloadedError(Exception):
    """The waiting queue is full: the client should retry later."""


class EngineDeadError(Exception):
    """The engine loop has stopped (an error in a step, or shutdown)."""


class _Stream:
    """Where one request's outputs go: an asyncio queue on the caller's loop, filled from the loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        self.engine = engine
        # Requests allowed to wait for a slot (in the scheduler or not yet handed to it); None: no limit.
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._num_queued = 0  # added by callers, not yet taken by the loop thread
        self._count_lock = threading.Lock()  # _num_queued moves on both threads
        self._num_waiting = 0  # requests in the scheduler's waiting queue after the last step
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.metrics = ServerMetrics(engine)

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="microscale-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, abort the ones in flight (their streams end), and stop the loop thread."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- calls from the event loop --------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: PromptType, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them, the last one finished. Closing the iterator
        early (a client that went away) aborts the request, which frees its KV blocks."""
        self._check_accepting()
        arrival = time.monotonic()
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        with self._count_lock:
            self._num_queued += 1
        self._submit(lambda: self._add(request_id, prompt, params, arrival))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                # Outputs are cumulative: when several steps' wait (a slow client, a busy event loop), only the
                # latest matters, and one chunk carrying all their tokens costs the server a fraction of many.
                while not stream.queue.empty() and not isinstance(item, BaseException) and not item.finished:
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self._abort(request_id))

    def check_admission(self, num_requests: int = 1) -> None:
        """Raise (before any work starts) unless num_requests more can be taken now."""
        self._check_accepting()
        waiting = self._num_waiting + self._num_queued
        if self.max_waiting is not None and waiting + num_requests > self.max_waiting:
            raise EngineOverloadedError(f"{waiting} requests are waiting (limit {self.max_waiting}); retry later.")

    async def run(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine) on the loop thread, between steps (for work that uses the model, like prompt logits)."""
        self._check_accepting()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def call() -> None:
            try:
                result = fn(self.engine)
            except Exception as e:
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._submit(call)
        return await future

    def _check_accepting(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"The engine loop has stopped: {self.error!r}")
        if not self.is_running:
            raise EngineDeadError("The engine is not running (shutting down).")

    def _submit(self, work: Callable[[], None]) -> None:
        self._inbox.put(work)
        self._wakeup.set()

    # ---- the loop thread ------------------------------------------------------------------------------

    def _add(self, request_id: str, prompt: PromptType, params: SamplingParams, arrival: float) -> None:
        with self._count_lock:
            self._num_queued -= 1
        stream = self._streams.get(request_id)
        if stream is None:
            return  # the caller left before the request reached the engine
        try:
            request = self.engine.add_request(request_id, prompt, params, arrival_time=arrival)
        except ValueError as e:
            stream.put(e)
        else:
            self.metrics.request_added(request)

    def _abort(self, request_id: str) -> None:
        request = self.engine.requests.get(request_id)
        if request is not None:
            self.engine.abort_request(request_id)
            self.metrics.request_aborted(request)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self.metrics.record_stats()  # aborts free KV blocks with no step after them
                    self._wakeup.wait()
                    self._wakeup.clear()  # before draining: work submitted from now on sets it again
                    continue
                started = time.monotonic()
                outputs = self.engine.step()
                self.metrics.record_step(started, outputs)
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        stream.put(output)
                self._num_waiting = self.engine.scheduler.num_requests()[1]
        except BaseException as e:
            logger.exception("engine loop died")
            self.error = e
        finally:
            self._stop_all()

    def _drain_inbox(self) -> None:
        while True:
            try:
                work = self._inbox.get_nowait()
            except queue.Empty:
                return
            work()

    def _stop_all(self) -> None:
        """Abort everything in flight and end every open stream with EngineDeadError."""
        self._stopping = True
        self._drain_inbox()
        for request_id in list(self.engine.requests):
            self._abort(request_id)
        reason = f"The engine loop has stopped: {self.error!r}" if self.error else "The server is shutting down."
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError(reason))


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
