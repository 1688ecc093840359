"""Shared server fixtures: a fake clock, a real SQLite datastore in tmp_path, a key store, a CA."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.ca.workers import SigningWorkers
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock
from svid._spiffe_id import TrustDomain
from tests.server.fixtures import RunningServer, running_server

TRUST_DOMAIN = TrustDomain("example.org")


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    """A started server with the default configuration, one per module: the module's tests
    share it, so each keeps to names of its own. A module needing another configuration
    defines its own `srv`, which takes the place of this one."""
    yield from running_server()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000)


@pytest.fixture
def workers(clock: FakeClock) -> Iterator[SigningWorkers]:
    """One real signing worker process, started; a module's own `clock` fixture sets its time."""
    pool = SigningWorkers(1, clock)
    try:
        assert pool.warm_up(30), "the worker did not start"
        yield pool
    finally:
        pool.close()


@pytest.fixture
def datastore(tmp_path: Path, clock: FakeClock) -> Iterator[SqliteDataStore]:
    store = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
    yield store
    store.close()


@pytest.fixture
def keystore(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys")


@pytest.fixture
def ca_manager(datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock) -> CaManager:
    manager = CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, clock)
    manager.initialize()
    return manager


def openssl_verify(
    tmp_path: Path,
    leaf: x509.Certificate,
    authorities: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    *,
    at: float | None = None,
    crls: Sequence[bytes] = (),
) -> subprocess.CompletedProcess[str]:
    """`openssl verify -x509_strict` of `leaf` against `authorities`: an independent verifier.
    With `crls` (DER), `-crl_check` too: the leaf's issuer must have a CRL among them, and the
    leaf must not be on it."""
    pem = serialization.Encoding.PEM
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"".join(c.public_bytes(pem) for c in authorities))
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(leaf.public_bytes(pem))
    argv = ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(bundle)]
    if intermediates:
        untrusted = tmp_path / "untrusted.pem"
        untrusted.write_bytes(b"".join(c.public_bytes(pem) for c in intermediates))
        argv += ["-untrusted", str(untrusted)]
    if at is not None:
        argv += ["-attime", str(int(at))]
    if crls:
        crl_file = tmp_path / "crls.pem"
        crl_file.write_bytes(
            b"".join(x509.load_der_x509_crl(der).public_bytes(pem) for der in crls)
        )
        argv += ["-crl_check", "-CRLfile", str(crl_file)]
    return subprocess.run([*argv, str(leaf_file)], capture_output=True, text=True, check=False)
