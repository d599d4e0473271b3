"""`tuili serve --ray`'s options: replicas of the server on a Ray cluster behind one endpoint
(`tuili.server.ray`). Without --ray they are refused, since nothing would honour them."""

from __future__ import annotations

import argparse

ROUTERS = ("pow2", "prefix", "direct")


def add(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (tuili serve --ray; pip install 'tuili[ray]')")
    g.add_argument("--ray", action="store_true", help="serve replicas of this server through Ray Serve")
    g.add_argument(
        "--ray-address", help="the Ray cluster to join ('auto': the one on this node; default: start a local one)"
    )
    g.add_argument("--replicas", type=int, help="a fixed number of replicas (default 1; or autoscale with the next)")
    g.add_argument("--min-replicas", type=int, help="autoscaling: the fewest replicas (default 1)")
    g.add_argument("--max-replicas", type=int, help="autoscaling: the most replicas (turns autoscaling on)")
    g.add_argument(
        "--target-ongoing-requests",
        type=float,
        help="autoscaling: requests per replica it aims for (default: half of --max-ongoing-requests)",
    )
    g.add_argument(
        "--max-ongoing-requests",
        type=int,
        help="requests a replica takes at once (its engine runs --max-num-seqs of them, the rest wait in its "
        "queue); more wait at the router, and past --max-queued-requests get 429 (default: 4 × --max-num-seqs)",
    )
    g.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="CPUs Ray reserves for each replica; its engine runs that many threads unless --threads says",
    )
    g.add_argument(
        "--ray-router",
        choices=ROUTERS,
        default="pow2",
        help="pow2: Ray Serve's power of two choices; prefix: requests that share a prompt's beginning go to "
        "the replica that has it cached, which pays when replicas cannot each hold every shared prompt (both "
        "through tuili's ingress: a request whose replica dies before answering is sent to another); direct: "
        "HTTP straight from Ray's proxy to the replicas, by power of two choices, one hop fewer but no retry",
    )


RAY_ONLY = (
    "ray_address",
    "replicas",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "max_ongoing_requests",
)


def check(args: argparse.Namespace) -> None:
    """ValueError for Ray options without --ray, or values Ray Serve would refuse later and less clearly."""
    if not args.ray:
        given = [f"--{name.replace('_', '-')}" for name in RAY_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to replicas: add --ray, or remove them")
        return
    for name in ("replicas", "min_replicas", "max_replicas", "max_ongoing_requests"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "min_replicas" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise ValueError("give --replicas (a fixed number) or --min-replicas/--max-replicas (autoscaling), not both")
    if args.min_replicas is not None and args.max_replicas is None:
        raise ValueError("--min-replicas needs --max-replicas (autoscaling between the two)")
    if args.max_replicas is not None and args.max_replicas < (args.min_replicas or 1):
        raise ValueError(f"--max-replicas {args.max_replicas} is below --min-replicas {args.min_replicas or 1}")
    if args.target_ongoing_requests is not None and not args.target_ongoing_requests > 0:
        raise ValueError(f"--target-ongoing-requests must be positive, got {args.target_ongoing_requests}")
    if args.target_ongoing_requests is not None and args.max_replicas is None:
        raise ValueError("--target-ongoing-requests steers autoscaling: add --max-replicas")
    if not args.cpus_per_replica > 0:
        raise ValueError(f"--cpus-per-replica must be positive, got {args.cpus_per_replica}")


def replicas(args: argparse.Namespace):
    """The options as `tuili.server.ray.ReplicaOptions`."""
    try:
        from tuili.server.ray import ReplicaOptions
    except ImportError as e:
        raise ValueError(f"--ray: {e}") from None
    return ReplicaOptions(
        replicas=args.replicas or 1,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=args.max_ongoing_requests or 4 * args.max_num_seqs,
        max_queued_requests=args.max_queued_requests,
        cpus_per_replica=args.cpus_per_replica,
        router=args.ray_router,
        grace=args.grace,
    )
