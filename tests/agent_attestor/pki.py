"""A real, small PKI for agent tests: a CA that signs CSRs into SVIDs and an ES256 JWT key."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent_attestor.model import JwtKey, TrustBundle
from agent_attestor.signer import MintedJwt, X509Result
from svid._clock import Clock, to_datetime
from svid._jose import sign_jws


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class LocalCa:
    clock: Clock
    trust_domain: str = "example.org"
    ttl: int = 300
    jwt_ttl: int = 300
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    jwt_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    jwt_kid: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        now = self.clock.now()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(to_datetime(now - 3600))
            .not_valid_after(to_datetime(now + 86400 * 10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def bundle(self) -> TrustBundle:
        return TrustBundle(
            trust_domain=self.trust_domain,
            x509_authorities=(self.cert.public_bytes(serialization.Encoding.DER),),
            jwt_keys=(JwtKey(self.jwt_kid, _spki(self.jwt_key.public_key())),),
            sequence=1,
        )

    def sign_leaf(
        self, public_key: ec.EllipticCurvePublicKey, spiffe_id: str, ttl: int | None = None
    ) -> x509.Certificate:
        now = self.clock.now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(to_datetime(now - 10))
            .not_valid_after(to_datetime(now + (ttl or self.ttl)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, True, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def mint_jwt(self, spiffe_id: str, audience: list[str], ttl: int | None = None) -> MintedJwt:
        now = int(self.clock.now())
        exp = now + (ttl or self.jwt_ttl)
        header = {"alg": "ES256", "kid": self.jwt_kid, "typ": "JWT"}
        claims = {
            "sub": spiffe_id,
            "aud": audience,
            "exp": exp,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        token = sign_jws(header, claims, self.jwt_key)
        return MintedJwt(token=token, issued_at=now, expires_at=exp)


class FakeSigner:
    """The server side of SvidSigner, signing with a LocalCa; `fail` makes every call raise."""

    def __init__(self, ca: LocalCa, spiffe_ids: dict[str, str] | None = None) -> None:
        self.ca = ca
        self.spiffe_ids = spiffe_ids if spiffe_ids is not None else {}
        self.fail = False
        self.refuse_jwt: Exception | None = None  # a server decision, e.g. NoIdentityError
        self.ttls: dict[str, int] = {}  # entry id -> its SVIDs' TTL, when not the CA's
        self.batches: list[int] = []
        self.requested: list[list[str]] = []  # entry ids of each batch, in order
        self.jwt_calls = 0
        # The server's per-agent JWT limit, as a count (the tests' clock stands still): past
        # it a mint fails as the server's RESOURCE_EXHAUSTED does (any error but a decision).
        self.jwt_budget: int | None = None
        # Items one reply has room for (the server's byte bound): the rest are deferred.
        self.answer_at_most: int | None = None

    async def batch_new_x509(self, params: list[tuple[str, bytes]]) -> list[X509Result]:
        if self.fail:
            raise ConnectionError("server unreachable")
        self.batches.append(len(params))
        self.requested.append([entry_id for entry_id, _ in params])
        room = len(params) if self.answer_at_most is None else self.answer_at_most
        out = []
        for entry_id, csr_der in params[:room]:
            sid = self.spiffe_ids.get(entry_id)
            if sid is None:
                out.append(X509Result(entry_id, error="not entitled"))
                continue
            csr = x509.load_der_x509_csr(csr_der)
            assert csr.is_signature_valid
            pub = csr.public_key()
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            leaf = self.ca.sign_leaf(pub, sid, self.ttls.get(entry_id))
            out.append(X509Result(entry_id, leaf.public_bytes(serialization.Encoding.DER)))
        return out + [X509Result(entry_id, deferred=True) for entry_id, _ in params[room:]]

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        if self.fail:
            raise ConnectionError("server unreachable")
        if self.refuse_jwt is not None:
            raise self.refuse_jwt
        if self.jwt_budget is not None and self.jwt_calls >= self.jwt_budget:
            raise ConnectionError("RESOURCE_EXHAUSTED: JWT rate limit exceeded for this agent")
        self.jwt_calls += 1
        return self.ca.mint_jwt(spiffe_id, audience)


class SizedSigner:
    """Mints tokens of a chosen size that never reach their refresh point, and counts mints:
    what a JWT cache's budgets see, with no crypto in the way."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.calls = 0

    async def batch_new_x509(self, params: list[tuple[str, bytes]]) -> list[X509Result]:
        raise AssertionError("not used")

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        self.calls += 1
        body = f"{self.calls}.".ljust(self.size, "x")  # a fresh str each time, like a real mint
        return MintedJwt(token=body, issued_at=0.0, expires_at=1e12)
