"""AgentRemovals with the task service and state stood in for: what runs, and how often."""

from __future__ import annotations

import asyncio
from typing import Any

from server.datastore.base import RemovalClaim
from server.datastore.records import REMOVAL_EVICTED, Removal
from server.tasks.removals import AgentRemovals
from svid._clock import FakeClock


class _Service:
    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.release = asyncio.Event()

    async def revoke_agent(
        self, agent_id: str, reason: str, *, banned: bool, claim: RemovalClaim
    ) -> int:
        self.revoked.append(agent_id)
        await self.release.wait()  # a removal of an agent with very much to revoke
        return 0


class _State:
    def __init__(self, stored: list[Removal], renewals: bool = True) -> None:
        self.stored = stored
        self.renewals = renewals  # False: another server took the claim over after the first
        self.claims = 0

    async def removals_before(self, before: int) -> list[Removal]:
        return [r for r in self.stored if r.started_at < before]

    async def end_removal(self, removal: Removal) -> bool:
        self.stored.remove(removal)
        return True

    async def claim_removal(self, agent_id: str, holder: str, ttl: int) -> bool:
        self.claims += 1
        return any(r.agent_id == agent_id for r in self.stored) and (
            self.renewals or self.claims == 1
        )

    async def renew_removal_claim(self, agent_id: str, holder: str, ttl: int) -> bool:
        return await self.claim_removal(agent_id, holder, ttl)

    async def removal_of(self, agent_id: str) -> Removal | None:
        return next((r for r in self.stored if r.agent_id == agent_id), None)

    async def release_removal_claim(self, agent_id: str, holder: str) -> None:
        pass


def test_a_removal_still_running_at_its_grace_is_joined_not_run_again() -> None:
    clock = FakeClock(start=10_000.0)
    removal = Removal("spiffe://example.org/agent/a", REMOVAL_EVICTED, 9_000)
    service, state = _Service(), _State([removal])
    removals = AgentRemovals(state, service, clock)  # type: ignore[arg-type]

    async def scenario() -> Any:
        operator = asyncio.create_task(removals.carry_out(removal))
        await asyncio.sleep(0)  # the operator's removal is revoking
        housekeeping = asyncio.create_task(removals.finish_cut_short(grace=60))
        await asyncio.sleep(0.05)
        service.release.set()
        return await asyncio.gather(operator, housekeeping)

    _, finished = asyncio.run(scenario())
    assert service.revoked == ["spiffe://example.org/agent/a"]  # once, not twice
    assert finished == 1
    assert state.stored == []


def test_a_finisher_whose_claim_was_taken_over_stops_and_leaves_the_removal() -> None:
    """Its renewals failed past the claim's life and another server took the claim: this
    finisher stops before logging anything more, and does not end the removal."""
    clock = FakeClock(start=10_000.0)
    removal = Removal("spiffe://example.org/agent/a", REMOVAL_EVICTED, 9_000)
    service, state = _Service(), _State([removal], renewals=False)
    removals = AgentRemovals(state, service, clock, renew_every=0.01)  # type: ignore[arg-type]

    finished = asyncio.run(removals.finish_cut_short(grace=60))
    assert finished == 0
    assert service.revoked == ["spiffe://example.org/agent/a"]  # begun, then given up
    assert state.stored == [removal]  # the new holder's to end
