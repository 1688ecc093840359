"""Values the agent holds: selectors, the entries it serves, bundles and issued X.509-SVIDs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from svid._proto import common_pb2

# A task identity is `<runtime ID>/task/<task id>` (AGENTIC.md); the server marks them the same way.
TASK_PATH = "/task/"


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """One fact about a workload, e.g. ``Selector("unix", "uid:1000")``."""

    type: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"

    @classmethod
    def parse(cls, text: str) -> Selector:
        kind, sep, value = text.partition(":")
        if not sep or not kind or not value:
            raise ValueError(f"selector {text!r} is not of the form type:value")
        return cls(kind, value)


@dataclass(frozen=True, slots=True)
class Entry:
    """A registration entry this node serves (what the server's Sync stream says)."""

    id: str
    spiffe_id: str
    selectors: frozenset[Selector]
    hint: str = ""
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    created_at: int = 0
    revision: int = 0
    expires_at: int = 0
    # Foreign trust domain names whose bundles this entry's workloads are given.
    federates_with: tuple[str, ...] = ()

    def matches(self, caller_selectors: frozenset[Selector]) -> bool:
        """A caller gets this entry when every one of its selectors is among the caller's."""
        return bool(self.selectors) and self.selectors <= caller_selectors

    @classmethod
    def from_proto(cls, msg: common_pb2.Entry) -> Entry:
        return cls(
            id=msg.id,
            spiffe_id=msg.spiffe_id,
            selectors=frozenset(Selector(s.type, s.value) for s in msg.selectors),
            hint=msg.hint,
            x509_svid_ttl=msg.x509_svid_ttl,
            jwt_svid_ttl=msg.jwt_svid_ttl,
            dns_names=tuple(msg.dns_names),
            created_at=msg.created_at,
            revision=msg.revision,
            expires_at=msg.expires_at,
            federates_with=tuple(msg.federates_with),
        )

    def to_proto(self) -> common_pb2.Entry:
        return common_pb2.Entry(
            id=self.id,
            spiffe_id=self.spiffe_id,
            selectors=[
                common_pb2.Selector(type=s.type, value=s.value) for s in sorted(self.selectors)
            ],
            hint=self.hint,
            x509_svid_ttl=self.x509_svid_ttl,
            jwt_svid_ttl=self.jwt_svid_ttl,
            dns_names=list(self.dns_names),
            created_at=self.created_at,
            revision=self.revision,
            expires_at=self.expires_at,
            federates_with=list(self.federates_with),
        )

    @property
    def is_task(self) -> bool:
        """A task identity: minted for only when asked for by name (FetchJWTSVID spiffe_id)."""
        return TASK_PATH in self.spiffe_id

    @property
    def issuance_key(self) -> tuple[str, tuple[str, ...], int]:
        """What an issued SVID depends on: a change here means the SVID must be re-issued."""
        return (self.spiffe_id, self.dns_names, self.x509_svid_ttl)


@dataclass(frozen=True, slots=True)
class JwtKey:
    kid: str
    public_key_der: bytes  # SubjectPublicKeyInfo
    expires_at: int = 0


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """One trust domain's keys: X.509 authorities (DER) and JWT keys."""

    trust_domain: str
    x509_authorities: tuple[bytes, ...] = ()
    jwt_keys: tuple[JwtKey, ...] = ()
    sequence: int = 0
    refresh_hint: int = 0

    @property
    def x509_der(self) -> bytes:
        """The Workload API form: CA certificates as concatenated DER."""
        return b"".join(self.x509_authorities)

    @classmethod
    def from_proto(cls, msg: common_pb2.Bundle) -> TrustBundle:
        return cls(
            trust_domain=msg.trust_domain.removeprefix("spiffe://"),
            x509_authorities=tuple(msg.x509_authorities),
            jwt_keys=tuple(
                JwtKey(k.kid, k.public_key, k.expires_at) for k in msg.jwt_keys if k.kid
            ),
            sequence=msg.sequence,
            refresh_hint=msg.refresh_hint,
        )

    def to_proto(self) -> common_pb2.Bundle:
        return common_pb2.Bundle(
            trust_domain=self.trust_domain,
            x509_authorities=list(self.x509_authorities),
            jwt_keys=[
                common_pb2.JWTKey(kid=k.kid, public_key=k.public_key_der, expires_at=k.expires_at)
                for k in self.jwt_keys
            ],
            sequence=self.sequence,
            refresh_hint=self.refresh_hint,
        )


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """An X.509-SVID the agent holds for one entry: its chain and key as the Workload API sends
    them (DER), and the facts rotation and revocation read.

    No parsed certificate or key objects: they tripled what each held SVID costs (measured by
    bench/test_bench_agent_scale.py; issue 13's goal is 5 KB per entry), and nothing reads them
    after the chain has been checked against the key (_crypto.issued_svid).
    """

    entry_id: str
    spiffe_id: str
    chain_der: bytes = field(repr=False)
    key_der: bytes = field(repr=False)
    not_before: float
    not_after: float
    serial_hex: str
    issuance_key: tuple[str, tuple[str, ...], int] = ("", (), 0)
    received_at: float = 0.0  # when it reached this agent (rotation.rotation_point's `arrived`)


def entries_for(entries: Iterable[Entry], selectors: frozenset[Selector]) -> list[Entry]:
    """The entries a caller with these selectors may have, oldest first (the default first).

    The plain definition, O(entries): the agent answers from selector_index, which property
    tests prove equal to this."""
    return sorted((e for e in entries if e.matches(selectors)), key=lambda e: (e.created_at, e.id))
