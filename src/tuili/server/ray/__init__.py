"""Scale-out serving on Ray Serve: replicas of tuili's server behind one OpenAI endpoint, with Ray
Serve's autoscaling, health checks and draining, and prefix-aware routing. An optional extra:
`pip install 'tuili[ray]'`. `tuili serve --ray` deploys it; `serve run` takes
`tuili.cli.serve:ray_app` (docs/ray.md)."""

try:
    import ray  # noqa: F401
    from ray import serve  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("tuili.server.ray needs Ray Serve: pip install 'tuili[ray]'") from e

from tuili.server.ray.deployments import Ingress, Replica, ReplicaOptions, application
from tuili.server.ray.router import PrefixRouter

__all__ = ["Ingress", "PrefixRouter", "Replica", "ReplicaOptions", "application"]
