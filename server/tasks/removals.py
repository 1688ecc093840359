"""An agent's removal (eviction or ban) carried through to its end, on record, even when the
server doing it dies midway.

A removal is several commits: the agent's row goes (or is banned) with a Removal row stored in
the same transaction (ServerState.evict_agent / ban_agent), then the agent's tasks end, its
credentials are revoked, each revocation is logged, and only then is the Removal row deleted.
A server that died in between left the row: the housekeeping lease holder finishes it once it
is `REMOVAL_GRACE` old (younger, it may be a removal another server is still doing), as it
finishes a task end left half done (TaskService.settle_ends). Finishing is revoke_agent run
again: it does what is left. While the row stands the agent is not admitted again (the
datastore refuses it), so what a finisher lists is the removed agent's only, never what a
later admission was issued.

One finisher at a time, across every server sharing the datastore, or a revocation could be
logged twice (each finisher logs what it finds not on the log yet, and two can find the same
credential so): a finisher first claims the row (DataStore.claim_removal), a lease it renews
every third of its life while it works, and one that cannot claim logs nothing. Housekeeping
leaves such a removal to its finisher; an operator's eviction or ban waits for it, as it would
for its own, and takes it over should that finisher's server die (its claim lapses). A finish
still running on this server is joined rather than begun again.

A lease alone does not keep a finisher that lost it (stalled past its claim's life, taken over)
from logging: its write may be in flight already. So each of its log writes carries the claim
(AuditLog.append_many's `claim`) and commits only while the claim is still its own, in the
write's transaction; a takeover waits for a write under way and then reads what it logged.
For that check to mean "no one else held it since", a claim is never taken back: each claim
this server makes has a name of its own (a later finish here is not the one whose write is in
flight), and a renewal only keeps a claim no one else took (DataStore.renew_removal_claim),
where taking a lapsed one again would let the stalled write commit beside what another holder
logged meanwhile and then let go of (it failed, or its server died).

A removal that left no record of itself (a server from before removals were stored, cut short)
is stored when the operator retries it (DataStore.resume_removal), and finished as any other:
under a claim, by housekeeping should this server die.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from server.audit import LedgerError
from server.ca.manager import default_holder
from server.datastore.base import RemovalClaim
from server.datastore.errors import RemovalClaimLostError
from server.datastore.records import Removal
from server.state import ServerState
from server.tasks.service import TaskService
from svid._clock import Clock

_log = logging.getLogger("svid.server.tasks")
# A removal begun this long ago and still stored was cut short (its server died midway).
REMOVAL_GRACE = 60
# A finisher's claim lasts this long from its last renewal (every third of it): shorter than
# the grace, so a removal whose server died is free to finish when housekeeping first sees it.
REMOVAL_CLAIM_TTL = 30
# How often an operator's call waiting on another server's finisher looks again.
REMOVAL_WAIT = 1.0


class AgentRemovals:
    def __init__(
        self,
        state: ServerState,
        service: TaskService,
        clock: Clock,
        *,
        holder: str | None = None,
        claim_ttl: int = REMOVAL_CLAIM_TTL,
        renew_every: float | None = None,
        wait_every: float = REMOVAL_WAIT,
    ) -> None:
        if claim_ttl < 3:
            raise ValueError(f"removal claim ttl must be at least 3 seconds, got {claim_ttl}")
        self._state = state
        self._service = service
        self._clock = clock
        # Unique per start: a restarted server does not mistake its dead self's claims for
        # its own (they lapse).
        self._holder = holder or default_holder()
        self._claims = itertools.count(1)  # names each claim: see the module
        self._claim_ttl = claim_ttl
        self._renew_every = claim_ttl / 3 if renew_every is None else renew_every
        self._wait_every = wait_every
        # Finishes running here, by agent: an operator's removal still running at the grace
        # is joined, not run twice. Each says whether it ran (False: claimed elsewhere).
        self._running: dict[str, asyncio.Future[bool]] = {}

    async def carry_out(self, removal: Removal) -> None:
        """The rest of a removal just stored: revoke what the agent holds, then forget it.
        Waits while another server finishes it (a retry racing housekeeping)."""
        await self._until_finished(removal)

    async def retried(self, agent_id: str, reason: str) -> bool:
        """An operator removing again an agent that is gone already: finish the removal under
        way, if one is stored (or wait for the server finishing it); else whatever an older
        removal left (TaskService.removal_left), stored as a removal and finished as one.
        False, doing nothing, when nothing is left to do, or when the agent was admitted again
        meanwhile (an eviction of it is a new removal)."""
        pending = await self._state.removal_of(agent_id)
        if pending is None:
            if not await self._service.removal_left(agent_id):
                return False
            resumed = Removal(agent_id, reason, int(self._clock.now()))
            if await self._state.resume_removal(resumed):
                pending = resumed
            else:  # another server's retry stored one first, or the agent is back
                pending = await self._state.removal_of(agent_id)
                if pending is None:
                    return False
        await self._until_finished(pending)
        return True

    async def finish_cut_short(self, grace: int = REMOVAL_GRACE) -> int:
        """Finish the removals begun more than `grace` seconds ago and still stored, but for
        those another server is finishing (claimed). One server at a time runs this (the
        housekeeping lease holder); returns how many it finished. One that fails stays
        stored, for the next run, and holds up no other."""
        before = int(self._clock.now()) - grace
        finished = 0
        for removal in await self._state.removals_before(before):
            _log.warning(
                "finishing an agent removal cut short",
                extra={"agent_id": removal.agent_id, "reason": removal.reason},
            )
            try:
                ran = await self._finish(removal)
            except Exception:
                _log.exception(
                    "finishing an agent removal failed; retrying next run",
                    extra={"agent_id": removal.agent_id},
                )
                continue
            if ran:
                finished += 1
            else:
                _log.info(
                    "agent removal left to the server finishing it",
                    extra={"agent_id": removal.agent_id},
                )
        return finished

    async def _until_finished(self, removal: Removal) -> None:
        """Finish the removal here, or wait while another server's finisher does, taking it
        over if that finisher's claim lapses (its server died)."""
        waiting = False
        while not await self._finish(removal):
            if not waiting:
                waiting = True
                _log.info(
                    "agent removal being finished by another server; waiting for it",
                    extra={"agent_id": removal.agent_id},
                )
            await asyncio.sleep(self._wait_every)
            current = await self._state.removal_of(removal.agent_id)
            if current is None:
                return  # finished there
            removal = current

    async def _finish(self, removal: Removal) -> bool:
        key = removal.agent_id
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(self._claimed(removal))
            running.add_done_callback(lambda _: self._running.pop(key, None))
        # Shielded: a caller that gives up (a hung-up operator) leaves the finish running.
        return await asyncio.shield(running)

    async def _claimed(self, removal: Removal) -> bool:
        """Carry the removal through under this server's claim: False, doing nothing, while
        another finisher holds it, or once it took over a claim this one let lapse."""
        agent_id = removal.agent_id
        holder = f"{self._holder}#{next(self._claims)}"
        if not await self._state.claim_removal(agent_id, holder, self._claim_ttl):
            return False
        carry = asyncio.ensure_future(self._carry(removal, holder))
        kept = asyncio.ensure_future(self._keep_claim(agent_id, holder))
        try:
            await asyncio.wait({carry, kept}, return_when=asyncio.FIRST_COMPLETED)
            if not carry.done() and kept.result():
                # Taken over (renewals failed past the claim's life): the new holder logs
                # what is left, so this one stops before logging any of it again (a write of
                # it in flight is refused by the store: see the module).
                _claim_lost(agent_id)
                return False
            try:
                await carry
            except LedgerError as e:
                if not isinstance(e.__cause__, RemovalClaimLostError):
                    raise
                # Taken over before a renewal found out: the store refused this write.
                _claim_lost(agent_id)
                return False
            return True
        finally:
            carry.cancel()
            kept.cancel()
            # Free at once for a retry, should this finish have failed (or have ended a
            # removal a newer one replaced); a claim no longer ours is left alone.
            try:
                await self._state.release_removal_claim(agent_id, holder)
            except Exception:
                _log.exception(
                    "releasing an agent removal claim failed; it lapses on its own",
                    extra={"agent_id": agent_id},
                )

    async def _keep_claim(self, agent_id: str, holder: str) -> bool:
        """Renew the claim every `renew_every` seconds until cancelled: True once another
        holder has had it (even if it let it go since); False once no removal of the agent is
        stored (nothing to renew)."""
        while True:
            await asyncio.sleep(self._renew_every)
            try:
                if await self._state.renew_removal_claim(agent_id, holder, self._claim_ttl):
                    continue
                return await self._state.removal_of(agent_id) is not None
            except Exception:
                # A storage hiccup: the claim holds until it lapses; try again next tick.
                _log.exception(
                    "renewing an agent removal claim failed", extra={"agent_id": agent_id}
                )

    async def _carry(self, removal: Removal, holder: str) -> None:
        claim = RemovalClaim(removal.agent_id, holder)
        await self._service.revoke_agent(
            removal.agent_id, removal.reason, banned=removal.banned, claim=claim
        )
        await self._state.end_removal(removal)


def _claim_lost(agent_id: str) -> None:
    _log.error(
        "agent removal claim lost to another server; leaving the rest to it",
        extra={"agent_id": agent_id},
    )
