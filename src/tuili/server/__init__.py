"""The model server: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the engine, with a
dynamic batcher for embeddings and scoring, Prometheus metrics, limits and graceful shutdown."""

from tuili.server.app import Server
from tuili.server.batcher import DynamicBatcher
from tuili.server.config import ServerConfig
from tuili.server.serve import ServerParts, build_server, serve

__all__ = ["DynamicBatcher", "Server", "ServerConfig", "ServerParts", "build_server", "serve"]
