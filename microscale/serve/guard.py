"""RequestGuard: pure ASGI middleware that bounds what a request costs before the app sees it.

In order: the API key is checked from the headers alone (an unauthenticated client cannot make the server read,
let alone parse, its body); a declared Content-Length over the limit is refused at once; the body is then read
chunk by chunk, refused as soon as it passes the limit (never buffered past it) or when it has not all arrived
within the body timeout (a slow-body client cannot hold a request open). The app then gets the body in one
message and the connection's later messages (disconnects) as they come.

A client that never finishes its headers never reaches an ASGI app: server.py's protocol closes it after the
header timeout (uvicorn itself bounds only the headers' size, 16 KiB).
"""

from __future__ import annotations

import asyncio
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microscale.serve.errors import APIError, error_response
from microscale.serve.limits import ServeLimits

_AUTHED_PREFIX = "/v1/"


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _authorized(scope: Scope, api_key: str) -> bool:
    scheme, _, token = _header(scope, b"authorization").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


class RequestGuard:
    def __init__(self, app: ASGIApp, limits: ServeLimits, api_key: str | None = None) -> None:
        self.app, self.limits, self.api_key = app, limits, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if self.api_key is not None and scope["path"].startswith(_AUTHED_PREFIX) \
                    and not _authorized(scope, self.api_key):
                raise APIError(401, "Missing or invalid API key (Authorization: Bearer KEY).", code="invalid_api_key")
            body = await self._read_body(scope, receive)
        except APIError as e:
            await error_response(e)(scope, receive, send)
            return
        if body is not None:
            await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None if the client left before sending it."""
        limit = self.limits.max_request_bytes
        too_large = APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                             code="request_too_large")
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise too_large

        async def collect() -> bytes | None:
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                if len(body) > limit:
                    raise too_large
                if not message.get("more_body", False):
                    return bytes(body)

        try:
            return await asyncio.wait_for(collect(), self.limits.body_timeout_s)
        except asyncio.TimeoutError:  # TimeoutError's alias from 3.11; asyncio's own class on 3.10
            raise APIError(408, f"The request body did not arrive within {self.limits.body_timeout_s:g} s.",
                           code="request_timeout") from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's receive: the whole body once, then the connection's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
