"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, for every failure the server
reports, bad input included (as 4xx: FastAPI's own 422 validation errors become 400), unexpected errors too (a
generic 500)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from microscale.serve.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None, error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.error_type = error_type  # None: the status's usual type


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, error_type: str | None = None
) -> dict:
    error_type = error_type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code)).model_dump()


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.status, error.message, error.param, error.code, error.error_type)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "Invalid request.")
        if param:
            message = f"{param}: {message}"
        return error_response(APIError(400, message, param, first.get("type")))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Generic on purpose: exception text can hold paths and internals. Starlette re-raises it for the log.
        return error_response(APIError(500, "The server had an error while processing the request."))
