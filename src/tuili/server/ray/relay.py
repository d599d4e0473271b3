"""An HTTP request carried from the ingress to a replica as a Ray call, and the replica's side:
running it through the replica's own ASGI app (tuili's whole API, unchanged) and streaming back the
ASGI messages the app sends. The request also carries digests of its prompt's beginning, which the
prefix router (`router.py`) reads, since a router sees a call's arguments but not an HTTP body."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

CHUNK = 256  # prompt bytes per prefix digest: a few KV-cache blocks of text
MAX_CHUNKS = 32  # digests of the first 8 KiB at most


@dataclass(frozen=True)
class Forwarded:
    """What the ingress received: enough to replay it as an ASGI request on a replica."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    prefix: tuple[bytes, ...] = field(default=())  # digests of the prompt's first 1, 2, ... chunks


def prompt_text(path: str, body: bytes) -> str:
    """The text a generation request's prompt starts with: its messages (role and content, in
    order, so a shared system prompt is a shared beginning) or its prompt; '' for anything else."""
    if not path.endswith(("/completions", "/tokenize")):
        return ""
    try:
        request = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(request, dict):
        return ""
    messages = request.get("messages")
    if isinstance(messages, list):
        return "".join(f"{m.get('role')}\x00{_content(m.get('content'))}\x01" for m in messages if isinstance(m, dict))
    prompt = request.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):  # a batch: its first
        prompt = prompt[0]
    if isinstance(prompt, list):  # token ids
        return ",".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""


def _content(content: Any) -> str:
    if isinstance(content, list):  # parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def prefix_digests(text: str) -> tuple[bytes, ...]:
    """Digests of the text's first CHUNK, 2 * CHUNK, ... bytes (whole chunks only): two prompts
    share the first k digests exactly when they share their first k chunks."""
    data = text.encode()
    running = hashlib.blake2b(digest_size=8)
    digests = []
    for start in range(0, min(len(data) // CHUNK, MAX_CHUNKS) * CHUNK, CHUNK):
        running.update(data[start : start + CHUNK])
        digests.append(running.copy().digest())
    return tuple(digests)


Message = dict[str, Any]


def signed(app: Callable, name: bytes) -> Callable:
    """`app`, its answers' headers naming the replica that gave them (x-tuili-replica)."""

    async def answer(scope: dict, receive: Callable, send: Callable) -> None:
        async def send_signed(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-tuili-replica", name)]}
            await send(message)

        await app(scope, receive, send_signed if scope["type"] == "http" else send)

    return answer


def _coalesced(message: Message, sent: asyncio.Queue) -> Message:
    """The body message and the ones queued behind it, as one: when the caller reads more slowly
    than the app writes (a busy machine), one Ray item carries several chunks instead of each its own."""
    parts = [message.get("body", b"")]
    while message.get("more_body") and not sent.empty():
        following = sent.get_nowait()
        if following is None or following["type"] != "http.response.body":
            sent.put_nowait(following)  # put back: only body messages join  # type: ignore[arg-type]
            break
        parts.append(following.get("body", b""))
        message = following
    return {**message, "body": b"".join(parts)} if len(parts) > 1 else message


async def relay(app: Callable, request: Forwarded) -> AsyncIterator[Message]:
    """The ASGI messages `app` sends in answer to `request`, as it sends them. When the caller
    stops listening (the client left, or the ingress cancelled the call), the app is told the
    client disconnected, as a server would tell it, and given a moment to clean up (abort its
    sequences) before it is cancelled."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query,
        "root_path": "",
        "headers": request.headers,
        "client": request.client,
        "server": None,
    }
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body = [{"type": "http.request", "body": request.body, "more_body": False}]

    async def receive() -> Message:
        if body:
            return body.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    answered = False
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.body":
                message = _coalesced(message, sent)
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True
                break
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
    if not answered and task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]  # an app that failed without answering
