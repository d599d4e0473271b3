"""Errors as the OpenAI API returns them: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can cause is a 4xx with a message that says what to change; anything else
is a 500 whose details stay in the server's log, and the server keeps serving.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("tuili.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class FieldError(ValueError):
    """A request check that spans the body but blames one top-level field (`param` in the response)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message if param is None or message.startswith(param) else f"{param}: {message}")
        self.param = param


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the top-level field at fault."""
    parts, param = [], None
    for e in error.errors()[:5]:
        kind, loc = e.get("type"), [str(x) for x in e.get("loc", ()) if x != "body"]
        if kind == "json_invalid":
            return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
        if not loc and kind == "missing":
            return "the request body is missing: send a JSON object", None
        if not loc and kind != "value_error":  # a model-level check (value_error) has its own message
            return "the request body must be a JSON object with the request's fields", None
        # a union's alternatives add their type names ("str", "list[int]") to the location: drop them
        path = [x for x in loc if x not in _TYPE_NAMES and "[" not in x] or loc[:1]
        cause = e.get("ctx", {}).get("error")
        param = param or (path[0] if path else getattr(cause, "param", None))
        message = e.get("msg", "invalid value").removeprefix("Value error, ")
        parts.append(f"{'.'.join(path)}: {message}" if path else message)
    return "; ".join(dict.fromkeys(parts)), param


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, param = _validation_message(e)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be parsed: send a JSON object as UTF-8"
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(e).__name__}); the server's log has details")
