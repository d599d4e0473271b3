"""The two Ray Serve deployments and the application they make.

- `Replica`: one tuili server (the compressed model loaded once, its engine, its whole OpenAI API),
  on `--cpus-per-replica` CPUs with as many engine threads. Ray Serve scales it (a fixed count, or
  autoscaling on requests in flight), health-checks it through its engine loop, and drains it on
  scale-down (`--grace` seconds for requests in flight).
- `Ingress`: reads each HTTP request, forwards it to a replica as a Ray call (the request router
  picks the replica: prefix-aware or power of two choices) and streams the answer back. A request
  that found its replica gone before any of the answer was sent is sent again to another (up to
  `RETRIES` times); a stream that had started ends with an error event, since tokens already sent
  cannot be taken back; a full deployment answers 429, as `tuili serve` does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tuili.server.errors import error_response
from tuili.server.middleware import BodyLimit
from tuili.server.openai import sse_error
from tuili.server.ray.relay import Forwarded, prefix_digests, prompt_text, relay, signed
from tuili.server.ray.router import PrefixRouter
from tuili.server.serve import ServerParts

log = logging.getLogger("tuili.server")
RETRIES = 2  # other replicas a request is sent to when its replica is gone before answering
HEALTH_TIMEOUT = 10.0  # seconds the engine loop has to answer a health check
REPLICA_GONE = (RayActorError, ActorUnavailableError)
STOPPED = "the replica generating this stream stopped; what was sent stands, ask again for the rest"
REPLICA_NAME, INGRESS_NAME = "tuili-replica", "tuili-ingress"  # what serve config files refer to
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@dataclass(frozen=True)
class ReplicaOptions:
    """How Ray Serve runs the replicas: a fixed count, or autoscaling between min and max aiming at
    `target_ongoing_requests` each; requests a replica takes at once (the rest wait at the router,
    and past `max_queued_requests` get 429); CPUs per replica (its engine's threads, unless the
    server's parts say); the router ("pow2", "prefix" or "direct"); seconds a stopping replica drains."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None  # set: autoscaling
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int = 64  # 4 × the engine's 16 sequences: see tuili.cli.ray_options
    max_queued_requests: int = 256
    cpus_per_replica: float = 1.0
    router: str = "pow2"
    grace: float = 30.0


class Replica:
    async def __init__(self, parts: ServerParts):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        warm = parts.config.warmup  # warmed here, before Ray sends it requests
        parts = replace(parts, threads=parts.threads or max(1, int(cpus)), config=replace(parts.config, warmup=False))
        self.server = await asyncio.to_thread(parts.build, own_thread=True)
        name = f"{serve.get_replica_context().replica_id.unique_id} (pid {os.getpid()})"
        self.asgi = signed(self.server.app, name.encode())  # answers name the replica and its process
        if warm:
            await self.server.warm_up()
        self.server.ready = True  # the app's lifespan would say so; here the app runs per request

    async def __del__(self):
        """Ray Serve calls this when the replica stops (after draining, on scale-down or shutdown)."""
        await self.server.close()

    async def relay(self, request: Forwarded):
        """The ASGI messages of this replica's answer to a forwarded request (a streaming call)."""
        async for message in relay(self.asgi, request):
            yield message

    async def check_health(self) -> None:
        """Ray Serve's health check: the engine loop is running and answers between two steps."""
        llm = self.server.llm
        if not llm.alive:
            raise RuntimeError(f"the engine has stopped: {llm.error or 'shut down'}")
        await asyncio.wait_for(llm.call(int), timeout=HEALTH_TIMEOUT)


class DirectReplica(Replica):
    """A replica that is the application's HTTP ingress itself: Ray Serve's proxy sends requests
    straight to its FastAPI app, by power of two choices. One Ray hop fewer than through `Ingress`
    (about 12 ms less a request here), but no prompt to route on, and a replica that dies under a
    request leaves the answer to Ray's proxy: a plain-text 500, no retry, no error event."""

    def __serve_build_asgi_app__(self):
        return self.asgi


class Ingress:
    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int):
        self.replicas = replicas.options(stream=True)
        route = Route("/{path:path}", self.forward, methods=METHODS)
        self.front = Starlette(routes=[route], middleware=[Middleware(BodyLimit, limit=max_body_bytes)])

    def __serve_build_asgi_app__(self):
        return self.front

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        forwarded = Forwarded(
            request.method,
            path,
            request.scope.get("query_string", b""),
            list(request.scope["headers"]),
            body,
            (request.client.host, request.client.port) if request.client else None,
            prefix_digests(prompt_text(path, body)),
        )
        gone: BaseException | None = None
        for _ in range(1 + RETRIES):
            answer = self.replicas.relay.remote(forwarded)
            try:
                start = await answer.__anext__()
                first = await answer.__anext__()
            except BackPressureError:
                message = "every replica is busy and the queue in front of them is full; retry shortly"
                return error_response(429, message, headers={"Retry-After": "1"})
            except REPLICA_GONE as e:
                log.warning("a replica went away before answering %s %s; sending it to another", request.method, path)
                gone = e
                continue
            except asyncio.CancelledError:  # the client left before the answer began: stop the replica's work
                answer.cancel()
                raise
            return _response(start, first, answer)
        message = f"no replica could answer ({type(gone).__name__}); Ray Serve is restarting them, retry shortly"
        return error_response(503, message, headers={"Retry-After": "2"})


def _response(start: dict, first: dict, rest) -> Response:
    """The replica's answer as this server's: whole if it came in one message, else streamed."""
    if not first.get("more_body"):
        response = Response(first.get("body", b""), status_code=start["status"])
        response.raw_headers = list(start["headers"])
        return response
    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])

    async def body():
        yield first.get("body", b"")
        try:
            async for message in rest:
                if message["type"] == "http.response.body":
                    yield message.get("body", b"")
        except REPLICA_GONE as e:
            log.warning("the replica of a stream went away mid-answer: %s", e)
            if sse:  # the tokens sent stand; the client is told the rest will not come
                yield sse_error(503, STOPPED)
        finally:
            rest.cancel()

    response = StreamingResponse(body(), status_code=start["status"])
    response.raw_headers = list(start["headers"])
    return response


def application(parts: ServerParts, options: ReplicaOptions = ReplicaOptions()):
    """The Ray Serve application: the ingress bound to the replicas of the server `parts` describe."""
    settings: dict = dict(
        name=REPLICA_NAME,
        ray_actor_options={"num_cpus": options.cpus_per_replica},
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
        graceful_shutdown_timeout_s=options.grace,
        health_check_period_s=5.0,
        health_check_timeout_s=3 * HEALTH_TIMEOUT,
    )
    if options.max_replicas is not None:
        settings["autoscaling_config"] = {
            "min_replicas": 1 if options.min_replicas is None else options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests or options.max_ongoing_requests / 2,
        }
    else:
        settings["num_replicas"] = options.replicas
    if options.router == "direct":
        return serve.deployment(**settings)(serve.ingress()(DirectReplica)).bind(parts)
    if options.router not in ("prefix", "pow2"):
        raise ValueError(f"router {options.router!r}: tuili's are 'prefix', 'pow2' and 'direct'")
    if options.router == "prefix":
        settings["request_router_config"] = RequestRouterConfig(request_router_class=PrefixRouter)
    replicas = serve.deployment(**settings)(Replica).bind(parts)
    ingress = serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
    return ingress(serve.ingress()(Ingress)).bind(replicas, parts.config.max_body_bytes)
