"""The checks every call on the Workload API socket passes first (SPIFFE.md §1): the security
header, then the caller's identity from the relay's registry. Shared by every service there
(Workload API, Tasks, Revocations), so none can forget one."""

from __future__ import annotations

import logging

import grpc

from agent_attestor.cache import Snapshot
from agent_attestor.peer import Caller, CallerRegistry
from agent_attestor.stream_budget import StreamBudget

log = logging.getLogger(__name__)

HEADER_KEY = "workload.spiffe.io"
HEADER_VALUE = "true"


def _has_header(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
    """Exactly one security header, saying "true": what SPIRE accepts, so that a client which
    passes here passes there too (a second value, even "true", is refused by both)."""
    seen = False
    for key, value in metadata or ():
        if key == HEADER_KEY:
            if seen or value != HEADER_VALUE:
                return False
            seen = True
    return seen


async def checked_caller(context: grpc.aio.ServicerContext, registry: CallerRegistry) -> Caller:
    """The caller of this call; aborts with INVALID_ARGUMENT without the security header and
    PERMISSION_DENIED for a connection the relay did not identify."""
    if not _has_header(context.invocation_metadata()):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request"
        )
    caller = registry.lookup(context.peer())
    if caller is None:
        log.warning("refused a connection that did not come through the relay")
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "caller could not be identified")
    assert caller is not None  # abort() raises
    return caller


async def open_stream(
    context: grpc.aio.ServicerContext, streams: StreamBudget, caller: Caller
) -> None:
    """Count one more open stream of the caller's uid; aborts with RESOURCE_EXHAUSTED at its
    maximum. The stream's handler gives it back (`streams.give_back`) when it ends."""
    refusal = streams.take(caller.uid)
    if refusal is not None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)


def not_serving(snap: Snapshot) -> tuple[grpc.StatusCode, str] | None:
    """Why no call may be answered from `snap` (None: it may be); a plain check, so that the
    per-call path pays for an abort only when there is one. Before the first Sync, or once
    refused, the cache holds nothing for anyone: "no identity" would be a wrong answer then."""
    if snap.refused:
        return grpc.StatusCode.PERMISSION_DENIED, snap.refused
    if not snap.synced or snap.bundle is None:
        return grpc.StatusCode.UNAVAILABLE, "agent is not ready yet"
    return None
