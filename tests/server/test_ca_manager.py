"""The CA manager: first start, bundle contents, upstream CA mode, key files, configuration."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.ca.errors import CaConfigError, CaUnavailableError
from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.datastore.records import ACTIVE, JWT_KIND, RETIRED, X509_KIND, KeySlot
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock, to_datetime
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._x509 import check_leaf_profile
from tests.server.conftest import TRUST_DOMAIN, openssl_verify
from tests.server.fixtures import managed_server

WORKLOAD = SpiffeId.parse("spiffe://example.org/web")
PEM = serialization.Encoding.PEM


def leaf_for(manager: CaManager, ttl: int = 300) -> tuple[x509.Certificate, ...]:
    key = ec.generate_private_key(ec.SECP256R1())
    return manager.x509_signer().sign_svid(key.public_key(), WORKLOAD, ttl)


# -- first start ---------------------------------------------------------------------------------


def test_first_start_creates_one_active_key_of_each_kind(
    ca_manager: CaManager, keystore: KeyStore, datastore: SqliteDataStore
) -> None:
    for kind in (X509_KIND, JWT_KIND):
        slots = datastore.list_key_slots(kind)
        assert [s.status for s in slots] == [ACTIVE]
        path = keystore.path(slots[0].slot_id)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    bundle = ca_manager.bundle()
    assert bundle.sequence == 1
    assert bundle.refresh_hint == 300
    assert bundle.x509_authorities == (ca_manager.x509_signer().ca_certificate,)
    assert list(bundle.jwt_authorities) == [ca_manager.jwt_signer().kid]


def test_ca_certificate_profile(ca_manager: CaManager, clock: FakeClock) -> None:
    ca = ca_manager.x509_signer().ca_certificate
    assert ca.issuer == ca.subject
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert ca.not_valid_after_utc.timestamp() == clock.now() + 86400


def test_bundle_json_carries_the_keys(ca_manager: CaManager) -> None:
    doc = ca_manager.bundle().to_json()
    assert b'"use":"x509-svid"' in doc
    assert b'"use":"jwt-svid"' in doc
    assert b'"spiffe_sequence":1' in doc


def test_uninitialised_manager_is_unavailable(
    datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    manager = CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, clock)
    for call in (manager.x509_signer, manager.jwt_signer, manager.bundle, manager.rotate):
        with pytest.raises(CaUnavailableError, match="not initialised"):
            call()


def test_subscribers_hear_bundle_changes_only(ca_manager: CaManager, clock: FakeClock) -> None:
    heard: list[int] = []
    unsubscribe = ca_manager.subscribe(lambda: heard.append(ca_manager.bundle().sequence))

    def broken() -> None:
        raise RuntimeError("subscriber bug")

    ca_manager.subscribe(broken)  # a failing subscriber does not stop the others
    assert not ca_manager.rotate()
    assert heard == []
    clock.set(ca_manager.next_rotation_check())
    assert ca_manager.rotate()
    assert heard == [2]
    unsubscribe()
    clock.set(ca_manager.next_rotation_check())
    ca_manager.rotate()
    assert heard == [2]


# -- restart hygiene -----------------------------------------------------------------------------


def _journal(datastore: SqliteDataStore) -> dict[str, list[KeySlot]]:
    return {kind: datastore.list_key_slots(kind) for kind in (X509_KIND, JWT_KIND)}


@pytest.mark.parametrize("kind", [X509_KIND, JWT_KIND])
def test_a_live_slot_whose_key_file_is_missing_refuses_the_start_and_keeps_the_journal(
    ca_manager: CaManager,
    datastore: SqliteDataStore,
    keystore: KeyStore,
    clock: FakeClock,
    kind: str,
) -> None:
    """A journaled key with no file is a wrong data_dir (or lost keys), not a cue for a new
    CA: the trust domain's agents trust the journaled one. The error names the file and the
    data_dir to look at."""
    journal = _journal(datastore)
    lost = journal[kind][0].slot_id
    keystore.delete(lost)
    again = CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, clock)
    expected = (
        rf"key file {re.escape(str(keystore.path(lost)))} of the active {kind} key slot .*"
        rf"data_dir {re.escape(str(keystore.directory.parent))} does not hold"
    )
    with pytest.raises(CaConfigError, match=expected):
        again.initialize()
    assert _journal(datastore) == journal
    assert len(keystore.slot_ids()) == 1  # the other kind's key is untouched


def test_another_trust_domain_on_the_datastore_refuses_the_start_naming_both(
    ca_manager: CaManager, datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    """trust_domain mistyped, or changed on a data_dir in use: the server ran on the datastore's
    CA under the new name, its agents refused it as another trust domain's server, and its
    entries and agents were listed as none."""
    journal = _journal(datastore)
    slot = journal[X509_KIND][0].slot_id
    other = CaManager(CaConfig(TrustDomain("example.com")), datastore, keystore, clock)
    expected = (
        f"^trust_domain: example.com, but the datastore is trust domain example.org's "
        f"\\(its CA, key slot {slot}, names example.org\\)"
    )
    with pytest.raises(CaConfigError, match=expected):
        other.initialize()
    assert _journal(datastore) == journal
    CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, clock).initialize()  # its own starts


def test_forgetting_lost_keys_drops_only_the_slots_still_lost(
    ca_manager: CaManager,
    datastore: SqliteDataStore,
    keystore: KeyStore,
    clock: FakeClock,
) -> None:
    """`svid-server ca forget-lost-keys --yes` forgets the slots it listed; a key file put back
    meanwhile keeps its slot, and then nothing is dropped."""
    journal = _journal(datastore)
    slot = journal[X509_KIND][0]
    saved = keystore.path(slot.slot_id).read_bytes()
    keystore.delete(slot.slot_id)
    again = CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, clock)
    lost = again.lost_keys()
    assert [(i.slot, i.path) for i in lost] == [(slot, keystore.path(slot.slot_id))]
    keystore.path(slot.slot_id).write_bytes(saved)
    with pytest.raises(CaConfigError, match=f"key slots {slot.slot_id}: not lost"):
        again.forget_lost_keys(lost)
    assert _journal(datastore) == journal


def test_a_retired_slot_whose_key_file_is_missing_stays_published(
    ca_manager: CaManager, datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    """A retired CA signs nothing but its own CRLs; agents still need it to check the leaves
    it issued, so a lost key file of it costs its CRLs, not its place in the bundle."""
    while not any(s.status == RETIRED for s in datastore.list_key_slots(X509_KIND)):
        clock.set(ca_manager.next_rotation_check())  # prepare a successor, then activate it
        ca_manager.rotate()
    retired = [s for s in datastore.list_key_slots(X509_KIND) if s.status == RETIRED]
    assert len(retired) == 1
    keystore.delete(retired[0].slot_id)
    again = CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, clock)
    again.initialize()
    assert again.bundle().x509_authorities == ca_manager.bundle().x509_authorities
    assert len(again.bundle().x509_authorities) == 2


def test_key_files_no_slot_names_are_kept(
    ca_manager: CaManager, datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    """An unnamed key file may be the CA of another datastore this data_dir also served: a
    start on the wrong datastore must not delete it."""
    keystore.save("orphan", ec.generate_private_key(ec.SECP256R1()))
    CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, clock).initialize()
    assert "orphan" in keystore.slot_ids()
    assert len(keystore.slot_ids()) == 3


SAVE_THEN_DIE = """
import os, signal, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric import ec
from server.ca import keys

def killed(_src, _dst):
    os.kill(os.getpid(), signal.SIGKILL)

keys.os.replace = killed  # the key is written and fsynced, not yet renamed into place
keys.KeyStore(Path(sys.argv[1])).save("cut", ec.generate_private_key(ec.SECP256R1()))
"""


def test_a_key_whose_save_was_cut_short_by_a_kill_is_not_left_on_disk(
    ca_manager: CaManager, datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    died = subprocess.run(
        [sys.executable, "-c", SAVE_THEN_DIE, str(keystore.directory)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert (keystore.directory / "cut.pem.tmp").exists()  # a private key no slot names
    CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, clock).initialize()
    kept = sorted(p.name.split(".", 1)[1] for p in keystore.directory.iterdir())
    assert kept == ["pem", "pem", "slot.json", "slot.json"]  # two keys, each with its record


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ca_ttl": 10}, "ca_ttl: must be at least 60"),
        ({"jwt_key_ttl": 0}, "jwt_key_ttl: must be at least 60"),
        ({"key_type": "dsa"}, "key_type: must be one of"),
        ({"jwt_key_type": "ed25519"}, "jwt_key_type: must be one of"),
        ({"upstream_cert": Path("/x")}, "upstream_cert and upstream_key must be set together"),
        ({"refresh_hint": -1}, "refresh_hint"),
    ],
)
def test_bad_config_names_the_key(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CaConfigError, match=message):
        CaConfig(TRUST_DOMAIN, **kwargs)  # type: ignore[arg-type]


def test_config_accepts_a_trust_domain_string() -> None:
    assert CaConfig("example.org").trust_domain == TRUST_DOMAIN  # type: ignore[arg-type]


# -- upstream CA ---------------------------------------------------------------------------------


def _ca_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    start: float,
    days: int,
    ca: bool = True,
    path_length: int | None = None,
    cert_sign: bool = True,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(start - 60))
        .not_valid_after(to_datetime(start + days * 86400))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, cert_sign, True, False, False),
            critical=True,
        )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def _write(
    tmp_path: Path, certs: list[x509.Certificate], key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = tmp_path / "upstream.pem", tmp_path / "upstream.key"
    cert_path.write_bytes(b"".join(c.public_bytes(PEM) for c in certs))
    key_path.write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _upstream_manager(
    tmp_path: Path, clock: FakeClock, cert_path: Path, key_path: Path, **kw: int
) -> tuple[CaManager, SqliteDataStore]:
    store = SqliteDataStore(tmp_path / "up.db", clock)
    config = CaConfig(TRUST_DOMAIN, upstream_cert=cert_path, upstream_key=key_path, **kw)  # type: ignore[arg-type]
    manager = CaManager(config, store, KeyStore(tmp_path / "upkeys"), clock)
    manager.initialize()
    return manager, store


def test_upstream_root_signs_our_intermediate(tmp_path: Path, clock: FakeClock) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Upstream Root", root_key, None, start=clock.now(), days=365)
    manager, store = _upstream_manager(tmp_path, clock, *_write(tmp_path, [root], root_key))
    chain = leaf_for(manager)
    leaf, intermediate = chain
    assert intermediate == manager.x509_signer().ca_certificate
    assert intermediate.issuer == root.subject
    assert check_leaf_profile(leaf) == WORKLOAD
    assert manager.bundle().x509_authorities == (root,)
    result = openssl_verify(tmp_path, leaf, [root], [intermediate], at=clock.now())
    assert result.returncode == 0, result.stderr
    # Without the intermediate the leaf does not chain: the chain really goes through it.
    assert openssl_verify(tmp_path, leaf, [root], at=clock.now()).returncode != 0
    store.close()


def test_upstream_intermediate_travels_with_every_svid(tmp_path: Path, clock: FakeClock) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Upstream Root", root_key, None, start=clock.now(), days=365)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _ca_cert("Upstream Intermediate", mid_key, (root, root_key), start=clock.now(), days=30)
    manager, store = _upstream_manager(tmp_path, clock, *_write(tmp_path, [mid, root], mid_key))
    leaf, ours, theirs = leaf_for(manager)
    assert ours.issuer == mid.subject
    assert theirs == mid
    assert manager.bundle().x509_authorities == (root,)
    result = openssl_verify(tmp_path, leaf, [root], [ours, theirs], at=clock.now())
    assert result.returncode == 0, result.stderr
    store.close()


def test_upstream_caps_our_ca_lifetime(tmp_path: Path, clock: FakeClock) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Short Root", root_key, None, start=clock.now(), days=1)
    manager, store = _upstream_manager(
        tmp_path, clock, *_write(tmp_path, [root], root_key), ca_ttl=7 * 86400
    )
    assert manager.x509_signer().ca_certificate.not_valid_after_utc == root.not_valid_after_utc
    store.close()


def test_upstream_chain_above_caps_our_ca_lifetime(tmp_path: Path, clock: FakeClock) -> None:
    # The root above the upstream intermediate expires first: a CA (and leaves) outliving it
    # chain to nothing, and rotation would not notice it coming.
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Short Root", root_key, None, start=clock.now(), days=1)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _ca_cert("Mid", mid_key, (root, root_key), start=clock.now(), days=30)
    manager, store = _upstream_manager(
        tmp_path, clock, *_write(tmp_path, [mid, root], mid_key), ca_ttl=7 * 86400
    )
    assert manager.x509_signer().ca_certificate.not_valid_after_utc == root.not_valid_after_utc
    leaf, *_ = leaf_for(manager, ttl=30 * 86400)
    assert leaf.not_valid_after_utc == root.not_valid_after_utc
    store.close()


def test_upstream_mode_rotation_keeps_the_x509_bundle(tmp_path: Path, clock: FakeClock) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Upstream Root", root_key, None, start=clock.now(), days=365)
    manager, store = _upstream_manager(tmp_path, clock, *_write(tmp_path, [root], root_key))
    first = manager.x509_signer().ca_certificate
    for _ in range(8):
        clock.set(manager.next_rotation_check())
        manager.rotate()
        assert manager.bundle().x509_authorities == (root,)
        leaf, intermediate = leaf_for(manager)
        assert (
            openssl_verify(tmp_path, leaf, [root], [intermediate], at=clock.now()).returncode == 0
        )
    assert manager.x509_signer().ca_certificate != first
    store.close()


def test_upstream_key_must_match_the_certificate(tmp_path: Path, clock: FakeClock) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Upstream Root", root_key, None, start=clock.now(), days=365)
    cert_path, key_path = _write(tmp_path, [root], ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CaConfigError, match="does not match the certificate"):
        _upstream_manager(tmp_path, clock, cert_path, key_path)


def test_upstream_key_of_an_unsupported_algorithm_is_a_config_error(
    tmp_path: Path, clock: FakeClock
) -> None:
    from tests.server.test_ca_keys import unsupported_key_pem

    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Upstream Root", root_key, None, start=clock.now(), days=365)
    cert_path, key_path = _write(tmp_path, [root], root_key)
    key_path.write_bytes(unsupported_key_pem())
    with pytest.raises(CaConfigError, match="not an unencrypted PEM private key"):
        _upstream_manager(tmp_path, clock, cert_path, key_path)


def test_upstream_must_be_a_ca(tmp_path: Path, clock: FakeClock) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _ca_cert("Not A CA", key, None, start=clock.now(), days=365, ca=False)
    with pytest.raises(CaConfigError, match="not a CA certificate"):
        _upstream_manager(tmp_path, clock, *_write(tmp_path, [leaf], key))


@pytest.mark.parametrize("root_path_length", [0, 1])
def test_upstream_chain_with_no_room_for_our_ca_is_refused(
    tmp_path: Path, clock: FakeClock, root_path_length: int
) -> None:
    # Our CA sits below every certificate of the upstream file: a pathLenConstraint that
    # leaves it no room makes every SVID fail path validation (OpenSSL: "path length
    # constraint exceeded"), so the configuration is refused rather than served.
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert(
        "Root", root_key, None, start=clock.now(), days=365, path_length=root_path_length
    )
    certs, key = [root], root_key
    if root_path_length == 1:  # root -> mid -> ours: two CAs below the root
        key = ec.generate_private_key(ec.SECP256R1())
        certs = [_ca_cert("Mid", key, (root, root_key), start=clock.now(), days=30), root]
    with pytest.raises(CaConfigError, match="pathLenConstraint"):
        _upstream_manager(tmp_path, clock, *_write(tmp_path, certs, key))


def test_upstream_chain_with_room_for_our_ca_is_accepted(tmp_path: Path, clock: FakeClock) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Root", root_key, None, start=clock.now(), days=365, path_length=2)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _ca_cert("Mid", mid_key, (root, root_key), start=clock.now(), days=30, path_length=1)
    manager, store = _upstream_manager(tmp_path, clock, *_write(tmp_path, [mid, root], mid_key))
    leaf, ours, theirs = leaf_for(manager)
    result = openssl_verify(tmp_path, leaf, [root], [ours, theirs], at=clock.now())
    assert result.returncode == 0, result.stderr
    store.close()


def test_upstream_without_cert_sign_usage_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("No Cert Sign", key, None, start=clock.now(), days=365, cert_sign=False)
    with pytest.raises(CaConfigError, match="keyCertSign"):
        _upstream_manager(tmp_path, clock, *_write(tmp_path, [root], key))


def test_expired_upstream_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("Old Root", root_key, None, start=clock.now() - 10 * 86400, days=1)
    with pytest.raises(CaConfigError, match="expired"):
        _upstream_manager(tmp_path, clock, *_write(tmp_path, [root], root_key))


@pytest.mark.parametrize(
    ("cert_bytes", "key_bytes", "message"),
    [
        (None, b"", "upstream_ca_cert: cannot read"),
        (b"not pem", b"", "upstream_ca_cert: .* holds no PEM certificate"),
        (b"CERT", b"garbage", "upstream_ca_key: .* not an unencrypted PEM private key"),
    ],
)
def test_unreadable_upstream_files(
    tmp_path: Path, clock: FakeClock, cert_bytes: bytes | None, key_bytes: bytes, message: str
) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    cert_path, key_path = _write(
        tmp_path, [_ca_cert("Root", root_key, None, start=clock.now(), days=365)], root_key
    )
    if cert_bytes is None:
        cert_path.unlink()
    elif cert_bytes != b"CERT":
        cert_path.write_bytes(cert_bytes)
    if key_bytes:
        key_path.write_bytes(key_bytes)
    with pytest.raises(CaConfigError, match=message):
        _upstream_manager(tmp_path, clock, cert_path, key_path)


def test_a_server_refuses_an_upstream_ca_key_file_others_can_read(tmp_path: Path) -> None:
    """The upstream CA's key signs the trust domain's CA: a file of it that every local user
    can read is refused at start-up, as a key-encryption key file or a join token file is,
    naming the file and its mode, rather than used."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    # The server's clock is the wall clock's, a little behind.
    root = _ca_cert("Upstream Root", root_key, None, start=time.time() - 3600, days=365)
    cert_path, key_path = _write(tmp_path, [root], root_key)
    os.chmod(key_path, 0o644)
    with (
        pytest.raises(CaConfigError, match=r"upstream.*mode 0644"),
        managed_server(upstream_ca_cert=str(cert_path), upstream_ca_key=str(key_path)),
    ):
        pass
