"""The parse memos that run before a signature is checked keep only what was verified: a flood of
forged inputs, each unique, leaves what honest traffic uses memoized."""

from __future__ import annotations

from typing import Any

import pytest

import svid._jwt as jwt_module
from svid import (
    AccessTokenVerifier,
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    SpiffeBundle,
    TrustDomain,
    VerificationError,
    b64url_encode,
)
from tests.svid import test_verify_access as access
from tests.svid import test_verify_jwt as svid_jwt
from tests.svid.certs import T0

TD = TrustDomain("example.org")
FLOOD = 600  # past every bound these memos have had


@pytest.fixture
def header_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many headers were decoded and checked (a memo miss each)."""
    calls = [0]
    for name in ("check_header", "check_typed_header"):
        real = getattr(jwt_module, name)

        def counted(header: Any, real: Any = real) -> Any:
            calls[0] += 1
            return real(header)

        monkeypatch.setattr(jwt_module, name, counted)
    return calls


def _forged(honest: str, i: int, typ: str) -> str:
    """The honest token under a header of its own (an unknown field), its signature kept."""
    _, claims, signature = honest.split(".")
    header = b64url_encode(f'{{"alg":"ES256","kid":"k1","typ":"{typ}","n":{i}}}'.encode())
    return f"{header}.{claims}.{signature}"


def test_forged_jwt_svid_headers_do_not_evict_the_honest_ones(header_checks: list[int]) -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": svid_jwt.KEY.public_key()}))
    verifier = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), cache_size=0)
    honest = svid_jwt.token()
    verifier.verify(honest, "svc")
    for i in range(FLOOD):
        with pytest.raises(VerificationError, match="signature is invalid"):
            verifier.verify(_forged(honest, i, "JWT"), "svc")
    header_checks[0] = 0
    verifier.verify(honest, "svc")
    assert header_checks[0] == 0


def test_forged_access_token_headers_do_not_evict_the_honest_ones(
    header_checks: list[int],
) -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": access.KEY.public_key()}))
    verifier = AccessTokenVerifier(
        source.jwt_bundle_for,
        issuer=access.ISSUER,
        audience=access.RESOURCE,
        trust_domain=TD,
        clock=FakeClock(T0),
        cache_size=0,
    )
    honest = access.token()
    verifier.verify(honest)
    for i in range(FLOOD):
        with pytest.raises(VerificationError, match="signature is invalid"):
            verifier.verify(_forged(honest, i, "at+jwt"))
    header_checks[0] = 0
    verifier.verify(honest)
    assert header_checks[0] == 0
