"""Whether an agent may call: this server's memory, and the datastore when memory says no.

Servers sharing a datastore learn of each other's agents through the change feed: an agent
that attested or renewed through another server may call here before the feed brought its
record in. Memory then refuses it as it would an evicted agent, and an agent told
PERMISSION_DENIED drops its SVID (agent_attestor/sync.py). So a refusal from memory is checked
against the datastore's record: when that record accepts the certificate, the answer is
UNAVAILABLE (not known here yet: the agent retries, here or at another server, SVID kept);
only when it refuses too is the refusal said.

Memory's acceptance is only as good as the view: an agent evicted or banned through another
server is still accepted here until the feed brings the change in, and a feed held up (its
reads failing or slow) would leave that open for as long as it lags. So when the view was last
caught up more than VIEW_TRUSTED_FOR ago, an acceptance from memory is checked against the
datastore's record too, and a refusal there is said. While the feed keeps up (a server
sharing a healthy datastore reads it at every write and every poll) the hot path reads
nothing; an eviction is honoured here within VIEW_TRUSTED_FOR + ACCEPTANCE_KEPT of its commit.
Renewals and mintings are refused anyway by their ledger write after an eviction (the
datastore's); this covers what writes nothing, a Sync stream resuming from a revision.

Only a certificate this server's CA signed gets here (server/peer.py), and each one costs at
most one datastore read per while: a refusal for one certificate is final (an agent's record
only moves on to newer serials, written before the agent holds them), so it is remembered for
long; an acceptance only for as long as the feed needs to bring the record in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.datastore.base import DataStore
from server.datastore.errors import NotFoundError, StorageError
from server.datastore.records import AttestedAgent
from server.errors import PermissionDeniedError, UnavailableError
from server.peer import AgentPeer
from server.restore_adoption import CertificateAdoption
from server.state import ServerState, agent_refusal
from server.view_freshness import ViewFreshness
from svid._clock import Clock

_log = logging.getLogger("svid.server.agent_authority")

# The stored record of an agent, None when there is none.
ReadAgent = Callable[[str], Awaitable[AttestedAgent | None]]

# How long (seconds) the datastore's word on one certificate is taken again without asking.
REFUSAL_KEPT = 60.0
ACCEPTANCE_KEPT = 1.0
MAX_REMEMBERED = 4096
# A view caught up longer ago than this (seconds) is not taken alone to accept an agent: above
# the default feed poll (1 s) and a catch-up's read, so a healthy follower never passes it.
VIEW_TRUSTED_FOR = 2.0


@dataclass(frozen=True)
class _Verdict:
    refusal: str | None  # the datastore's record's refusal of the certificate, None: accepted
    until: float  # monotonic


class AgentAuthority:
    """Answers who may call as an agent, on every node API call that names one."""

    def __init__(
        self,
        state: ServerState,
        read_agent: ReadAgent,
        clock: Clock,
        *,
        refusal_kept: float = REFUSAL_KEPT,
        acceptance_kept: float = ACCEPTANCE_KEPT,
        max_remembered: int = MAX_REMEMBERED,
        view: ViewFreshness | None = None,
        view_trusted_for: float = VIEW_TRUSTED_FOR,
        adoption: CertificateAdoption | None = None,
    ) -> None:
        """`adoption`: a server started on a restored datastore adopts, instead of refusing,
        an agent's newer certificate the restore lost (server/restore_adoption.py)."""
        self._adoption = adoption
        self._state = state
        # The view the feed keeps (servers sharing a datastore); None: memory is all there is.
        self._view = view
        self._view_trusted_for = view_trusted_for
        self._read = read_agent
        self._clock = clock
        self._refusal_kept = refusal_kept
        self._acceptance_kept = acceptance_kept
        self._max = max_remembered
        self._verdicts: dict[tuple[str, str], _Verdict] = {}
        # One read per certificate at a time, however many of its calls wait on it.
        self._reading: dict[tuple[str, str], asyncio.Future[str | None]] = {}
        # One drop of a previous certificate per agent at a time (_drop_previous).
        self._dropping: dict[str, asyncio.Future[bool]] = {}

    async def authorize(self, peer: AgentPeer) -> AttestedAgent:
        """The agent's record in memory; PermissionDenied when the datastore refuses it too,
        Unavailable when only memory does (its record not brought in yet). Its first call
        with a renewed certificate drops the one it renewed with (_drop_previous)."""
        agent = await self._authorize(peer)
        if peer.serial == agent.serial and agent.previous_serial:
            self._drop_previous(agent)
        return agent

    def _drop_previous(self, agent: AttestedAgent) -> None:
        """The agent holds its newest certificate: the one it renewed with is dropped from its
        record (ServerState.drop_previous_certificate), so a renewal with that one answered
        late supersedes nothing the agent uses. One write per renewal, whatever calls start
        it; one that fails leaves the record as it was. Not awaited by the call: a datastore
        write behind every agent write of the server, it held a renewed agent's mints and its
        Sync stream's opening for as long as the datastore was slow or stalled, where memory
        answered them before."""
        if agent.spiffe_id in self._dropping:
            return
        dropping = asyncio.ensure_future(self._state.drop_previous_certificate(agent))
        self._dropping[agent.spiffe_id] = dropping
        dropping.add_done_callback(lambda done: self._dropped(agent.spiffe_id, done))

    def _dropped(self, spiffe_id: str, done: asyncio.Future[bool]) -> None:
        self._dropping.pop(spiffe_id, None)
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:  # the next call with the certificate tries again
            _log.warning(
                "cannot drop an agent's previous certificate from its record",
                extra={"agent_id": spiffe_id, "error": f"{type(exc).__name__}: {str(exc)[:200]}"},
            )

    async def drain(self) -> None:
        """Wait for what runs on past its callers: the drops under way, and the datastore
        reads (an adoption's writes with them) a cancelled call left. A stopping server
        calls it once no call comes any more, before it closes the datastore: closed beneath
        them, their writes ran on a closed datastore."""
        while self._dropping or self._reading:
            if self._dropping:
                await asyncio.wait(set(self._dropping.values()))
            if self._reading:
                await asyncio.wait(set(self._reading.values()))

    async def _authorize(self, peer: AgentPeer) -> AttestedAgent:
        try:
            agent = self._state.authorize_agent(peer.spiffe_id, peer.serial)
        except PermissionDeniedError:
            if not self._may_be_behind(peer):
                raise
        else:
            if self._view is None or self._view.age() <= self._view_trusted_for:
                return agent
            return await self._confirmed(peer)
        refusal = await self._stored_refusal(peer)
        if refusal is not None:
            raise PermissionDeniedError(refusal)
        # Adopted here (server/restore_adoption.py), or brought in by the feed meanwhile.
        with contextlib.suppress(PermissionDeniedError):
            return self._state.authorize_agent(peer.spiffe_id, peer.serial)
        raise UnavailableError(
            f"agent {peer.spiffe_id} attested or renewed through another server and this one "
            "has not read it from the datastore yet: retry"
        )

    async def _confirmed(self, peer: AgentPeer) -> AttestedAgent:
        """Memory accepts the agent but the view is old: the datastore's record must accept it
        too (an eviction or a ban through another server the feed has not brought)."""
        refusal = await self._stored_refusal(peer)
        if refusal is not None:
            raise PermissionDeniedError(refusal)
        # Memory again: the feed may have brought a change while the datastore was read.
        return self._state.authorize_agent(peer.spiffe_id, peer.serial)

    def _may_be_behind(self, peer: AgentPeer) -> bool:
        """A refusal the feed can still change: no record here, or not this certificate's. A
        ban, or this very certificate expired, stands whatever the datastore holds."""
        known = self._state.agents.get(peer.spiffe_id)
        return known is None or (
            not known.banned and peer.serial not in (known.serial, known.previous_serial)
        )

    async def _stored_refusal(self, peer: AgentPeer) -> str | None:
        key = (peer.spiffe_id, peer.serial)
        now = self._clock.monotonic()
        verdict = self._verdicts.get(key)
        if verdict is not None and verdict.until > now:
            return verdict.refusal
        reading = self._reading.get(key)
        if reading is None:
            reading = asyncio.ensure_future(self._ask(peer))
            self._reading[key] = reading
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        return await asyncio.shield(reading)

    async def _ask(self, peer: AgentPeer) -> str | None:
        try:
            stored = await self._read(peer.spiffe_id)
        except StorageError as exc:
            # Not knowing is no refusal: said as one, the agent would drop its SVID.
            raise UnavailableError(
                f"this server cannot tell whether agent {peer.spiffe_id} may call: its view "
                "may be behind and the datastore cannot be read: retry"
            ) from exc
        refusal = agent_refusal(stored, peer.spiffe_id, peer.serial, self._clock.now())
        if refusal is not None and self._adoption is not None:
            try:
                if await self._adoption.adopt(peer, stored):
                    refusal = None
            except StorageError as exc:
                # Its audit event or its record could not be written: not knowing whether it
                # may be adopted is no refusal (said as one, the agent would drop its SVID).
                raise UnavailableError(
                    f"agent {peer.spiffe_id}'s newer certificate cannot be adopted now (the "
                    "datastore cannot be written): retry"
                ) from exc
        self._remember((peer.spiffe_id, peer.serial), refusal)
        return refusal

    def _remember(self, key: tuple[str, str], refusal: str | None) -> None:
        now = self._clock.monotonic()
        if len(self._verdicts) >= self._max:
            self._verdicts = {k: v for k, v in self._verdicts.items() if v.until > now}
            if len(self._verdicts) >= self._max:
                self._verdicts.clear()
        kept = self._acceptance_kept if refusal is None else self._refusal_kept
        self._verdicts[key] = _Verdict(refusal, now + kept)


def datastore_reader(datastore: DataStore) -> ReadAgent:
    """A ReadAgent over the datastore, run in a worker thread as every read is."""

    async def read(spiffe_id: str) -> AttestedAgent | None:
        try:
            return await asyncio.to_thread(datastore.get_agent, spiffe_id)
        except NotFoundError:
            return None

    return read
