"""Running the app under uvicorn on a socket bound beforehand (bind(): a busy or invalid port fails at once, before
the model loads), ending cleanly: on SIGTERM/SIGINT new requests get 503 and idle connections close, streams in
flight get drain_seconds to finish, then each one left ends with an error event and `data: [DONE]` (never a cut
body) before the engine stops. The exit code says whether the engine failed for good (its restarts used up), so
that a supervisor starts the server again. Each request gets an access line (method, path, status) at INFO unless
access_log is off, as vLLM's server logs them."""

from __future__ import annotations

import asyncio
import copy
import functools
import socket
import threading

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from microscale.serve.async_engine import AsyncEngine

LISTEN_BACKLOG = 2048  # uvicorn's default


class BindError(Exception):
    """The server cannot listen where it was asked to (its message says where and why)."""


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening (clients are refused, not kept waiting, until the
    server calls listen() once the model is loaded)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # As uvicorn does: a restarted server may bind at once over its predecessor's TIME_WAIT connections (a
        # port another socket listens on still fails).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0-65535
        sock.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BindError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _log_config(log_level: str) -> dict:
    """uvicorn's logging with its own messages at log_level, but the access lines at INFO whatever it is."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["uvicorn.error"]["level"] = log_level.upper()
    return config


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
    app: FastAPI, engine: AsyncEngine, sock: socket.socket, drain_seconds: float, log_level: str,
    header_timeout: float, access_log: bool = True,
) -> int:
    """Serve on `sock` (bound, and listening) until a signal (exit code 0) or until the engine fails for good (1)."""
    protocol = functools.partial(_HeaderTimeoutProtocol, header_timeout=header_timeout)
    config = uvicorn.Config(app, http=protocol, log_config=_log_config(log_level), log_level=None,
                            access_log=access_log, backlog=LISTEN_BACKLOG)
    server = _DrainingServer(config, engine, drain_seconds)
    failed = threading.Event()

    def on_failed() -> None:
        failed.set()
        server.should_exit = True  # uvicorn's main loop checks it a few times a second

    engine.on_failed = on_failed
    server.run(sockets=[sock])
    return 1 if failed.is_set() or not server.started else 0
