from __future__ import annotations

import json
from pathlib import Path

import pytest

from svid import (
    MAX_VERIFIER_LEEWAY,
    BundleError,
    MemoryBundleSource,
    RevocationSet,
    Revoked,
    SpiffeBundle,
    SvidError,
    TrustDomain,
    X509Bundle,
    load_bundle_file,
    normalize_serial,
)
from svid._cache import LruCache
from tests.svid.certs import ec_key, make_ca

TD = TrustDomain("example.org")


@pytest.mark.parametrize(
    ("given", "want"),
    [(255, "ff"), ("FF", "ff"), ("00ff", "ff"), ("0x0A", "a"), ("0a:bc", "abc"), (0, "0")],
)
def test_normalize_serial(given: str | int, want: str) -> None:
    assert normalize_serial(given) == want


@pytest.mark.parametrize("bad", ["zz", "", -1])
def test_normalize_serial_rejects(bad: str | int) -> None:
    with pytest.raises(SvidError):
        normalize_serial(bad)


def test_revocation_set_add_lookup_prune() -> None:
    rs = RevocationSet([Revoked("x509_serial", "0AB", 100.0), Revoked("jwt_id", "j1", 50.0)])
    assert rs.is_serial_revoked("ab")
    assert rs.is_jti_revoked("j1")
    assert not rs.is_jti_revoked("j2")
    v = rs.version
    rs.revoke_jti("j2", 200.0)
    assert rs.version == v + 1
    assert len(rs) == 3
    # Each is kept through its expiry plus the widest leeway a verifier may apply.
    assert rs.prune(50.0 + MAX_VERIFIER_LEEWAY) == 0
    assert rs.prune(51.0 + MAX_VERIFIER_LEEWAY) == 1
    assert not rs.is_jti_revoked("j1")
    assert rs.prune(51.0 + MAX_VERIFIER_LEEWAY) == 0
    assert rs.prune(150.0 + MAX_VERIFIER_LEEWAY) == 1
    assert {r.value for r in rs.items()} == {"j2"}
    rs.replace([])
    assert len(rs) == 0


def test_revocation_keeps_latest_expiry() -> None:
    rs = RevocationSet()
    rs.revoke_serial("a", 100.0)
    rs.revoke_serial("A", 50.0)
    assert rs.prune(75.0 + MAX_VERIFIER_LEEWAY) == 0
    assert rs.is_serial_revoked("a")


def test_revocation_unknown_kind() -> None:
    with pytest.raises(SvidError, match="unknown revocation kind"):
        RevocationSet([Revoked("crl", "x", 1.0)])


def test_lru_cache_evicts_least_recently_used() -> None:
    c: LruCache[str, int] = LruCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)
    assert c.get("b") is None
    assert c.get("a") == 1
    assert c.get("c") == 3
    c.discard("a")
    assert len(c) == 1
    c.clear()
    assert len(c) == 0
    z: LruCache[str, int] = LruCache(0)
    z.put("a", 1)
    assert z.get("a") is None
    with pytest.raises(ValueError, match="max_entries"):
        LruCache(-1)


def test_memory_source_keeps_unchanged_bundles_identical() -> None:
    ca = make_ca()
    src = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,), {"k": ec_key().public_key()}))
    before = src.x509_bundle_for(TD)
    src.update(SpiffeBundle(TD, (ca.cert,), dict(src.jwt_bundle_for(TD).keys)))  # type: ignore[union-attr]
    assert src.x509_bundle_for(TD) is before
    src.update(SpiffeBundle(TD, (make_ca().cert,)))
    assert src.x509_bundle_for(TD) is not before
    src.remove(TD)
    assert src.x509_bundle_for(TD) is None
    assert src.jwt_bundle_for(TD) is None


def test_load_bundle_file(tmp_path: Path) -> None:
    ca = make_ca()
    b = SpiffeBundle(TD, (ca.cert,), {"k": ec_key().public_key()}, sequence=3)
    (tmp_path / "b.json").write_bytes(b.to_json())
    assert load_bundle_file(TD, tmp_path / "b.json") == b
    (tmp_path / "b.pem").write_bytes(X509Bundle(TD, (ca.cert,)).to_pem())
    assert load_bundle_file(TD, tmp_path / "b.pem").x509_authorities == (ca.cert,)
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(BundleError, match="neither"):
        load_bundle_file(TD, tmp_path / "junk")
    (tmp_path / "bad.json").write_text(json.dumps({"nokeys": 1}))
    with pytest.raises(BundleError, match="'keys'"):
        load_bundle_file(TD, tmp_path / "bad.json")
