"""X.509-SVID batches in signing worker processes: real child processes, real CA keys, leaves
checked by signature and against CertificateBuilder (the library path) byte for byte."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from server.ca import workers as workers_module
from server.ca.errors import CaUnavailableError, CsrError, SigningRequestError
from server.ca.keys import KEY_TYPES, generate_key, signature_hash
from server.ca.signer import IssuedSvid, LeafFields, X509Request, X509Signer
from server.ca.workers import MIN_BATCH, SigningWorkers
from svid._clock import FakeClock
from svid._errors import SvidError
from svid._spiffe_id import SpiffeId
from svid._x509 import check_leaf_profile
from tests.server.fixtures import make_csr
from tests.server.test_jwt_workers import _claims, _requests, _signer, _wait_gone

NOW = 1_800_000_000
CA_LIFE = 3600
TD = "example.org"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca_cert(key: Any, subject: str, issuer: str, issuer_key: Any) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.fromtimestamp(NOW - 60, UTC))
        .not_valid_after(datetime.fromtimestamp(NOW + CA_LIFE, UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TD}")]),
            critical=False,
        )
        .sign(issuer_key, signature_hash(issuer_key))
    )


@pytest.fixture
def signer(clock: FakeClock) -> X509Signer:
    """An intermediate under a root, so every chain carries the CA certificate after the leaf."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    _ca_cert(root_key, "root", "root", root_key)
    return X509Signer(_ca_cert(key, "ca", "root", root_key), key, (), clock)


def _request(i: int, csr: bytes | None = None, path: str = "/w") -> X509Request:
    dns = (f"w{i}.example.org",) if i % 2 else ()
    return (csr or make_csr()[1], SpiffeId.parse(f"spiffe://{TD}{path}/{i}"), 300, dns)


def _in_worker_only(
    monkeypatch: pytest.MonkeyPatch, pool: SigningWorkers, signer: X509Signer, reqs: list[Any]
) -> list[IssuedSvid | SvidError]:
    """Issue with this process's X509Signer.issue_csr broken: only a worker can have signed."""

    def broken(*args: object, **kwargs: object) -> IssuedSvid:
        raise AssertionError("signed in the server process")

    with monkeypatch.context() as patch:
        patch.setattr(X509Signer, "issue_csr", broken)
        return pool.issue_x509(signer, reqs)


def _check(svid: IssuedSvid | SvidError, signer: X509Signer, request: X509Request) -> None:
    """The leaf verifies under the CA, follows the SPIFFE profile, and is byte for byte the TBS
    CertificateBuilder makes from the same fields (the library path, the oracle)."""
    assert isinstance(svid, IssuedSvid), svid
    leaf = svid.certificate
    ca = signer.ca_certificate
    leaf.verify_directly_issued_by(ca)
    assert svid.chain_der == svid.leaf_der + b"".join(
        c.public_bytes(Encoding.DER) for c in signer.chain
    )
    csr_der, spiffe_id, ttl, dns = request
    assert check_leaf_profile(leaf) == spiffe_id
    assert leaf.public_key() == x509.load_der_x509_csr(csr_der).public_key()
    assert leaf.serial_number == svid.serial
    assert svid.expires_at == NOW + ttl
    fields = LeafFields(
        x509.load_der_x509_csr(csr_der).public_key(),  # type: ignore[arg-type]
        spiffe_id,
        dns,
        svid.serial,
        int(leaf.not_valid_before_utc.timestamp()),
        int(leaf.not_valid_after_utc.timestamp()),
    )
    assert leaf.tbs_certificate_bytes == signer.builder_leaf(fields).tbs_certificate_bytes


def test_a_worker_issues_leaves_equal_to_the_library_paths_that_verify(
    workers: SigningWorkers, signer: X509Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert signer.chain  # an intermediate: the server adds it after the worker's leaf
    requests = [_request(i) for i in range(20)]
    out = _in_worker_only(monkeypatch, workers, signer, requests)
    assert len(out) == 20
    for svid, request in zip(out, requests, strict=True):
        _check(svid, signer, request)
    assert len({s.serial for s in out if isinstance(s, IssuedSvid)}) == 20


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_every_ca_key_type_is_handed_over_and_signs_as_the_library_path_does(
    workers: SigningWorkers, clock: FakeClock, key_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_key(key_type)
    signer = X509Signer(_ca_cert(key, "ca", "ca", key), key, (), clock)  # a root: no chain
    requests = [_request(i) for i in range(MIN_BATCH)]
    out = _in_worker_only(monkeypatch, workers, signer, requests)
    for svid, request in zip(out, requests, strict=True):
        _check(svid, signer, request)


def test_per_item_errors_come_back_in_order(
    workers: SigningWorkers, signer: X509Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [_request(i) for i in range(12)]
    good = make_csr()[1]
    tampered = good[:-8] + bytes(b ^ 0xFF for b in good[-8:])
    requests[3] = _request(3, csr=b"garbage")
    requests[5] = _request(5, csr=tampered)
    requests[7] = (make_csr()[1], SpiffeId.parse("spiffe://other.org/w"), 300, ())
    requests[9] = (make_csr()[1], SpiffeId.parse(f"spiffe://{TD}/w"), 300, ("bad name!",))
    out = _in_worker_only(monkeypatch, workers, signer, requests)
    assert isinstance(out[3], CsrError)
    assert isinstance(out[5], CsrError)
    assert isinstance(out[7], SigningRequestError)
    assert "trust domain" in str(out[7])
    assert isinstance(out[9], SigningRequestError)
    for i, (svid, request) in enumerate(zip(out, requests, strict=True)):
        if i not in {3, 5, 7, 9}:
            _check(svid, signer, request)


def test_an_expired_ca_fails_every_item_and_validity_comes_from_the_servers_now(
    workers: SigningWorkers, signer: X509Signer, clock: FakeClock
) -> None:
    clock.advance(CA_LIFE - 100)  # the worker has no clock: the server's now is the one used
    out = workers.issue_x509(signer, [_request(i) for i in range(MIN_BATCH)])
    for svid in out:
        assert isinstance(svid, IssuedSvid)
        assert svid.expires_at == NOW + CA_LIFE  # capped at the CA
        assert svid.certificate.not_valid_before_utc.timestamp() == NOW + CA_LIFE - 110
    clock.advance(100)
    out = workers.issue_x509(signer, [_request(i) for i in range(MIN_BATCH)])
    assert all(isinstance(e, CaUnavailableError) for e in out)
    assert "expired" in str(out[0])


def test_jwt_and_x509_batches_share_the_same_worker(
    workers: SigningWorkers, signer: X509Signer, clock: FakeClock
) -> None:
    (pid,) = workers.pids()
    jwt_signer = _signer(clock)
    for _ in range(2):
        assert all(_claims(j, jwt_signer) for j in workers.mint(jwt_signer, _requests(MIN_BATCH)))
        requests = [_request(i) for i in range(MIN_BATCH)]
        for svid, request in zip(workers.issue_x509(signer, requests), requests, strict=True):
            _check(svid, signer, request)
    assert workers.pids() == [pid]


def test_a_killed_worker_costs_speed_not_answers(
    workers: SigningWorkers, signer: X509Signer, caplog: pytest.LogCaptureFixture
) -> None:
    (first,) = workers.pids()
    os.kill(first, signal.SIGKILL)
    _wait_gone(first)
    requests = [_request(i) for i in range(MIN_BATCH)]
    out = workers.issue_x509(signer, requests)  # answered here, from this process
    for svid, request in zip(out, requests, strict=True):
        _check(svid, signer, request)
    assert "signing worker failed" in caplog.text
    assert workers.warm_up(30)
    (second,) = workers.pids()
    assert second != first
    for svid, request in zip(workers.issue_x509(signer, requests), requests, strict=True):
        _check(svid, signer, request)


def test_free_workers_share_a_big_batch_and_a_dead_ones_share_is_signed_here(
    clock: FakeClock, signer: X509Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = SigningWorkers(2, clock)
    here: list[int] = []
    in_server = X509Signer.issue_csr

    def counted(self: X509Signer, request: X509Request, now: int) -> IssuedSvid:
        here.append(1)
        return in_server(self, request, now)

    monkeypatch.setattr(X509Signer, "issue_csr", counted)
    try:
        assert pool.warm_up(30)
        requests = [_request(i) for i in range(2 * MIN_BATCH + 1)]
        for svid, request in zip(pool.issue_x509(signer, requests), requests, strict=True):
            _check(svid, signer, request)
        assert here == []
        first, second = pool.pids()
        os.kill(second, signal.SIGKILL)
        _wait_gone(second)
        out = pool.issue_x509(signer, requests)
        # Two shares (9 + 8 items): the live worker signed one, this process the dead one's.
        assert len(here) in {MIN_BATCH, MIN_BATCH + 1}
        for svid, request in zip(out, requests, strict=True):
            _check(svid, signer, request)
        assert pool.pids() == [first]
    finally:
        pool.close()


def test_a_wedged_worker_is_replaced_and_its_batch_signed_here(
    workers: SigningWorkers,
    signer: X509Signer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(workers_module, "REPLY_TIMEOUT", 0.5)
    (first,) = workers.pids()
    os.kill(first, signal.SIGSTOP)
    try:
        requests = [_request(i) for i in range(MIN_BATCH)]
        started = time.monotonic()
        out = workers.issue_x509(signer, requests)
        # Killed, not waited for: the batch is late by the reply timeout and no more.
        assert time.monotonic() - started < 4
        for svid, request in zip(out, requests, strict=True):
            _check(svid, signer, request)
        assert "signing worker failed (TimeoutError)" in caplog.text
        _wait_gone(first)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGCONT)
    assert workers.warm_up(30)
    assert workers.pids() != [first]


def test_small_batches_stay_in_the_server_and_start_no_worker(
    clock: FakeClock, signer: X509Signer
) -> None:
    pool = SigningWorkers(2, clock)
    try:
        requests = [_request(i) for i in range(MIN_BATCH - 1)]
        for svid, request in zip(pool.issue_x509(signer, requests), requests, strict=True):
            _check(svid, signer, request)
        assert pool.pids() == []
    finally:
        pool.close()


def test_close_ends_the_workers_and_later_batches_are_signed_here(
    clock: FakeClock, signer: X509Signer
) -> None:
    pool = SigningWorkers(2, clock)
    assert pool.warm_up(30)
    pids = pool.pids()
    assert len(pids) == 2
    pool.close()
    for pid in pids:
        _wait_gone(pid)
    requests = [_request(i) for i in range(MIN_BATCH)]
    for svid, request in zip(pool.issue_x509(signer, requests), requests, strict=True):
        _check(svid, signer, request)
    assert pool.pids() == []
