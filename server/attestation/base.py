"""The node attestor plugin interface."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from server.datastore.records import Selector, TokenUse
from svid._spiffe_id import SpiffeId

# Sends a challenge to the agent and returns its answer (x509pop's proof of possession).
Challenge = Callable[[bytes], Awaitable[bytes]]


@dataclass(frozen=True)
class AttestationResult:
    agent_id: SpiffeId
    attestation_type: str
    selectors: tuple[Selector, ...] = ()
    # Join tokens are single use; x509pop may attest the same node again while it is not banned.
    can_reattest: bool = False
    # A join token checked, not yet spent: the admission spends it with the agent's record,
    # once the attestation's audit event is committed, so a failure on the way spends nothing.
    token: TokenUse | None = None
    # What an earlier version named this node's agent (a change of its ID's basis): a ban of
    # the agent under such a name refuses the node as its ban would.
    former_agent_ids: tuple[SpiffeId, ...] = ()


class NodeAttestor(Protocol):
    @property
    def type_name(self) -> str:
        """The AttestationData.type this attestor handles."""
        ...

    @property
    def checks_cheaply(self) -> bool:
        """True when checking the evidence costs no more than refusing it for rate (no
        signature, no round trip, no write). The node API then checks such an attempt even
        from a host over its attestation budget, so a genuine one is never refused for the
        guesses of another caller at the same address.
        """
        ...

    async def attest(self, payload: bytes, challenge: Challenge) -> AttestationResult:
        """Check the evidence; raise PermissionDeniedError (or InvalidRequestError) if it fails.
        Writes nothing: single-use evidence goes back in the result's `token`."""
        ...
