"""Raw crypto on 1 and on N cores: the physical limit multi-core issuance is compared with.

Issuance signs on several threads (X.509) or worker processes (JWT batches), so a baseline on one
thread flatters it by up to N times. `Cores` keeps N worker processes (spawned, so no gRPC or
server state is forked) that run a named raw operation for a window and report how many they
did; the rate on N cores is the sum over the workers. The rate on 1 core runs in one of the same
workers while the others wait, so both baselines pay the same process and interpreter costs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

ES256 = "es256"  # ES256 signature over a JWT-sized signing input
P256_TBS = "p256-tbs"  # ECDSA P-256 / SHA-256 over an SVID-sized TBSCertificate
# What issuing from a CSR cannot do without: check the CSR's signature, sign the TBS. P-256
# verification costs about twice a signature, so signing alone is no limit this work can reach.
P256_CSR_ISSUE = "p256-csr-issue"
# What a token exchange cannot do without: check the subject token's ES256 signature, sign the
# new token.
ES256_VERIFY_SIGN = "es256-verify-sign"
CERT_BUILDER = "cert-builder"  # cryptography's CertificateBuilder build + sign of an SVID leaf
TBS_BYTES = 445  # the TBSCertificate of a leaf svid-server issues for spiffe://example.org/bench/w0
CSR_INFO_BYTES = 180  # the CertificationRequestInfo of an agent's CSR for the same ID


JWT_SIGNING_INPUT = b"eyJhbGciOiJFUzI1NiJ9." + b"x" * 200


def _es256() -> Callable[[], object]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return lambda: key.sign(JWT_SIGNING_INPUT, ec.ECDSA(hashes.SHA256()))


def _es256_verify_sign() -> Callable[[], object]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    signature = key.sign(JWT_SIGNING_INPUT, ec.ECDSA(hashes.SHA256()))

    def exchange() -> bytes:
        public.verify(signature, JWT_SIGNING_INPUT, ec.ECDSA(hashes.SHA256()))
        return key.sign(JWT_SIGNING_INPUT, ec.ECDSA(hashes.SHA256()))

    return exchange


def _p256_tbs() -> Callable[[], object]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    tbs = b"\x30" * TBS_BYTES
    return lambda: key.sign(tbs, ec.ECDSA(hashes.SHA256()))


def _p256_csr_issue() -> Callable[[], object]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = ec.generate_private_key(ec.SECP256R1())
    workload_key = ec.generate_private_key(ec.SECP256R1())
    csr_info = b"\x30" * CSR_INFO_BYTES
    csr_sig = workload_key.sign(csr_info, ec.ECDSA(hashes.SHA256()))
    workload_public = workload_key.public_key()
    tbs = b"\x30" * TBS_BYTES

    def issue() -> bytes:
        workload_public.verify(csr_sig, csr_info, ec.ECDSA(hashes.SHA256()))
        return ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))

    return issue


def _cert_builder() -> Callable[[], object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    now = datetime.now(UTC)

    def build() -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(x509.Name([]))
            .public_key(leaf_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=10))
            .not_valid_after(now + timedelta(minutes=5))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier("spiffe://example.org/bench")]
                ),
                critical=True,
            )
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    return build


OPS: dict[str, Callable[[], Callable[[], object]]] = {
    ES256: _es256,
    ES256_VERIFY_SIGN: _es256_verify_sign,
    P256_TBS: _p256_tbs,
    P256_CSR_ISSUE: _p256_csr_issue,
    CERT_BUILDER: _cert_builder,
}


def _count(op: Callable[[], object], seconds: float) -> tuple[int, float]:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(5):
            op()
        count += 5
        now = time.perf_counter()
        if now >= deadline:
            return count, now - start


def _worker(conn: Connection) -> None:
    ops: dict[str, Callable[[], object]] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        name, seconds = msg
        if name not in ops:
            ops[name] = OPS[name]()
            _count(ops[name], 0.02)
        conn.send(_count(ops[name], seconds))


class Cores:
    """N worker processes that run raw operations for a window on request."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.n = n
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child,), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def rate(self, op: str, cores: int, seconds: float) -> float:
        """Operations per second on `cores` of the workers at once (the sum of their rates)."""
        if not 1 <= cores <= self.n:
            raise ValueError(f"cores must be 1..{self.n}, got {cores}")
        for conn in self._conns[:cores]:
            conn.send((op, seconds))
        total = 0.0
        for conn in self._conns[:cores]:
            count, elapsed = conn.recv()
            total += count / elapsed
        return total

    def window(self, op: str, cores: int, seconds: float) -> Callable[[], float]:
        """A window for `report.Rounds`; the first call per worker builds the op (a key)."""
        self.rate(op, cores, 0.01)
        return lambda: self.rate(op, cores, seconds)

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
