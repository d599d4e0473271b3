"""`tuili serve --ray`: join a Ray cluster (or start a local one), deploy the application, serve
until SIGTERM or Ctrl-C, then take it down gracefully (replicas finish what they are generating,
within --grace seconds) and stop the local cluster if this process started it."""

from __future__ import annotations

import logging
import os
import signal
import threading

from tuili.server.ray.deployments import ReplicaOptions
from tuili.server.serve import ServerParts, configure_logging

log = logging.getLogger("tuili.server")
APP = "tuili"
# Ray Serve gives its HTTP proxy 5 s to start and answer health checks; a small machine that is
# busy (the replicas loading their models) misses that and Ray kills the proxy in a loop. A local
# cluster started here inherits these; a cluster joined with --ray-address keeps its own settings.
PATIENT = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def run(
    parts: ServerParts,
    options: ReplicaOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ssl: tuple[str, str] | None = None,
    log_level: str = "info",
) -> int:
    """Serve until SIGTERM or Ctrl-C on `address`'s cluster (None: a local one started here); returns
    the exit status (0 after a graceful stop, 1 if the replicas could not start)."""
    import ray
    from ray import serve

    from tuili.server.ray.deployments import application

    configure_logging(log_level)
    if address is None:
        for name, value in PATIENT.items():
            os.environ.setdefault(name, value)
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    http: dict = {"host": host, "port": port}
    if ssl:
        http |= {"ssl_keyfile": ssl[0], "ssl_certfile": ssl[1]}
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options=http)
        try:
            serve.run(application(parts, options), name=APP, route_prefix="/", blocking=False)
        except RuntimeError as e:
            log.error("the replicas could not start: %s", str(e).strip().splitlines()[-1])
            return 1
        count = f"{options.min_replicas or 1}-{options.max_replicas}" if options.max_replicas else options.replicas
        log.info("serving %s on http://%s:%d: %s replicas through Ray Serve, %s router",
                 parts.config.model_names[0], host, port, count, options.router)  # fmt: skip
        stop.wait()
        log.info("stopping: replicas finish what they are generating (at most %g s)", options.grace)
        serve.delete(APP)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if address is None:
            serve.shutdown()
            ray.shutdown()
