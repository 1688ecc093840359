"""`svid.revocation.v1.Revocations/Watch`: the revocation list for verifiers in workloads.

Full state on every message, sent at once and again whenever the cache's revocations or CRL
change: the same push the Workload API streams get, so a verifier fed from here refuses a
revoked credential as soon as the agent knows of it. Each message says how long the agent has
been out of sync with the server (`out_of_sync_ms`), and one is sent when the agent's Sync
stream is lost and when it is back: the stream to the verifier is otherwise quiet, and stays
healthy through a partition behind the agent, while revocations made at the server stop
coming. Only those two moments send (not the count growing in between), and a stream that
could not send meanwhile sends the state it finds, once: a flapping link costs each verifier
two messages per reconnect, and the Syncer's backoff (doubling to reconnect_max, reset only by
a connection that held 30 s) spaces those. No grace holds a loss back: a verifier's
max_revocation_staleness is the grace it chose, and a partition looks like a reconnect until
it has lasted.
"""

# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc

from agent_attestor.cache import Cache, Snapshot
from agent_attestor.caller_check import checked_caller, not_serving, open_stream
from agent_attestor.cancel import cancel_all
from agent_attestor.peer import CallerRegistry
from agent_attestor.server_link import ServerLink
from agent_attestor.stream_budget import StreamBudget
from svid._proto import revocation_pb2, revocation_pb2_grpc
from svid._revocation import KIND_JWT_ID, KIND_TASK, KIND_X509_SERIAL

# (kind, value) -> the credential's expiry; 0 when the agent was not told (keep it listed).
Expiries = Callable[[], Mapping[tuple[str, str], int]]


def revocation_list(
    snap: Snapshot, expiries: Mapping[tuple[str, str], int]
) -> revocation_pb2.RevocationList:
    # Whose credential each one is, as the server said: a verifier's on_revoked callback then
    # knows the task (txn) of any workload's revoked token, not only of its own SVIDs.
    ids = snap.revocation_spiffe_ids
    items = [
        revocation_pb2.Revoked(
            kind=KIND_X509_SERIAL,
            value=s,
            expires_at=expiries.get((KIND_X509_SERIAL, s), 0),
            spiffe_id=ids.get((KIND_X509_SERIAL, s), ""),
        )
        for s in sorted(snap.revoked_serials)
    ]
    items.extend(
        revocation_pb2.Revoked(
            kind=KIND_JWT_ID,
            value=j,
            expires_at=expiries.get((KIND_JWT_ID, j), 0),
            spiffe_id=ids.get((KIND_JWT_ID, j), ""),
        )
        for j in sorted(snap.revoked_jtis)
    )
    # Ended tasks: no credential, but a verifier closes every stream and session of the task
    # on one, and a task client ends the task, without asking the server.
    items.extend(
        revocation_pb2.Revoked(
            kind=KIND_TASK,
            value=task_id,
            expires_at=expiry,
            spiffe_id=ids.get((KIND_TASK, task_id), ""),
        )
        for (kind, task_id), expiry in sorted(expiries.items())
        if kind == KIND_TASK
    )
    return revocation_pb2.RevocationList(items=items, crl=list(snap.crl))


async def _held_list(context: grpc.aio.ServicerContext, snap: Snapshot) -> None:
    """Abort unless `snap` holds the server's revocation list. Every message replaces a
    verifier's whole set, so the empty one of an agent not yet synced, or refused (its list
    dropped), would tell it that nothing is revoked; an error keeps what it has."""
    problem = not_serving(snap)
    if problem is not None:
        await context.abort(*problem)


class RevocationsApi(revocation_pb2_grpc.RevocationsServicer):  # type: ignore[misc]
    def __init__(
        self,
        cache: Cache,
        registry: CallerRegistry,
        streams: StreamBudget,
        expiries: Expiries | None = None,
        link: ServerLink | None = None,
    ) -> None:
        self._cache = cache
        # The agent's link to the server (None: counted in sync, as agents before it were).
        self._link = link
        self._registry = registry
        self._streams = streams
        # Default: the expiries the server sent with the list (kept in the cache).
        self._expiries = expiries

    async def Watch(
        self, request: revocation_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[revocation_pb2.RevocationList]:
        caller = await checked_caller(context, self._registry)
        await open_stream(context, self._streams, caller)
        # The caller's own watch, as its bundle streams have: it wakes when what every caller
        # shares changes (revocations among it) and when the caller's identities do.
        watch = self._cache.watchers.open(caller.selectors)
        try:
            current = revocation_pb2.RevocationList()
            sent: revocation_pb2.RevocationList | None = None
            told: bool | None = None  # the link state the last message said (in sync or not)
            built = -1  # the shared version the last list was made from
            while True:
                woke = watch.signal.version
                linked = self._link.changed.version if self._link is not None else 0
                shared = self._cache.shared_version
                snap = self._cache.snapshot()
                await _held_list(context, snap)
                if not watch.entry_ids:
                    # The list names whose credentials are revoked: like the bundles, it is
                    # for workloads this agent holds an identity for, not any local process.
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
                if shared != built:
                    built = shared
                    current = revocation_list(
                        snap, self._expiries() if self._expiries else snap.revocation_expiry
                    )
                in_sync = self._link is None or self._link.in_sync
                if current != sent or in_sync != told:
                    sent = revocation_pb2.RevocationList()
                    sent.CopyFrom(current)
                    told = in_sync
                    msg = revocation_pb2.RevocationList()
                    msg.CopyFrom(current)
                    msg.version = snap.version
                    if self._link is not None:
                        msg.out_of_sync_ms = self._link.out_of_sync_ms()
                    yield msg
                await self._changed(watch.signal.wait(woke), linked)
        finally:
            self._cache.watchers.close(watch)
            self._streams.give_back(caller.uid)

    async def _changed(self, cache_moved: Awaitable[int], linked: int) -> None:
        """Until the caller's watch moves or the link is lost or back."""
        if self._link is None:
            await cache_moved
            return
        waits = [
            asyncio.ensure_future(cache_moved),
            asyncio.ensure_future(self._link.changed.wait(linked)),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_all(waits)
