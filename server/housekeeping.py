"""The periodic jobs of a server, and which of them run once per trust domain when several
servers share one datastore.

Each job app.py schedules, decided on its own:

| job                                        | runs on                 | why |
|--------------------------------------------|-------------------------|-----|
| task expiry and end                        | every server            | (1) |
| prune task credentials, violations, tasks  | every server            | (2) |
| prune join tokens, revocations, old agents | every server            | (2) |
| prune change-feed rows, OAuth jtis         | every server            | (2) |
| entry expiry sweep, change-feed follower   | every server            | (3) |
| view freshness watch (Sync refused stale)  | every server            | (3) |
| server SVID renewal                        | every server            | (3) |
| CA and JWT key rotation                    | `ca-rotation` holder    | (4) |
| audit checkpoints (start, interval, stop)  | `housekeeping` holder   | (5) |
| audit retention (prune)                    | `housekeeping` holder   | (5) |
| finish task ends left half done            | `housekeeping` holder   | (6) |
| finish agent removals left half done       | `housekeeping` holder   | (6) |
| scheduled fetch of a foreign bundle        | `federation-fetch:<td>` | (7) |

1. The end is a compare-and-set on the task row (TaskStore.finish): only the write that moves
   it out of `active` revokes and records the one task-end event. No lease: expiry does not
   wait for any one server to be alive.
2. Idempotent deletes by time: a second server deletes nothing (and each server drops pruned
   revocations from its own memory; pruned agents, through the change feed). Each bound waits
   MAX_CLOCK_SKEW past what another server or a verifier, by its own clock, may still need;
   join-token agents whose SVIDs expired and tasks over stay EXPIRED_RECORD_RETENTION (30
   days) longer; banned agents, x509pop nodes and those whose removal is stored, for good.
3. This server's own: its memory, its agents, its SVID.
4. One journal of shared keys (server/ca/manager.py).
5. One chain, one checkpointer: one key signs checkpoints in order, and retention signs a
   prune record with that key before it deletes a prefix of the chain. The holder signs the
   stored head (events mostly come through other servers), once the events since its last
   signed head are read back and chain from it (server/audit/checkpointer.py). Each record is
   stored in the datastore with a feed row: every server appends it to its own checkpoint
   file and pushes it to its agents. With a key-encryption key the signing key is the trust
   domain's (sealed in the datastore, CheckpointSigner.load_shared), so agents and operators
   check every server's records against one pinned key.
6. A task's end is claimed by the CAS (its row goes to `ending`) and settled once its
   revocations and event are written; one a server left half done (it died midway) is
   finished, a minute later, by one server: the others would record its end again. An agent's
   removal (eviction, ban) likewise: its row is stored with the agent's delete or ban and
   deleted once the agent's credentials are revoked on record; one still there a minute on is
   finished (server/tasks/removals.py), unless another finisher's claim on it runs (an
   operator's removal still under way, on any server).
7. One fetch of each foreign bundle endpoint per refresh hint, not one per server; the others
   adopt its result from the change feed (server/federation/service.py). A fetch someone asked
   for (admin refresh, relationship written, bundle set) runs on the server asked.

An operator's explicit checkpoint (admin API) or prune (`Pruner.prune(cut)`) runs on whichever
server is asked. The lease is renewed on its own tick (every ttl / 3), not on the jobs' (which
may be hours apart), and taken over within ttl / 3 of lapsing when its holder died; the
server that takes it over checkpoints at once, as a start does. Its holder is unique per start
(servers may share a data directory, and with it the checkpoint key).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from server.audit.checkpoint import Checkpoint, CheckpointFile, CheckpointSigner
from server.audit.checkpointer import Checkpointer, SharedAuditStore
from server.audit.log import AuditLog
from server.audit.retention import Cut, Pruner, PruneReport, RetentionPolicy
from server.datastore.base import AuditRetentionStore
from svid._clock import Clock, ElapsedClock
from svid._waits import set_within

_log = logging.getLogger("svid.server.housekeeping")
HOUSEKEEPING_LEASE = "housekeeping"
DEFAULT_LEASE_TTL = 30


class LeaseStore(Protocol):
    def acquire_lease(self, name: str, holder: str, now: int, ttl: int) -> bool: ...

    def release_lease(self, name: str, holder: str) -> None: ...


class Lease:
    """One named datastore lease as this process holds it. `renew()` on a tick takes the lease
    when free or lapsed and keeps it while held; `held` trusts a renewal for two thirds of the
    lease's life (renewals come every third), so a server whose renewals fail stops acting
    before another can take over. Blocking calls: run them in a thread.

    The row's expiry is wall time (other servers read it); this process's own trust and tick
    are intervals, on the monotonic clock: on the wall clock, a step back just after a renewal
    kept `held` true, and the next renewal waiting, for as long as the step, while the row
    lapsed for the other servers on time. One that also counts a sleep of the host
    (ElapsedClock): CLOCK_MONOTONIC stands still in a suspend, and a holder woke trusting a
    renewal whose row had lapsed while it slept."""

    def __init__(
        self,
        store: LeaseStore,
        name: str,
        holder: str,
        clock: Clock,
        ttl: int = DEFAULT_LEASE_TTL,
    ) -> None:
        if ttl < 3:
            raise ValueError(f"lease ttl must be at least 3 seconds, got {ttl}")
        self._store = store
        self.name = name
        self.holder = holder
        self._clock = ElapsedClock(clock)
        self._ttl = ttl
        self._until = 0.0
        self._last_try = float("-inf")

    @property
    def held(self) -> bool:
        return self._clock.monotonic() < self._until

    @property
    def held_until(self) -> float:
        """Until when (monotonic clock time) this server may act on the lease, as its last
        renewal that answered says: 0 when that renewal did not get it."""
        return self._until

    def next_renewal(self) -> float:
        """When (monotonic clock time, as this lease counts it) `renew` is due next."""
        return self._last_try + self._ttl / 3

    def due_in(self) -> float:
        """Seconds until `renew` is due (0 or less: now)."""
        return self.next_renewal() - self._clock.monotonic()

    def renew(self) -> bool:
        """Take or keep the lease now: True when this call took it (not held here before).
        A datastore error propagates; `held` then runs out on its own."""
        asked = self._clock.monotonic()
        self._last_try = asked
        was = self.held
        got = self._store.acquire_lease(self.name, self.holder, int(self._clock.now()), self._ttl)
        # From the ask: the row's life may have begun at any moment of the call.
        self._until = asked + self._ttl * 2 / 3 if got else 0.0
        if got != was:
            _log.info(
                f"{self.name} lease taken" if got else f"{self.name} lease held by another server",
                extra={"holder": self.holder},
            )
        return got and not was

    def release(self) -> None:
        """Hand the lease over at once (a clean shutdown)."""
        if self._until:
            self._until = 0.0
            self._store.release_lease(self.name, self.holder)
            _log.info(f"{self.name} lease released", extra={"holder": self.holder})


class LeasedCheckpointer(Checkpointer):
    """Interval checkpoints only while this server holds the housekeeping lease. `checkpoint`
    itself is not gated: app.py asks the lease at start and stop, and an operator's forced
    checkpoint runs wherever it is asked."""

    def __init__(
        self,
        audit: AuditLog,
        signer: CheckpointSigner,
        file: CheckpointFile,
        clock: Clock,
        interval: float,
        *,
        lease: Lease,
        on_checkpoint: Callable[[Checkpoint], None] = lambda _checkpoint: None,
        records: SharedAuditStore | None = None,
        on_refused: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        super().__init__(
            audit,
            signer,
            file,
            clock,
            interval,
            on_checkpoint=on_checkpoint,
            records=records,
            on_refused=on_refused,
        )
        self.lease = lease
        self._tick = interval

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every interval until `stop`; checkpoint when holding the lease."""
        while not stop.is_set():
            await set_within(stop, self._tick)
            if stop.is_set():
                return
            if not self.lease.held:
                continue
            try:
                await asyncio.to_thread(self.checkpoint)
            except Exception:
                _log.exception("audit checkpoint failed; retrying next interval")


class LeasedPruner(Pruner):
    """Retention on its schedule only while this server holds the housekeeping lease; an
    explicit `prune(cut)` (an operator's) runs anyway."""

    def __init__(
        self,
        store: AuditRetentionStore,
        audit: AuditLog,
        checkpointer: Checkpointer,
        clock: Clock,
        policy: RetentionPolicy,
        *,
        lease: Lease,
        interval: float,
    ) -> None:
        super().__init__(store, audit, checkpointer, clock, policy, interval=interval)
        self.lease = lease
        self._bases = store

    def prune(self, cut: Cut | None = None) -> PruneReport:
        if cut is None and not self.lease.held:
            return PruneReport(0, self._bases.audit_base())
        return super().prune(cut)
