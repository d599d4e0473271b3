"""ASGI middleware: structured access logs with request metrics, API-key checks, body limits.

Pure ASGI (not Starlette's BaseHTTPMiddleware), so streamed responses pass through untouched and
the access log times a request to its last byte, not to its headers.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable

from tuili.server.errors import error_body

access_log = logging.getLogger("tuili.server.access")


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """One JSON line per request (method, path, status, milliseconds to the last byte, client),
    and the requests counter by endpoint and status."""

    def __init__(self, app, count: Callable[[str, int], None], endpoints: set[str]):
        self.app, self.count, self.endpoints = app, count, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            self.count(path if path in self.endpoints else "other", status)
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "ms": round(1000 * (time.perf_counter() - start), 2),
                        "client": f"{client[0]}:{client[1]}" if client else None,
                        "request_id": scope.get("state", {}).get("request_id"),
                    }
                )
            )


class ApiKey:
    """Requests to protected paths need `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app, key: str, open_paths: set[str]):
        self.app, self.key, self.open_paths = app, key.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if not given.startswith(b"Bearer ") or not hmac.compare_digest(given[7:].strip(), self.key):
            return await _send_error(
                send,
                401,
                "missing or wrong API key: send the header "
                "'Authorization: Bearer <key>' with the key the server was started with",
                {"www-authenticate": "Bearer"},
            )
        return await self.app(scope, receive, send)


class BodyLimit:
    """Read a request's body up to `limit` bytes (413 beyond it), check it is UTF-8 (400 if not),
    then hand it on; later receives (the disconnect) go to the client's connection."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"the request body is larger than the server's limit of {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, 413, too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_error(send, 413, too_big)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await _send_error(
                send, 400, f"the request body is not valid UTF-8 (byte {e.start}): send JSON encoded as UTF-8"
            )
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
