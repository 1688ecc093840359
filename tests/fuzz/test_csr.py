"""Fuzz targets: the server's CSR checks (every X.509-SVID request carries an agent's CSR).

Property: on arbitrary bytes and on real CSRs (EC, RSA, RSA-PSS, refused key types) with bytes
mutated, verify_csr and csr_public_key return or raise CsrError, never hang; what they accept is a
request cryptography loads with a valid self-signature and an allowed key; and the fast signature
check gives is_signature_valid's verdict (server/ca/signer.py promises the same verdict in every
case).
"""

from __future__ import annotations

import contextlib
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding
from hypothesis import given
from hypothesis import strategies as st

from server.ca.errors import CsrError
from server.ca.leaf_der import signature_algorithm_of
from server.ca.signer import check_public_key, csr_public_key, csr_signature_valid, verify_csr
from svid._errors import SvidParseError
from tests.fuzz._mutate import mutated_bytes
from tests.fuzz._profile import fuzz_settings
from tests.fuzz.test_x509_der import CERTS
from tests.svid.certs import rsa_key

DER = serialization.Encoding.DER


def _csr(key: object, algorithm: hashes.HashAlgorithm | None = None, **kwargs: object) -> bytes:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://e.org/w")]),
            critical=False,
        )
    )
    return builder.sign(key, algorithm, **kwargs).public_bytes(DER)  # type: ignore[arg-type]


_RSA = rsa_key()
CSRS = [
    _csr(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
    _csr(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
    _csr(_RSA, hashes.SHA256()),
    _csr(_RSA, hashes.SHA256(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), 32)),
    _csr(ec.generate_private_key(ec.SECP256K1()), hashes.SHA256()),  # refused curve
    _csr(ed25519.Ed25519PrivateKey.generate(), None),  # refused key type
]
csrs = st.one_of(mutated_bytes(CSRS), st.sampled_from(CSRS), st.binary(max_size=200))


@fuzz_settings()
@given(csrs)
def test_verify_csr(data: bytes) -> None:
    try:
        csr = verify_csr(data)
    except CsrError:
        accepted = False
    else:
        accepted = True
        assert csr.is_signature_valid
        check_public_key(csr.public_key())
        assert csr_public_key(data) == csr.public_key()
    if not accepted:
        try:
            csr_public_key(data)
        except CsrError:
            pass
        else:
            raise AssertionError("csr_public_key accepted what verify_csr refused")


def _reference(csr: x509.CertificateSigningRequest) -> bool | None:
    try:
        return csr.is_signature_valid
    except Exception:
        return None


@fuzz_settings()
@given(csrs)
def test_fast_csr_signature_check_is_is_signature_valid(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            csr = x509.load_der_x509_csr(data)
        except (ValueError, x509.InvalidVersion):
            return
    expected = _reference(csr)
    try:
        got: bool | None = csr_signature_valid(csr, data)
    except CsrError:
        got = None
    assert got == expected


@fuzz_settings()
@given(st.one_of(mutated_bytes(CERTS), st.binary(max_size=40)))
def test_signature_algorithm_of(data: bytes) -> None:
    with contextlib.suppress(SvidParseError, ValueError):
        signature_algorithm_of(data)
