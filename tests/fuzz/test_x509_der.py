"""Fuzz targets: the DER certificate readers, the X.509-SVID parsers and the X.509 verifier.

Property: on arbitrary bytes and on real certificates with a few bytes mutated, each reader returns
a value or raises its documented error (SvidParseError / X509SvidError / BundleError /
VerificationError), and never hangs. Where the project claims equivalence, the answers agree: the
fast reader and the leaf templates equal parse_cert, and what the verifier accepts cryptography
loads.
"""

from __future__ import annotations

import base64
import contextlib
import warnings
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given
from hypothesis import strategies as st

from svid import (
    BundleError,
    FakeClock,
    MemoryBundleSource,
    RevocationSet,
    SpiffeBundle,
    TrustDomain,
    VerificationError,
    X509Bundle,
    X509Svid,
    X509SvidError,
    X509Verifier,
    check_leaf_profile,
    check_signing_profile,
    load_pem_certs,
    parse_der_certs,
    revoked_from_crls,
    spiffe_id_from_cert,
)
from svid import _cert_der as der
from svid._der import tbs_names
from svid._errors import SvidParseError
from svid._verify_x509 import _dotted
from tests.fuzz._mutate import mutated_bytes
from tests.fuzz._profile import fuzz_settings
from tests.svid.certs import T0, make_ca, make_leaf, rsa_key, ts

TD = TrustDomain("example.org")
DER = serialization.Encoding.DER


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(DER)


CA = make_ca(not_before=T0 - 3600, not_after=T0 + 86400)
INTERMEDIATE = make_ca(parent=CA, spiffe_id=None, not_before=T0 - 3600, not_after=T0 + 86000)
_RSA_CA = make_ca(key=rsa_key(), not_before=T0 - 3600, not_after=T0 + 86400)
_SKID_LEAF = make_leaf(CA, subject_key_id=True)
LEAVES = [
    _der(make_leaf(CA).cert),
    _der(_SKID_LEAF.cert),
    _der(make_leaf(CA, uris=["spiffe://example.org/" + "p" * 200], subject_key_id=True).cert),
    _der(make_leaf(CA, dns=["a.example"]).cert),
    _der(make_leaf(CA, subject="w", san_critical=True).cert),
    _der(make_leaf(CA, not_after=2_600_000_000).cert),  # GeneralizedTime
    _der(make_leaf(CA, serial=0x80).cert),
    _der(make_leaf(_RSA_CA).cert),
    _der(make_leaf(INTERMEDIATE).cert),
]
CERTS = [*LEAVES, _der(CA.cert), _der(INTERMEDIATE.cert), _der(_RSA_CA.cert)]
CHAINS = [
    LEAVES[0],
    LEAVES[1],
    LEAVES[8] + _der(INTERMEDIATE.cert),
    LEAVES[0] + _der(CA.cert),
]
certificates = st.one_of(mutated_bytes(CERTS), st.binary(max_size=300))
chains = st.one_of(mutated_bytes(CHAINS), mutated_bytes(CERTS), st.binary(max_size=300))


def _parse(data: bytes) -> der.CertFacts | None:
    try:
        return der.parse_cert(data)
    except SvidParseError:
        return None


def _load(data: bytes) -> x509.Certificate | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return x509.load_der_x509_certificate(data)
        except (ValueError, x509.InvalidVersion):
            return None


@fuzz_settings()
@given(certificates)
def test_parse_cert_and_the_fast_reader(data: bytes) -> None:
    facts = _parse(data)
    fast = der.parse_cert_fast(data)
    assert fast is None or fast == facts  # never more lenient, never different
    if facts is not None:
        der.key_identifiers_ok(facts.extensions)  # a bool, whatever the values hold
        assert tbs_names(facts.tbs) == (facts.issuer, facts.subject)


_KU_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def _profile_value(oid: bytes, value: bytes) -> object:
    """An extension the profile reads, as the DER reader reads it (comparable with _theirs)."""
    if oid == der.OID_BASIC_CONSTRAINTS:
        return der.basic_constraints(value)
    if oid == der.OID_KEY_USAGE:
        bits = der.key_usage_bits(value)
        return tuple(bool(bits & (0x8000 >> i)) for i in range(len(_KU_BITS)))
    if oid == der.OID_EXT_KEY_USAGE:
        return {_dotted(purpose) for purpose in der.ext_key_usages(value)}
    return der.san_uris(value)


def _theirs(value: x509.ExtensionType) -> object:
    if isinstance(value, x509.BasicConstraints):
        return value.ca, value.path_length
    if isinstance(value, x509.KeyUsage):
        return tuple(getattr(value, name) for name in _KU_BITS)
    if isinstance(value, x509.ExtendedKeyUsage):
        return {purpose.dotted_string for purpose in value}
    assert isinstance(value, x509.SubjectAlternativeName)
    return value.get_values_for_type(x509.UniformResourceIdentifier)


def _public_numbers(load: Callable[[], object]) -> object:
    try:
        return load().public_numbers()  # type: ignore[attr-defined]
    except (ValueError, UnsupportedAlgorithm):
        return None


@fuzz_settings()
@given(st.one_of(certificates, mutated_bytes(LEAVES[:5], max_edits=2)))
def test_parse_cert_reads_what_cryptography_reads(data: bytes) -> None:
    """Differential against cryptography: on every certificate both accept, the DER reader (and
    so the verifier, which takes the leaf's profile, names, times, serial and signed bytes from
    it) reads the same values. It may refuse more; it must never read differently."""
    facts = _parse(data)
    cert = _load(data)
    if facts is None or cert is None:
        return
    assert facts.tbs == cert.tbs_certificate_bytes
    assert facts.serial == cert.serial_number
    assert facts.not_before == cert.not_valid_before_utc.timestamp()
    assert facts.not_after == cert.not_valid_after_utc.timestamp()
    assert facts.signature == cert.signature
    _, start, end = der.read_tlv(facts.signature_algorithm, 2, len(facts.signature_algorithm))
    assert (
        _dotted(facts.signature_algorithm[start:end]) == cert.signature_algorithm_oid.dotted_string
    )
    with contextlib.suppress(ValueError):  # a Name cryptography cannot read: compared as bytes
        assert facts.issuer == cert.issuer.public_bytes()
    with contextlib.suppress(ValueError):
        assert facts.subject == cert.subject.public_bytes()
    # The same key (cryptography may normalize its encoding: a hybrid EC point, say).
    spki = facts.spki
    assert _public_numbers(lambda: serialization.load_der_public_key(spki)) == _public_numbers(
        cert.public_key
    )
    try:
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return  # the verifier asks cryptography for these and refuses the certificate
    assert {_dotted(oid): ext.critical for oid, ext in facts.extensions.items()} == {
        ext.oid.dotted_string: ext.critical for ext in extensions
    }
    for ext in extensions:
        if type(ext.value) not in _PROFILE_TYPES:
            continue
        oid = next(o for o in facts.extensions if _dotted(o) == ext.oid.dotted_string)
        try:
            ours = _profile_value(oid, facts.extensions[oid].value)
        except der.NonUriSanError:
            continue  # other GeneralNames: the profile check asks cryptography then
        except SvidParseError:
            continue  # stricter than cryptography: the leaf is refused
        assert ours == _theirs(ext.value)


_PROFILE_TYPES = (
    x509.BasicConstraints,
    x509.KeyUsage,
    x509.ExtendedKeyUsage,
    x509.SubjectAlternativeName,
)


@fuzz_settings()
@given(mutated_bytes([LEAVES[1], LEAVES[2]]))
def test_leaf_templates_match_only_as_parse_cert_reads(data: bytes) -> None:
    for source in (LEAVES[1], LEAVES[2]):
        template = der.leaf_template(source, der.parse_cert(source))
        assert template is not None
        if der.template_key(data) != template.key:
            continue  # the verifier looks templates up by this key: only these are tried
        matched = der.match_leaf(data, template)
        if matched is not None:
            facts, end = matched
            assert facts == der.parse_cert(data[:end])
            assert _load(data[:end]) is not None


_EXTENSION_VALUES = [
    ext.value for cert in CERTS for ext in der.parse_cert(cert).extensions.values()
]


@fuzz_settings()
@given(st.one_of(mutated_bytes(_EXTENSION_VALUES), st.binary(max_size=40)))
def test_extension_value_readers(value: bytes) -> None:
    for read in (der.basic_constraints, der.key_usage_bits, der.ext_key_usages, der.san_uris):
        with contextlib.suppress(SvidParseError):
            read(value)
    der.valid_oid(value)
    for oid in (der.OID_SUBJECT_KEY_ID, der.OID_AUTHORITY_KEY_ID):
        assert der.key_identifiers_ok({oid: der.Extension(False, value)}) in (True, False)


@fuzz_settings()
@given(chains)
def test_split_and_parse_der_certs(data: bytes) -> None:
    try:
        parts = der.split_certs(data)
    except SvidParseError:
        parts = None
    try:
        certs = parse_der_certs(data)
    except SvidParseError:
        return
    # What the Workload API parser accepts, the verifier's framing splits the same way.
    assert parts is not None
    assert [_der(c) for c in certs] == parts
    for cert in certs:
        tbs_names(cert.tbs_certificate_bytes)


@fuzz_settings()
@given(st.one_of(mutated_bytes([LEAVES[0], LEAVES[3], LEAVES[4], CERTS[-3]]), certificates))
def test_profile_checks_of_loaded_certificates(data: bytes) -> None:
    cert = _load(data)
    if cert is None:
        return
    for check in (check_leaf_profile, spiffe_id_from_cert, check_signing_profile):
        with contextlib.suppress(X509SvidError, SvidParseError):
            check(cert)


_KEY_DER = _SKID_LEAF.key.private_bytes(
    DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)


@fuzz_settings()
@given(
    st.one_of(chains, st.just(LEAVES[1])), st.one_of(mutated_bytes([_KEY_DER]), st.just(_KEY_DER))
)
def test_x509_svid_parse(chain: bytes, key: bytes) -> None:
    # Its documented errors; anything else (another SvidError included) fails the test.
    with contextlib.suppress(SvidParseError, X509SvidError):
        X509Svid.parse(chain, key)


_PEM = b"".join(x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
                for c in CERTS[-3:])  # fmt: skip


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


@fuzz_settings()
@given(st.one_of(mutated_bytes([_PEM], max_edits=6), mutated_bytes(CERTS).map(_pem), chains))
def test_bundle_certificates(data: bytes) -> None:
    with contextlib.suppress(SvidParseError):
        load_pem_certs(data)
    for parse in (X509Bundle.parse_der, X509Bundle.parse_pem):
        with contextlib.suppress(BundleError):
            parse(TD, data)


def _verifier(revocations: RevocationSet | None = None) -> X509Verifier:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (CA.cert, _RSA_CA.cert)))
    return X509Verifier(
        source.x509_bundle_for, clock=FakeClock(T0), revocations=revocations, cache_size=0
    )


_WARM = _verifier()
for _leaf in LEAVES[:3]:
    _WARM.verify_der(_leaf)  # leaf templates learnt: mutated leaves take the template path


def _verdict(verifier: X509Verifier, data: bytes) -> tuple[str, object]:
    try:
        result = verifier.verify_der(data)
    except VerificationError as exc:
        return type(exc).__name__, str(exc)
    return "ok", (result.spiffe_id, result.serial, result.expires_at, result.chain)


@fuzz_settings()
@given(chains)
def test_x509_verifier(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        general = _verdict(_verifier(), data)
        assert _verdict(_WARM, data) == general
    if general[0] == "ok":
        # Accepted: the chain (leaf first; an anchor sent along is left out) is certificates
        # cryptography loads, each exactly the bytes that were sent.
        chain = [_der(c) for c in general[1][3]]  # type: ignore[index]
        assert chain == der.split_certs(data)[: len(chain)]


@fuzz_settings()
@given(st.lists(mutated_bytes([_der(CA.cert), _der(_RSA_CA.cert)]), min_size=1, max_size=2))
def test_x509_verifier_and_crls_with_mutated_authorities(authorities: list[bytes]) -> None:
    """Bundles are outside bytes too: authorities cryptography loads but that are malformed."""
    certs = tuple(c for c in map(_load, authorities) if c is not None)
    source = MemoryBundleSource.of(SpiffeBundle(TD, certs))
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), cache_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(VerificationError):
            verifier.verify_der(LEAVES[0])
        revoked_from_crls([_CRL], {TD: X509Bundle(TD, certs)})


_CRL = (
    x509.CertificateRevocationListBuilder()
    .issuer_name(CA.cert.subject)
    .last_update(ts(T0 - 60))
    .next_update(ts(T0 + 3600))
    .add_revoked_certificate(
        x509.RevokedCertificateBuilder().serial_number(0x1234).revocation_date(ts(T0 - 60)).build()
    )
    .sign(CA.key, hashes.SHA256())
    .public_bytes(DER)
)


@fuzz_settings()
@given(
    st.lists(st.one_of(mutated_bytes([_CRL]), st.just(_CRL), st.binary(max_size=100)), max_size=3)
)
def test_crls(crls: list[bytes]) -> None:
    bundles = {TD: X509Bundle(TD, (CA.cert,))}
    result = revoked_from_crls(crls, bundles)
    if _CRL in crls:
        assert any(r.value == "1234" for r in result.revoked)
