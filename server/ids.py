"""The server's reserved identities and name spaces."""

from __future__ import annotations

from dataclasses import dataclass

from svid._spiffe_id import SpiffeId, TrustDomain

SERVER_DNS_NAME = "svid-server"
AGENT_NAMESPACE = ("svid", "agent")
SERVER_PATH = ("svid", "server")


@dataclass(frozen=True)
class ServerIds:
    trust_domain: TrustDomain

    @property
    def server(self) -> SpiffeId:
        return SpiffeId.from_segments(self.trust_domain, *SERVER_PATH)

    def agent(self, attestor: str, name: str) -> SpiffeId:
        return SpiffeId.from_segments(self.trust_domain, *AGENT_NAMESPACE, attestor, name)

    def is_agent(self, spiffe_id: SpiffeId) -> bool:
        return (
            spiffe_id.trust_domain == self.trust_domain
            and len(spiffe_id.segments) > len(AGENT_NAMESPACE)
            and spiffe_id.segments[: len(AGENT_NAMESPACE)] == AGENT_NAMESPACE
        )

    def is_reserved(self, spiffe_id: SpiffeId) -> bool:
        """The server's ID and everything under /svid/agent and /svid/server belong to svidd."""
        segs = spiffe_id.segments
        return spiffe_id.trust_domain == self.trust_domain and (
            segs[:2] == SERVER_PATH or segs[:2] == AGENT_NAMESPACE
        )
