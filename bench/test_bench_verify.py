"""Verification fast path against the physical limit: one raw ECDSA P-256 verify from cryptography.

Verification runs on the caller's thread, so the baseline is one raw verify on one core (this
process), measured in the same rounds as every row (report.Rounds: short windows of each op,
order rotating; ratios are the median of per-round ratios, spread their min-max). The baseline
verifies a signature over as many bytes as the SVID check does (the leaf's TBSCertificate, the
token's signing input).

Every row cycles through `DISTINCT` credentials of one workload (SPIRE-like leaves with their
own key, serial and SKID; tokens with their own jti, iat and exp), and every call gets a fresh
copy of the credential (bytes from a socket, a header decoded to str), so neither a cached hash
of the key object nor one credential's bytes can answer for the next. The copy is in the timed
call, as it is in a server. The cached rows verify credentials that are all in the cache (each
was verified once before the rounds). The verifiers read the system clock, as in production.
Rows and goals (issue 5):
- X.509-SVID verify, uncached: >= 0.8x raw verify
- JWT-SVID verify, uncached: >= 0.8x raw verify and >= 1.3x PyJWT decode (same key); py-spiffe too
- either verify, cached: >= 25x raw verify
- memory per cached entry, including the credential bytes the cache keeps alive as its key
"""

from __future__ import annotations

import gc
import itertools
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.report import Rounds, Table, at_least, rate, rounds, value_row
from svid import (
    FakeClock,
    JwtBundle,
    JwtVerifier,
    MemoryBundleSource,
    SpiffeBundle,
    TrustDomain,
    X509Verifier,
    der_concat,
    sign_jws,
)
from tests.svid.certs import make_ca, make_leaf

TD = TrustDomain("example.org")
ROUNDS = 100
SLICE_SECONDS = 0.1
DISTINCT = 1000  # credentials every row cycles through; all fit in the default cache
RAW = "raw P-256 verify, 1 core"


def _raw_verify_op(size: int, *, reuse_algorithm: bool = False) -> Callable[[], None]:
    key = ec.generate_private_key(ec.SECP256R1())
    data = b"x" * size
    sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    pub = key.public_key()
    if reuse_algorithm:  # shown for reference: the algorithm objects are a few % of the call
        algorithm = ec.ECDSA(hashes.SHA256())
        return lambda: pub.verify(sig, data, algorithm)
    return lambda: pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))


def _rounds(ops: dict[str, Callable[[], Any]]) -> Rounds:
    for op in ops.values():  # warm up: first calls build per-bundle and per-shape state
        for _ in range(50):
            op()
    return Rounds(
        {name: (lambda op=op: rate(op, SLICE_SECONDS)) for name, op in ops.items()},
        rounds(ROUNDS),
    )


def _leaves(n: int) -> tuple[Any, list[bytes]]:
    now = time.time()
    ca = make_ca(not_before=now - 60, not_after=now + 86400)
    leaves = [
        make_leaf(ca, not_before=now - 60 - i, not_after=now + 3600 + i, subject_key_id=True)
        for i in range(n)
    ]
    return ca, [der_concat([leaf.cert]) for leaf in leaves]


def _tokens(key: ec.EllipticCurvePrivateKey, n: int, *, subjects: bool = False) -> list[bytes]:
    now = int(time.time())
    return [
        sign_jws(
            {"kid": "k1", "typ": "JWT"},
            {
                "sub": f"spiffe://example.org/w{i if subjects else ''}",
                "aud": ["svc"],
                "exp": now + 3600 + i,
                "iat": now - i,
                "jti": f"{i:032x}",
            },
            key,
        ).encode()
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def x509_setup() -> tuple[X509Verifier, X509Verifier, list[bytearray]]:
    ca, ders = _leaves(DISTINCT)
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    # The default clock (SystemClock): FakeClock's lock is a test convenience production lacks.
    uncached = X509Verifier(source.x509_bundle_for, cache_size=0)
    cached = X509Verifier(source.x509_bundle_for)
    return uncached, cached, [bytearray(d) for d in ders]


@pytest.fixture(scope="module")
def jwt_setup() -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": key.public_key()}))
    their_bundle = spiffe.JwtBundle.parse(
        spiffe.TrustDomain("example.org"), JwtBundle(TD, {"k1": key.public_key()}).to_jwks()
    )
    return {
        "tokens": _tokens(key, DISTINCT),
        "key": key.public_key(),
        "uncached": JwtVerifier(source.jwt_bundle_for, cache_size=0),  # the system clock
        "cached": JwtVerifier(source.jwt_bundle_for),
        "their_bundle": their_bundle,
    }


def test_x509_verify_vs_raw(
    benchmark: Any,
    table: Table,
    x509_setup: tuple[X509Verifier, X509Verifier, list[bytearray]],
) -> None:
    uncached, cached, ders = x509_setup
    assert len(ders) <= cached.cache.max_entries
    for der in ders:
        cached.verify_der(bytes(der))
    one, two = itertools.cycle(ders), itertools.cycle(ders)
    tbs_size = len(x509.load_der_x509_certificate(bytes(ders[0])).tbs_certificate_bytes)
    r = _rounds(
        {
            RAW: _raw_verify_op(tbs_size),
            "raw, reused": _raw_verify_op(tbs_size, reuse_algorithm=True),
            "uncached": lambda: uncached.verify_der(bytes(next(one))),
            "cached": lambda: cached.verify_der(bytes(next(two))),
        }
    )
    benchmark.pedantic(lambda: uncached.verify_der(bytes(next(one))), rounds=200, iterations=1)
    uncached_row, cached_row = "X.509-SVID verify, uncached", "X.509-SVID verify, cached"
    table.add(
        r.rate_row(f"{RAW} (X.509 TBS size)", RAW),
        r.ratio_row(f"{RAW}, ECDSA object reused / {RAW} (for reference)", "raw, reused", RAW),
        r.rate_row(uncached_row, "uncached"),
        r.ratio_row(f"{uncached_row} / {RAW}", "uncached", RAW, goal=at_least(0.8)),
        r.rate_row(cached_row, "cached", note=f"{DISTINCT} distinct leaves, all cached"),
        r.ratio_row(f"{cached_row} / {RAW}", "cached", RAW, goal=at_least(25.0)),
    )


def test_jwt_verify_vs_raw_pyjwt_and_py_spiffe(
    benchmark: Any, table: Table, jwt_setup: dict[str, Any]
) -> None:
    tokens, key = jwt_setup["tokens"], jwt_setup["key"]
    uncached, cached = jwt_setup["uncached"], jwt_setup["cached"]
    their_bundle = jwt_setup["their_bundle"]
    assert len(tokens) <= cached.cache.max_entries
    for token in tokens:
        cached.verify(token.decode(), "svc")
    ours, mine, theirs, py_spiffes = (itertools.cycle(tokens) for _ in range(4))

    def pyjwt_decode() -> None:
        pyjwt.decode(next(theirs).decode(), key, algorithms=["ES256"], audience="svc")

    def py_spiffe() -> None:
        spiffe.JwtSvid.parse_and_validate(next(py_spiffes).decode(), their_bundle, {"svc"})

    r = _rounds(
        {
            RAW: _raw_verify_op(len(tokens[0].rpartition(b".")[0])),
            "uncached": lambda: uncached.verify(next(ours).decode(), "svc"),
            "cached": lambda: cached.verify(next(mine).decode(), "svc"),
            "pyjwt": pyjwt_decode,
            "py-spiffe": py_spiffe,
        }
    )
    benchmark.pedantic(lambda: uncached.verify(next(ours).decode(), "svc"), rounds=200)
    uncached_row, cached_row = "JWT-SVID verify, uncached", "JWT-SVID verify, cached"
    pyjwt_row, py_spiffe_row = "PyJWT decode (ES256)", "py-spiffe parse_and_validate"
    table.add(
        r.rate_row(f"{RAW} (JWT signing input size)", RAW),
        r.rate_row(uncached_row, "uncached"),
        r.ratio_row(f"{uncached_row} / {RAW}", "uncached", RAW, goal=at_least(0.8)),
        r.ratio_row(f"{uncached_row} / {pyjwt_row}", "uncached", "pyjwt", goal=at_least(1.3)),
        r.ratio_row(f"{uncached_row} / {py_spiffe_row}", "uncached", "py-spiffe"),
        r.rate_row(cached_row, "cached", note=f"{DISTINCT} distinct tokens, all cached"),
        r.ratio_row(f"{cached_row} / {RAW}", "cached", RAW, goal=at_least(25.0)),
        r.ratio_row(f"{pyjwt_row} / {RAW}", "pyjwt", RAW),
        r.ratio_row(f"{py_spiffe_row} / {RAW}", "py-spiffe", RAW),
    )


def _bytes_per_entry(fill: Callable[[], None], n: int) -> float:
    """Bytes still allocated per entry after `fill` put n entries in a cache: it makes each
    credential inside the measurement and drops its own reference, so what the cache keeps
    alive (its key is the credential itself) is counted with the entry."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / n


def test_memory_per_cached_entry(benchmark: Any, table: Table) -> None:
    n = 500
    now = time.time()
    ca, ders = _leaves(n)
    stored = [bytearray(d) for d in ders]  # the copies made in fill are what the cache keeps
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    xv = X509Verifier(source.x509_bundle_for, clock=FakeClock(now), cache_size=n)
    xv.verify_der(bytes(stored[0]))  # anchor index built outside the measurement
    xv.cache.clear()

    key = ec.generate_private_key(ec.SECP256R1())
    jsource = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": key.public_key()}))
    tokens = _tokens(key, n, subjects=True)
    jv = JwtVerifier(jsource.jwt_bundle_for, clock=FakeClock(now), cache_size=n)
    jv.verify(tokens[0].decode(), "svc")  # per-key and per-header state outside the measurement
    jv.cache.clear()

    def fill_x509() -> None:
        for der in stored:
            xv.verify_der(bytes(der))

    def fill_jwt() -> None:
        for tok in tokens:
            jv.verify(tok.decode(), "svc")

    x509_bytes = _bytes_per_entry(fill_x509, n)
    jwt_bytes = _bytes_per_entry(fill_jwt, n)
    assert len(xv.cache) == n
    assert len(jv.cache) == n
    x509_key = sum(len(d) for d in ders) / n
    jwt_key = sum(len(t) for t in tokens) / n
    benchmark.pedantic(lambda: jv.verify(tokens[0].decode(), "svc"), rounds=100, iterations=1)
    table.add(
        value_row(
            "memory per cached X.509 entry, credential included",
            x509_bytes,
            "B",
            note=f"of which the DER key: {x509_key:,.0f} B + object header; {n} entries",
        ),
        value_row(
            "memory per cached JWT entry, credential included",
            jwt_bytes,
            "B",
            note=f"of which the token key: {jwt_key:,.0f} B + object header; {n} entries",
        ),
    )
