"""Agents come back by themselves after a restore: the newer agent SVID a restored datastore
lost is adopted.

An agent renews its own SVID at half of agent_svid_ttl. A datastore restored from a backup
names, for each agent that renewed since the copy, a certificate the agent no longer holds;
the one it holds, signed by our CA for its ID, was refused as superseded, and each such agent
needed a new join token. A server started on a restored datastore (`--restored-datastore`)
moves such a record to the newer certificate instead, with a compare-and-set on the serial it
read, after an `agent_certificate_adopted` audit event.

Adopting must never bring back a certificate the server truly superseded. The record does not
store when its certificate was issued, only its serial and expiry (and not_after tells no
order: an operator who shortened agent_svid_ttl has newer certificates expire before older
ones). What the start knows is its restored datastore: `written_until`, the time of the
newest write its change feed holds (every agent save appends a row, and pruning takes the
oldest rows first, so this is at or after the save of every record it holds), and its own
start, `restored_at`. A certificate lost by the restore was signed after the first and before
the second; a certificate any restored record superseded was signed before its superseding
record was saved, so at or before `written_until`. NotBefore is the signing time backdated 10 s
(server/ca/signer.py): NotBefore > written_until means signed after it (with up to 10 s of
clock skew between servers), and NotBefore < restored_at - 10 s signed before this start.
A column of the issue time in the record would bound it per agent, but no backup taken before
that column holds it, and the restore is the only time a certificate the record does not name
is not superseded.

Only while the record still names the serial the restore brought back (`serials`): once it
moved (a renewal, a re-attestation, an adoption since), it names a certificate issued after
the restore, and any certificate of the window is older. Never without a restore: on a
datastore that was not restored, a certificate the record does not name was superseded by
this very datastore (of two renewals racing, the one saved last wins), and adopting it gains
nothing and undoes that. Nor for an agent with no record (evicted, unknown: it attests again),
a banned one, or an expired certificate.

A restore's window is kept for this process only: every certificate signed before the
restore has expired one agent_svid_ttl after it, whatever the window says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from server.audit.event import EventKind
from server.audit.log import AuditLog
from server.ca.signer import BACKDATE_SECONDS
from server.datastore.base import DataStore
from server.datastore.errors import CommitUnknownError, StorageError
from server.datastore.records import AttestedAgent
from server.errors import UnavailableError
from server.peer import AgentPeer
from server.state import ServerState
from svid._clock import Clock
from svid._log_throttle import KeyedThrottles

_log = logging.getLogger("svid.server.restore")
# Seconds between lines saying why an agent's certificate is not adopted, per agent and reason.
NOT_ADOPTED_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class RestoredWindow:
    """What a start on a restored datastore knows of the agent certificates the restore lost:
    signed after `written_until` (the restored datastore's newest write) and before
    `restored_at` (this start), for an agent whose restored record named `serials[id]`."""

    written_until: int
    restored_at: int
    serials: Mapping[str, str]


def restored_window(datastore: DataStore, now: float) -> RestoredWindow | None:
    """The window of a restored datastore, read before this start writes anything to it; None
    when its change feed holds no row (every one pruned: nothing bounds its records' saves,
    and nothing is adopted)."""
    written_until = datastore.newest_feed_at()
    if written_until is None:
        _log.warning(
            "the restored datastore's change feed is empty: agents that renewed their SVID "
            "after the backup are not taken back, and need a new join token each"
        )
        return None
    serials = {agent.spiffe_id: agent.serial for agent in datastore.list_agents()}
    return RestoredWindow(written_until, int(now), serials)


def adoption_refusal(
    record: AttestedAgent | None,
    peer: AgentPeer,
    window: RestoredWindow | None,
    now: float,
) -> str | None:
    """Why the certificate `peer` presents is not adopted into the agent's stored `record`;
    None when it is (see the module's docstring)."""
    if window is None:
        return "this server did not start on a restored datastore"
    if record is None:
        return "the agent has no record (evicted or unknown)"
    if record.spiffe_id != peer.spiffe_id:
        return "the record is another agent's"
    if record.banned:
        return "the agent is banned"
    if peer.serial in (record.serial, record.previous_serial):
        return "the record names this certificate"
    if window.serials.get(peer.spiffe_id) != record.serial:
        return "the record was written since the restore"
    if peer.not_after <= now:
        return "the certificate has expired"
    if peer.not_before <= window.written_until:
        return "the certificate was issued before the restored datastore's last write"
    if peer.not_before >= window.restored_at - BACKDATE_SECONDS:
        return "the certificate was issued since the restore"
    return None


class CertificateAdoption:
    """Adopts, on a server started on a restored datastore, the newer certificate an agent
    presents that its restored record does not name."""

    def __init__(
        self, state: ServerState, audit: AuditLog, window: RestoredWindow, clock: Clock
    ) -> None:
        self._state = state
        self._audit = audit
        self._window = window
        self._clock = clock
        # Keys: agents holding a certificate our CA signed, and adoption_refusal's few reasons.
        self._said = KeyedThrottles(NOT_ADOPTED_LOG_INTERVAL, clock)

    async def adopt(self, peer: AgentPeer, stored: AttestedAgent | None) -> bool:
        """True once the stored record `stored` names the certificate `peer` presents; False
        when it is not adopted. The audit event is committed first (StorageError, nothing
        moved, when it cannot be; CommitUnknownError, with no second event, when the write's
        outcome is unknown). A record another write moved meanwhile is left as it is, a
        second event says the adoption did not take, and UnavailableError: the agent's retry
        is judged on the record as that write left it."""
        refusal = adoption_refusal(stored, peer, self._window, self._clock.now())
        if refusal is not None:
            self._say_not_adopted(peer, refusal)
            return False
        assert stored is not None  # adoption_refusal refuses a missing record
        adopted = stored.adopted(peer.serial, peer.not_after)
        await asyncio.to_thread(self._event, peer, stored, "adopted")
        try:
            won = await self._state.adopt_agent_certificate(adopted, stored)
        except CommitUnknownError:
            # It may have moved (PostgreSQL may have committed it): a `not_adopted` event would
            # tell the log's readers the record names the old certificate when it may not.
            raise
        except StorageError:
            await self._not_adopted(peer, stored)
            raise
        if won:
            _log.warning(
                "agent certificate the restored datastore did not name adopted",
                extra={"agent_id": peer.spiffe_id, "serial": peer.serial},
            )
            return True
        await self._not_adopted(peer, stored)
        raise UnavailableError(
            f"agent {peer.spiffe_id}'s record was written while its certificate was being "
            "adopted: retry"
        )

    def _say_not_adopted(self, peer: AgentPeer, refusal: str) -> None:
        """Why, for the operator asking why an agent did not come back: once a while per agent
        and reason, with how many refusals the line stands for. Not per certificate: an agent
        renewing again and again holds as many as the signing rate lets it, and AgentAuthority
        asks again of each once its refusal is forgotten (or its memory full)."""
        times = self._said.due((peer.spiffe_id, refusal))
        if times:
            _log.warning(
                "agent certificate the restored datastore did not name not adopted: %s",
                refusal,
                extra={"agent_id": peer.spiffe_id, "serial": peer.serial, "times": times},
            )

    async def _not_adopted(self, peer: AgentPeer, stored: AttestedAgent) -> None:
        """Follows the `adopted` event of a write that did not take, so the log says so (best
        effort: the record stays as it is either way)."""
        with contextlib.suppress(StorageError):
            await asyncio.to_thread(self._event, peer, stored, "not_adopted")

    def _event(self, peer: AgentPeer, stored: AttestedAgent, decision: str) -> None:
        self._audit.append(
            EventKind.AGENT_CERTIFICATE_ADOPTED,
            agent_id=peer.spiffe_id,
            node_id=peer.spiffe_id,
            action="adopt_certificate",
            decision=decision,
            reason="a datastore restored from a backup names an older certificate of the agent"
            if decision == "adopted"
            else "the agent's record was not written: left as it stands",
            credential_id=peer.serial,
            extra={
                "replaced_serial": stored.serial,
                "not_before": peer.not_before,
                "not_after": peer.not_after,
                "written_until": self._window.written_until,
                "restored_at": self._window.restored_at,
            },
        )
