"""A real `svid-server run` put back from a `sqlite3 .backup` taken before its CA rotated: under
`run --restored-datastore` it signs on with the CA in use, so a TLS client holding the bundle
its agents held (the backup's CA and the one made since) still verifies it."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.conftest import make_restartable_server, short_tmpdir, wait_for

pytestmark = pytest.mark.timeout(300)
# The next CA is prepared at 1/2 of a CA's life and activated at 5/6: 50 s after the start.
CA_TTL = 60
SHORT = {
    "ca_ttl": CA_TTL,
    "jwt_key_ttl": CA_TTL,
    "default_x509_svid_ttl": 20,
    "default_jwt_svid_ttl": 20,
    "agent_svid_ttl": 20,
    # Renewed a second after it is signed (half its life, its 10 s of back-dating included):
    # the server signs on with the CA activated within a second, where at 20 s it waited up
    # to 5 s more for its next renewal.
    "server_svid_ttl": 12,
}


def _handshake(address: str, bundle_pem: str) -> x509.Certificate | str:
    """The certificate the server at `address` presents when it verifies against `bundle_pem`
    (as an agent's TLS checks it), or why it does not."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # a SPIFFE ID, not a host name, names the server
    ctx.load_verify_locations(cadata=bundle_pem)
    ctx.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    try:
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        return f"CERTIFICATE_VERIFY_FAILED: {exc.verify_message}"
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_server_restored_from_before_a_ca_rotation_is_still_trusted_by_its_agents() -> None:
    root = short_tmpdir()
    server = make_restartable_server(root, **SHORT)
    try:
        server.start()
        address = server.runtime["attest_address"]
        first_ca = x509.load_pem_x509_certificate(server.bundle_pem().encode()).subject
        datastore = server.data_dir / "datastore.sqlite3"
        copy = root / "backup.sqlite3"
        subprocess.run(["sqlite3", str(datastore), f".backup '{copy}'"], check=True, timeout=30)

        def rotated() -> x509.Name | None:
            presented = _handshake(address, server.bundle_pem())
            if isinstance(presented, x509.Certificate) and presented.issuer != first_ca:
                return presented.issuer
            return None

        # Polled twice a second, not twenty times: each poll is a TLS handshake with the
        # server, for the ~50 s it takes, on a machine whose other tests need the CPU.
        in_use = wait_for(
            rotated, 2 * CA_TTL, "the server's SVID from the CA made after the backup", 0.5
        )
        held = server.bundle_pem()  # what the agents hold: both CAs, pushed at the prepare
        assert server.stop() == 0
        for suffix in ("", "-wal", "-shm"):
            Path(f"{datastore}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(copy, datastore)

        # Nothing is audited between the backup and the stop here (no agent, no admin write):
        # the audit log lacks nothing, so no --restored-datastore (refused where nothing is
        # lacking); the keys are taken back whatever the flag.
        server.start()
        presented = _handshake(server.runtime["attest_address"], held)
        assert isinstance(presented, x509.Certificate), presented
        # Signed by the CA in use: the backup's is past its rotation, and its successor waits
        # no longer than one tick (a new one, which the agents never got, before this fix).
        assert presented.issuer == in_use
        assert "taken back from its files" in server.logs()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
