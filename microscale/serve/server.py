"""Running the app under uvicorn, ending cleanly: on SIGTERM/SIGINT new requests get 503 and idle connections
close, streams in flight get drain_seconds to finish, then each one left ends with an error event and
`data: [DONE]` (never a cut body) before the engine stops. The exit code says whether the engine failed for good
(its restarts used up), so that a supervisor starts the server again."""

from __future__ import annotations

import asyncio
import functools
import socket
import threading

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from microscale.serve.async_engine import AsyncEngine


class _HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn starts no timer before a request's headers are complete, so a client that trickles them (or sends
    none) holds its connection forever: close it when its headers have not all arrived `header_timeout` seconds
    after the connection opened or its request began."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self.header_timer = self.loop.call_later(self.header_timeout, self.transport.close)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_seconds: float) -> None:
        super().__init__(config)
        self.engine, self.drain_seconds = engine, drain_seconds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.stop_accepting()
        # uvicorn waits for every response to end; the timer ends the streams still open once the drain is over.
        timer = asyncio.get_running_loop().call_later(self.drain_seconds, self.engine.end_streams)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def serve(
    app: FastAPI, engine: AsyncEngine, host: str, port: int, drain_seconds: float, log_level: str,
    header_timeout: float,
) -> int:
    """Serve until a signal (exit code 0) or until the engine fails for good (1)."""
    protocol = functools.partial(_HeaderTimeoutProtocol, header_timeout=header_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol)
    server = _DrainingServer(config, engine, drain_seconds)
    failed = threading.Event()

    def on_failed() -> None:
        failed.set()
        server.should_exit = True  # uvicorn's main loop checks it a few times a second

    engine.on_failed = on_failed
    server.run()
    return 1 if failed.is_set() or not server.started else 0
