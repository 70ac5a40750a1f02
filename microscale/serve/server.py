"""Running the app under uvicorn, ending cleanly: on SIGTERM/SIGINT new requests get 503 and idle connections
close, streams in flight get drain_seconds to finish, then each one left ends with an error event and
`data: [DONE]` (never a cut body) before the engine stops. The exit code says whether the engine failed for good
(its restarts used up), so that a supervisor starts the server again."""

from __future__ import annotations

import asyncio
import socket
import threading

import uvicorn
from fastapi import FastAPI

from microscale.serve.async_engine import AsyncEngine


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


def serve(app: FastAPI, engine: AsyncEngine, host: str, port: int, drain_seconds: float, log_level: str) -> int:
    """Serve until a signal (exit code 0) or until the engine fails for good (1)."""
    server = _DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level), engine, drain_seconds)
    failed = threading.Event()

    def on_failed() -> None:
        failed.set()
        server.should_exit = True  # uvicorn's main loop checks it a few times a second

    engine.on_failed = on_failed
    server.run()
    return 1 if failed.is_set() or not server.started else 0
