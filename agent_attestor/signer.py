"""What the agent needs from the server to mint workload SVIDs (the node API, seen as a port)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class X509Result:
    entry_id: str
    chain_der: bytes = b""
    error: str = ""
    # Not answered in this call (the server's reply would have outgrown a message): asked
    # for again at once, neither refused nor waited for.
    deferred: bool = False


@dataclass(frozen=True, slots=True)
class MintedJwt:
    token: str = field(repr=False)
    issued_at: float
    expires_at: float


class SvidSigner(Protocol):
    async def batch_new_x509(self, params: list[tuple[str, bytes]]) -> list[X509Result]:
        """Sign (entry_id, CSR DER) pairs; results in request order."""
        ...

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt: ...
