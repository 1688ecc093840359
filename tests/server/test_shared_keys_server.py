"""The server with a key-encryption key: keys sealed in the datastore, the lease, the upgrade."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from server.app import Server
from server.ca.errors import CaConfigError
from server.ca.manager import ROTATION_LEASE
from server.ca.sealing import KeyEncryptionKey
from server.config import build_config
from server.datastore.records import JWT_KIND, X509_KIND
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock
from tests.server.fixtures import TRUST_DOMAIN, short_tmpdir, start_server


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _kek(root: Path) -> Path:
    path = root / "kek"
    KeyEncryptionKey.generate().write_new(path)
    return path


def test_a_server_with_a_kek_keeps_no_key_file_and_serves(root: Path) -> None:
    kek = _kek(root)
    server = start_server(root, key_encryption_key_file=str(kek))
    try:
        agent = server.attest()  # real attestation over TLS, signed by the sealed CA
        (ca_der,) = server.bundle().x509_authorities
        agent.chain[0].verify_directly_issued_by(x509.load_der_x509_certificate(ca_der))
        assert list((root / "data" / "keys").glob("*.pem")) == []
        assert server.server.ca.holds_rotation_lease
        store = SqliteDataStore(root / "data" / "datastore.sqlite3", server.clock)
        slots = store.list_key_slots(X509_KIND) + store.list_key_slots(JWT_KIND)
        assert len(slots) == 2
        assert all(s.sealed_key for s in slots)
        # Another server can not take the rotation over while this one runs...
        assert not store.acquire_lease(ROTATION_LEASE, "other", int(server.clock.now()), 30)
    finally:
        server.stop()
    # ...and at once after it stopped cleanly.
    assert store.acquire_lease(ROTATION_LEASE, "other", int(server.clock.now()), 30)
    store.close()


def test_switching_a_server_to_a_kek_keeps_its_bundle(root: Path) -> None:
    lone = start_server(root)
    before = lone.bundle()
    lone.stop()
    assert len(list((root / "data" / "keys").glob("*.pem"))) == 2

    shared = start_server(root, key_encryption_key_file=str(_kek(root)))
    try:
        after = shared.bundle()
        assert list(after.x509_authorities) == list(before.x509_authorities)
        assert list(after.jwt_keys) == list(before.jwt_keys)
        assert list((root / "data" / "keys").glob("*.pem")) == []
        shared.attest()
    finally:
        shared.stop()


def test_an_unsafe_kek_file_stops_the_start_with_its_setting_named(root: Path) -> None:
    kek = _kek(root)
    kek.chmod(0o644)
    config = build_config(
        {
            "trust_domain": TRUST_DOMAIN,
            "data_dir": str(root / "data"),
            "admin_socket": str(root / "priv" / "admin.sock"),
            "key_encryption_key_file": str(kek),
        }
    )
    server = Server(config, FakeClock())
    with pytest.raises(CaConfigError, match=r"key_encryption_key_file: .*kek has mode 0644"):
        asyncio.run(server.start())
    server.datastore.close()
