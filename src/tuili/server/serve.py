"""`serve(...)`: load a model, start its engine, and run the API under uvicorn until SIGTERM or Ctrl-C.

On SIGTERM (or Ctrl-C) uvicorn closes the listening socket (no new connections), lets requests in flight finish
within `grace` seconds, cancels what is left (their sequences are aborted), then the engine stops
and the process exits 0. A fault in the engine's shared work (see `LLMEngine.step`) stops the
engine: the server then stops too and the process exits 3, so a supervisor (systemd, Kubernetes)
restarts it; a fault in one request's own work ends that request alone.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import uvicorn

from tuili.engine.async_llm import AsyncLLM
from tuili.server.app import Server
from tuili.server.config import ServerConfig

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


@dataclass(frozen=True)
class ServerParts:
    """What a server is made of, before anything is loaded: the model to load and how, the server's
    config and the engine's options. `tuili serve` makes one from its options; a Ray replica
    receives one and builds its own server from it."""

    model: str
    config: ServerConfig
    engine: dict = field(default_factory=dict)  # LLMEngine's options (max_num_seqs, kv_cache_bytes, ...)
    dtype: str = "float32"
    keep_quantized: bool = False
    threads: int | None = None
    chat_template: str | None = None  # replaces the model's own

    def build(self, own_thread: bool = False) -> Server:
        """Load the model and make its server; the engine loop runs where `serve` runs it (the
        main thread) or, with `own_thread`, on a thread of its own that loads the model first, so
        that all of torch's work happens on one thread (see AsyncLLM on GNU OpenMP: a model loaded
        on one thread and run on another decoded at 0.6× in a Ray replica)."""
        if not own_thread:
            return self._build()
        built: queue.Queue = queue.Queue(1)

        def engine() -> None:
            try:
                server = self._build()
            except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
                built.put(e)
                return
            built.put(server)
            server.llm.run()

        threading.Thread(target=engine, name="tuili-engine", daemon=True).start()
        server = built.get()
        if isinstance(server, BaseException):
            raise server
        return server

    def _build(self) -> Server:
        from tuili.models import load

        if self.threads:
            torch.set_num_threads(self.threads)
        start = time.perf_counter()
        model = load(self.model, dtype=self.dtype, keep_quantized=self.keep_quantized)
        log.info("loaded %s (%s) in %.1f s", self.model, model.config.architecture, time.perf_counter() - start)
        if self.chat_template is not None:
            model.tokenizer.chat_template = self.chat_template
        return build_server(model, self.config, threads=self.threads, **self.engine)


def build_server(model, config: ServerConfig, own_thread: bool = False, **engine_options) -> Server:
    """A `Server` for a model (a `Model` or a spec for `tuili.load`) whose engine loop `serve` runs
    on the calling (main) thread, or, with `own_thread`, runs on a thread of its own at once."""
    return Server(AsyncLLM(model, own_thread=own_thread, **engine_options), config)


ENGINE_FAILED = 3  # the exit status after the engine stopped on a fault


def serve(
    server: Server,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace: float = 30.0,
    log_level: str = "info",
    sock: socket.socket | None = None,
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
) -> int:
    """Run until SIGTERM or Ctrl-C; returns the exit status (0 after a graceful stop, 1 if it could
    not start, ENGINE_FAILED if the engine stopped on a fault).

    The engine loop runs on this thread and uvicorn's event loop on a second one (see AsyncLLM on
    OpenMP and the main thread); signals reach this thread and ask uvicorn to shut down gracefully:
    it stops accepting, waits up to `grace` seconds for requests in flight, and its lifespan's end
    stops the engine loop, which returns here.
    """
    configure_logging(log_level)
    config = uvicorn.Config(
        server.app,
        host=host,
        port=port,
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=grace,
        lifespan="on",
        timeout_keep_alive=30,
        ssl_keyfile=ssl_keyfile,
        ssl_certfile=ssl_certfile,
    )
    uv = uvicorn.Server(config)

    def stop(signum, frame):
        if uv.should_exit and signum == signal.SIGINT:
            uv.force_exit = True  # a second Ctrl-C: do not wait for requests in flight
        uv.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def http() -> None:
        try:
            uv.run(sockets=[sock] if sock else None)
        finally:
            server.llm.shutdown()  # uvicorn has stopped (or never started): end the engine loop

    thread = threading.Thread(target=http, name="tuili-http")
    log.info(
        "serving %s on http://%s:%d (warming up; GET /ready answers 200 when ready)",
        server.config.model_names[0],
        host,
        sock.getsockname()[1] if sock else port,
    )
    try:
        thread.start()
        server.llm.run()
        if server.llm.error is not None:
            log.error(
                "the engine stopped on a fault (%s: %s); the server exits with status %d so that its "
                "supervisor restarts it",
                type(server.llm.error).__name__,
                server.llm.error,
                ENGINE_FAILED,
            )
            uv.should_exit = True
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if server.llm.error is not None:
        return ENGINE_FAILED
    if not uv.started:
        log.error("the server could not start on %s:%d (is the port in use?)", host, port)
        return 1
    return 0
