"""Agent SVIDs: admit an attested node agent (or refuse it, on record) and renew its SVID.

Admission fails closed in this order: sign the SVID; ask whether the save would be refused
(the agent's removal stored, the agent evicted or banned meanwhile), refusing it on record if
so; commit the attestation's audit event; then save the agent's record, spending its join
token in that same transaction. If the event cannot be committed, nothing else is written: the
agent is refused and its token still works. If the save fails (the datastore refuses it, or the
agent was removed meanwhile), a deny of the same serial follows the allow on the log.
If the token is gone by then (a concurrent attestation with it won), the agent is refused on
record and the SVID signed for it never leaves, as for any credential on record and never sent
(server/issuance/ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from cryptography import x509

from server.attestation.base import AttestationResult
from server.attestation.join_token import REFUSED as TOKEN_REFUSED
from server.audit.outage import LedgerOutage, telling
from server.ca.manager import CaManager
from server.datastore.errors import AgentReplacedError, ConflictError, RemovalUnderWayError
from server.datastore.records import AttestedAgent, Removal
from server.errors import NotFoundError, PermissionDeniedError
from server.issuance.ledger import Ledger, LedgerUnavailableError
from server.issuance.records import attestation_event
from server.metrics import Metrics
from server.state import ServerState
from svid._clock import Clock
from svid._spiffe_id import SpiffeId

_log = logging.getLogger("svid.server.issuance")
Chain = tuple[x509.Certificate, ...]
# The reason on the deny of an admission whose agent record the datastore could not save.
SAVE_FAILED = "the agent's record could not be saved (storage unavailable)"


def _serial_hex(chain: Chain) -> str:
    return format(chain[0].serial_number, "x")


def _expires(chain: Chain) -> int:
    return int(chain[0].not_valid_after_utc.timestamp())


class AgentAdmission:
    def __init__(
        self,
        *,
        state: ServerState,
        ca: CaManager,
        ledger: Ledger,
        clock: Clock,
        metrics: Metrics,
        executor: Executor,
        agent_svid_ttl: int = 3600,
        on_agent_removed: Callable[[Removal], Awaitable[None]] | None = None,
        outage: LedgerOutage | None = None,
    ) -> None:
        """`on_agent_removed`: carries out an eviction stored here (revoke what the agent
        holds, then forget the removal), as for the admin API's; None: nothing to revoke.
        `outage`: told of an agent's record the storage cannot save (server/audit/outage.py)."""
        self._state = state
        self._ca = ca
        self._ledger = ledger
        self._clock = clock
        self._metrics = metrics
        self._executor = executor
        self._ttl = agent_svid_ttl
        self._on_agent_removed = on_agent_removed
        self._outage = outage

    def check(self, result: AttestationResult) -> AttestedAgent | None:
        """The agent's current record if it may (re-)attest; PermissionDeniedError if not."""
        for former in map(str, result.former_agent_ids):
            record = self._state.agents.get(former)
            if record is not None and record.banned:
                raise PermissionDeniedError(
                    f"agent {former}, as this node was named before {result.agent_id}, is banned"
                )
        existing = self._state.agents.get(str(result.agent_id))
        if existing is None:
            return None
        if existing.banned:
            raise PermissionDeniedError(f"agent {result.agent_id} is banned")
        if not result.can_reattest:
            raise PermissionDeniedError(
                f"agent {result.agent_id} is already attested; evict it before attesting again"
            )
        return existing

    async def not_being_removed(self, result: AttestationResult) -> None:
        """RemovalUnderWayError while a removal of the agent is stored (one cut short, not yet
        finished): asked before anything is signed or recorded, so such an attempt leaves no
        allowed attestation on the log. The save refuses it as well, should a removal be
        stored meanwhile."""
        agent_id = str(result.agent_id)
        if await self._state.removal_of(agent_id) is not None:
            raise RemovalUnderWayError(agent_id)

    async def admit(
        self,
        result: AttestationResult,
        previous: AttestedAgent | None,
        csr: x509.CertificateSigningRequest,
    ) -> Chain:
        """Sign the agent's SVID, record the attestation, save the agent (spending its join
        token); then the chain. LedgerUnavailableError or PermissionDeniedError, with nothing
        spent or saved, when it cannot."""
        chain = await self._sign(csr, result.agent_id)
        agent = AttestedAgent(
            spiffe_id=str(result.agent_id),
            attestation_type=result.attestation_type,
            serial=_serial_hex(chain),
            expires_at=_expires(chain),
            banned=False,
            # Always later than the admission it replaces, even within its second: a save
            # compares attested_at to tell another admission from a renewal (q.REPLACE_AGENT).
            attested_at=max(int(self._clock.now()), previous.attested_at + 1 if previous else 0),
            selectors=result.selectors,
            # Attesting again, it may still hold connections made with its certificate.
            previous_serial=previous.serial if previous else "",
            previous_expires_at=previous.expires_at if previous else 0,
        )
        kind = result.attestation_type
        # Asked again after the signing (which may take a while), before the allowed
        # attestation is logged: a removal stored, or the agent evicted or banned, since the
        # attestation was checked is refused here, not by the save after it (the log then
        # showed an admission that did not take).
        try:
            await self._state.refuse_save(agent.spiffe_id, previous)
        except (RemovalUnderWayError, PermissionDeniedError, AgentReplacedError) as exc:
            await self.refused(kind, str(exc), agent_id=agent.spiffe_id)
            raise
        event = attestation_event(agent.spiffe_id, kind, agent.serial, ok=True)
        await self._ledger.commit((), (event,))
        try:
            saved = await self._state.save_agent(agent, previous, result.token)
        except (RemovalUnderWayError, PermissionDeniedError, AgentReplacedError) as exc:
            # Removed in the moment between the check and the save: a deny of the same
            # serial follows the allow, so the log says the admission did not take.
            await self.refused(kind, str(exc), agent_id=agent.spiffe_id, serial=agent.serial)
            raise
        except Exception:
            # The datastore could not save it (a disk I/O error, a disk full, a lost
            # connection): nothing was spent, the SVID never leaves, and a deny follows the
            # allow as above (best effort: the storage may refuse it too). Not the driver's
            # message: it goes on the log for every reader of it.
            await self.refused(kind, SAVE_FAILED, agent_id=agent.spiffe_id, serial=agent.serial)
            raise
        if not saved:
            await self.refused(kind, TOKEN_REFUSED)
            raise PermissionDeniedError(TOKEN_REFUSED)
        # Before the chain leaves: should an eviction fail, the node attests again and the
        # eviction is tried again, and meanwhile no agent holds the new ID's SVID.
        try:
            await self._evict_former(result)
        except PermissionDeniedError as exc:
            # A former ID's ban found only now: the allow is on the log, so a deny follows it.
            await self.refused(kind, str(exc), agent_id=agent.spiffe_id, serial=agent.serial)
            raise
        self._metrics.attestations.labels(type=result.attestation_type, result="ok").inc()
        self._issued()
        _log.info(
            "agent attested",
            extra={"agent_id": agent.spiffe_id, "type": result.attestation_type},
        )
        return chain

    async def _evict_former(self, result: AttestationResult) -> None:
        """Evict the live agents the node was admitted as under its former IDs (x509pop's
        SHA-1 names), so one node is one agent: the former one would otherwise keep renewing
        beside it, and a ban of either ID leave the other serving. Banned ones stay (check
        refused the admission for them)."""
        for former in map(str, result.former_agent_ids):
            record = self._state.agents.get(former)
            if former == str(result.agent_id) or record is None or record.banned:
                continue
            try:
                removal = await self._state.evict_agent(former, unless_banned=True)
            except NotFoundError:
                continue  # evicted meanwhile, by another server or the operator
            except ConflictError:
                # Banned through another server whose change this one has not heard of yet:
                # the ban stays and, as check() would have, refuses the node.
                raise PermissionDeniedError(
                    f"agent {former}, as this node was named before {result.agent_id}, is banned"
                ) from None
            _log.warning(
                "agent evicted: its node attested under its new ID",
                extra={"agent_id": former, "new_agent_id": str(result.agent_id)},
            )
            if self._on_agent_removed is not None:
                await self._on_agent_removed(removal)
            else:
                await self._state.end_removal(removal)

    async def refused(
        self,
        attestation_type: str,
        reason: str,
        *,
        on_record: bool = True,
        agent_id: str = "",
        serial: str = "",
    ) -> None:
        """Record a refused attestation. Best effort: the caller is refused either way. Only
        counted with `on_record` False (a host past its attestation budget: a write per guess
        is what the budget bounds). `agent_id` only once the attestor proved it (a check after
        the attestor's, an admission refused), and `serial` only for an SVID whose allowed
        attestation is on the log."""
        self._metrics.attestations.labels(type=attestation_type, result="refused").inc()
        if not on_record:
            return
        event = attestation_event(agent_id, attestation_type, serial, ok=False, reason=reason[:500])
        # Counted and logged where the ledger is metered (MeteredLedger, wired in app.py).
        with contextlib.suppress(LedgerUnavailableError):
            await self._ledger.commit((), (event,))

    async def renew(
        self, agent: AttestedAgent, held: str, csr: x509.CertificateSigningRequest
    ) -> Chain:
        """A fresh SVID for an authorised agent presenting its certificate of serial `held`,
        which stays usable until it expires (AttestedAgent.renewed). PermissionDeniedError or
        AgentReplacedError when `agent` is no longer the stored record once signed (evicted,
        banned, attested again): the chain is dropped, never saved nor returned, and the serial
        it carries is unknown to the node API."""
        chain = await self._sign(csr, SpiffeId.parse(agent.spiffe_id))
        renewed = agent.renewed(_serial_hex(chain), _expires(chain), held)
        with telling(self._outage):  # a renewal writes no event: only this sees the outage
            await self._state.save_agent(renewed, agent)
        self._issued()
        _log.info("agent SVID renewed", extra={"agent_id": agent.spiffe_id})
        return chain

    async def _sign(self, csr: x509.CertificateSigningRequest, agent_id: SpiffeId) -> Chain:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._sign_sync, csr, agent_id
        )

    def _sign_sync(self, csr: x509.CertificateSigningRequest, agent_id: SpiffeId) -> Chain:
        started = time.perf_counter()
        chain = tuple(self._ca.x509_signer().sign_svid(csr, agent_id, self._ttl))
        self._metrics.signing_seconds.labels(kind="agent").observe(time.perf_counter() - started)
        return chain

    def _issued(self) -> None:
        # Counted once saved, not once signed: a chain refused after its signing (the agent
        # banned, evicted or replaced meanwhile, the ledger or the datastore refusing) never
        # leaves the server, as the issuer counts only what its ledger committed.
        self._metrics.svids_issued.labels(kind="agent").inc()
