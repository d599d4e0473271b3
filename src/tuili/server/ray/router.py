"""Prefix-aware routing on Ray Serve's request-router API: a request whose prompt begins like one
a replica served before goes to that replica, whose prefix cache holds that beginning's KV blocks,
unless it is busier than the least busy candidate by more than `imbalance` requests; other requests
go by power of two choices, and the replica chosen becomes the owner of their beginnings.

Ray Serve LLM has a prefix router too (`PrefixCacheAffinityRouter`), but it needs vLLM or SGLang
installed, keeps its prefix tree in a separate actor that it calls with blocking `ray.get` from the
routing loop, and matches character by character. This one keeps a bounded table of chunk digests
in the router's own process (`relay.prefix_digests`, computed once by the ingress): a lookup is a
few dictionary reads. Each ingress replica's router learns from the requests it routes.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


def _digests(request: PendingRequest | None) -> tuple[bytes, ...]:
    if request is None or not request.args:
        return ()
    return getattr(request.args[0], "prefix", ())


class PrefixRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, imbalance: int = 2, capacity: int = 200_000) -> None:
        """imbalance: how many more requests in flight the owner of a prefix may have than the
        least busy candidate and still get it; capacity: digests remembered (least recent go)."""
        self.imbalance, self.capacity = imbalance, capacity
        self.owners: OrderedDict[bytes, ReplicaID] = OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        pair = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        owner = self._owner(candidate_replicas, _digests(pending_request))
        if owner is None:
            return [pair]
        rest = [r for r in pair if r is not owner]
        return [[owner], rest] if rest else [[owner]]  # the owner first; the others if it cannot take it now

    def _owner(self, candidates: list[RunningReplica], digests: tuple[bytes, ...]) -> RunningReplica | None:
        """The candidate owning the longest of the digests, if it is not too much busier than the rest."""
        by_id = {r.replica_id: r for r in candidates}
        for digest in reversed(digests):
            owner = by_id.get(self.owners.get(digest))  # type: ignore[arg-type]
            if owner is not None:
                return owner if self._balanced(owner, candidates) else None
        return None

    def _balanced(self, owner: RunningReplica, candidates: list[RunningReplica]) -> bool:
        # the queue lengths the router last learned (Ray's base class keeps them; absent, trust the owner)
        cache = getattr(self, "_replica_queue_len_cache", None)
        if cache is None:
            return True
        known = [q for q in (cache.get(r.replica_id) for r in candidates) if q is not None]
        mine = cache.get(owner.replica_id)
        return mine is None or not known or mine - min(known) <= self.imbalance

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        for digest in _digests(pending_request):
            self.owners[digest] = replica_id
            self.owners.move_to_end(digest)
        while len(self.owners) > self.capacity:
            self.owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for digest in [d for d, owner in self.owners.items() if owner == replica_id]:
            del self.owners[digest]
