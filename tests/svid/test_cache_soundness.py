"""Property: after any sequence of rotations, removals, revocations and clock moves, a verifier with
a cache answers exactly like a verifier without one (never more permissive)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svid import (
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    RevocationSet,
    SpiffeBundle,
    SvidError,
    TrustDomain,
    X509Verifier,
    der_concat,
    sign_jws,
)
from tests.svid.certs import T0, ec_key, make_ca, make_leaf

TD = TrustDomain("example.org")
CAS = [make_ca(not_after=T0 + 500) for _ in range(3)]
JWT_KEYS = [ec_key() for _ in range(3)]
# Leaves and tokens under each authority, with different lifetimes.
LEAVES = [
    (i, make_leaf(ca, not_after=T0 + life)) for i, ca in enumerate(CAS) for life in (30, 120, 400)
]
TOKENS = [
    (
        i,
        f"j{i}-{life}",
        sign_jws(
            {"kid": f"k{i}"},
            {
                "sub": "spiffe://example.org/w",
                "aud": ["svc"],
                "exp": int(T0) + life,
                "jti": f"j{i}-{life}",
            },
            key,
        ),
    )
    for i, key in enumerate(JWT_KEYS)
    for life in (30, 120, 400)
]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("bundle"), st.sets(st.integers(0, 2))),
        st.tuples(st.just("revoke_leaf"), st.integers(0, len(LEAVES) - 1)),
        st.tuples(st.just("revoke_jti"), st.integers(0, len(TOKENS) - 1)),
        st.tuples(st.just("advance"), st.integers(0, 200)),
        st.tuples(st.just("unrevoke_all"), st.none()),
    ),
    max_size=12,
)


def _verdict(fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except SvidError as exc:
        return type(exc).__name__
    return "ok"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_cached_verdicts_equal_fresh_verdicts(steps: list[tuple[str, Any]]) -> None:
    clock = FakeClock(T0)
    revocations = RevocationSet()

    def bundle(which: set[int]) -> SpiffeBundle:
        return SpiffeBundle(
            TD,
            tuple(CAS[i].cert for i in sorted(which)),
            {f"k{i}": JWT_KEYS[i].public_key() for i in sorted(which)},
        )

    source = MemoryBundleSource.of(bundle({0, 1, 2}))
    cached_x = X509Verifier(source.x509_bundle_for, clock=clock, revocations=revocations)
    cached_j = JwtVerifier(source.jwt_bundle_for, clock=clock, revocations=revocations, leeway=0)

    def check() -> None:
        fresh_x = X509Verifier(
            source.x509_bundle_for, clock=clock, revocations=revocations, cache_size=0
        )
        fresh_j = JwtVerifier(
            source.jwt_bundle_for, clock=clock, revocations=revocations, leeway=0, cache_size=0
        )
        for _, leaf in LEAVES:
            der = der_concat([leaf.cert])
            assert _verdict(cached_x.verify_der, der) == _verdict(fresh_x.verify_der, der)
        for _, _, tok in TOKENS:
            assert _verdict(cached_j.verify, tok, "svc") == _verdict(fresh_j.verify, tok, "svc")

    check()
    for op, arg in steps:
        if op == "bundle":
            source.update(bundle(arg))
        elif op == "revoke_leaf":
            leaf = LEAVES[arg][1]
            revocations.revoke_serial(leaf.cert.serial_number, T0 + 1000)
        elif op == "revoke_jti":
            revocations.revoke_jti(TOKENS[arg][1], T0 + 1000)
        elif op == "advance":
            clock.advance(arg)
        else:
            revocations.replace([])
        check()
