"""`serve(...)`: load a model, start its engine, and run the API under uvicorn until SIGTERM or Ctrl-C.

On SIGTERM uvicorn closes the listening socket (no new connections), lets requests in flight finish
within `grace` seconds, cancels what is left (their sequences are aborted), then the engine stops
and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import uvicorn

from tuili.engine.async_llm import AsyncLLM
from tuili.server.app import Server, ServerConfig

log = logging.getLogger("tuili.server")


def configure_logging(level: str = "info") -> None:
    """Server messages and JSON access lines on stderr (uvicorn's own access log is off: ours has
    the timing to the last byte of a stream)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("tuili.server", "tuili.server.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def build_server(model, config: ServerConfig, **engine_options) -> Server:
    """A `Server` for a model (a `Model` or a spec for `tuili.load`) with its own engine thread."""
    return Server(AsyncLLM(model, **engine_options), config)


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, grace: float = 30.0,
          log_level: str = "info", sock: socket.socket | None = None) -> int:
    """Run until stopped; returns the exit status (0 after a graceful stop)."""
    configure_logging(log_level)
    config = uvicorn.Config(server.app, host=host, port=port, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=grace, lifespan="on", timeout_keep_alive=30)
    # uvicorn re-raises the signal that stopped it once it is done; a Python handler makes that a
    # no-op, so a graceful SIGTERM ends with status 0 rather than death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uv = uvicorn.Server(config)
    log.info("serving %s on http://%s:%d (warming up; GET /ready answers 200 when ready)",
             server.config.model_names[0], host, sock.getsockname()[1] if sock else port)
    uv.run(sockets=[sock] if sock else None)
    return 0
