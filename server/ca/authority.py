"""CA certificates: a self-signed root per key, or an intermediate under an upstream CA on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from server.ca.errors import CaConfigError
from server.ca.keys import PrivateKey, PublicKey, signature_hash, spki_der
from svid._clock import to_datetime
from svid._secret_file import SecretFile, read_owner_only
from svid._spiffe_id import TrustDomain

BACKDATE_SECONDS = 10
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)

_UPSTREAM_KEY_FILE = SecretFile(
    setting="upstream_ca_key",
    owner="this server's user",
    max_bytes=64 * 1024,  # an RSA-16384 PKCS#8 PEM is under 13 KiB
    missing="cannot read {path}: {reason}",
)


@dataclass(frozen=True, slots=True)
class UpstreamCa:
    """An upstream CA read from disk: the certificate that signs ours, its key, and the chain
    above it. `root` goes in the bundle; `intermediates` travel with every SVID."""

    cert: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...]
    root: x509.Certificate


def _subject(trust_domain: TrustDomain, slot_id: str) -> x509.Name:
    # The slot id keeps subjects unique across rotations, so path building never has to guess.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} CA"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, slot_id),
        ]
    )


def build_ca_certificate(
    trust_domain: TrustDomain,
    slot_id: str,
    key: PrivateKey,
    *,
    now: int,
    ttl: int,
    upstream: UpstreamCa | None = None,
) -> x509.Certificate:
    """A signing certificate for `key`: self-signed, or signed by `upstream` (capped at the
    earliest NotAfter of its chain). Carries the trust domain's ID (no path) as its one URI
    SAN."""
    public_key: PublicKey = key.public_key()
    not_after = now + ttl
    if upstream is None:
        issuer_name = _subject(trust_domain, slot_id)
        signing_key: PrivateKey = key
        akid = x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    else:
        issuer_name = upstream.cert.subject
        signing_key = upstream.key
        akid = _akid_for(upstream.cert)
        # Up to the root: a CA outliving any certificate above it chains to nothing then.
        above = (upstream.cert, *upstream.intermediates, upstream.root)
        not_after = min(not_after, *(int(c.not_valid_after_utc.timestamp()) for c in above))
    if not_after <= now:
        raise CaConfigError(
            "the upstream CA certificate, or one above it, has expired: cannot sign a CA under it"
        )
    return (
        x509.CertificateBuilder()
        .subject_name(_subject(trust_domain, slot_id))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(now - BACKDATE_SECONDS))
        .not_valid_after(to_datetime(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(akid, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]),
            critical=False,
        )
        .sign(signing_key, signature_hash(signing_key))
    )


def _akid_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def load_upstream(cert_path: Path, key_path: Path) -> UpstreamCa:
    """Read the upstream CA: `cert_path` holds its certificate first, then optionally the chain
    up to the root; `key_path` its unencrypted private key (PEM), in a file of this server's
    user that no one else can read (the key signs the trust domain's CAs)."""
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except OSError as exc:
        raise CaConfigError(f"upstream_ca_cert: cannot read {cert_path}: {exc.strerror}") from None
    except ValueError:
        raise CaConfigError(f"upstream_ca_cert: {cert_path} holds no PEM certificate") from None
    pem = read_owner_only(key_path, _UPSTREAM_KEY_FILE, CaConfigError)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # the last: an unknown key type
        raise CaConfigError(
            f"upstream_ca_key: {key_path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaConfigError(f"upstream_ca_key: {key_path} must be an EC or RSA key")
    cert = certs[0]
    if spki_der(key.public_key()) != spki_der(cert.public_key()):  # type: ignore[arg-type]
        raise CaConfigError(
            f"upstream_ca_key: {key_path} does not match the certificate in {cert_path}"
        )
    _check_room_below(certs, cert_path)
    root = certs[-1]
    intermediates = tuple(certs[:-1]) if len(certs) > 1 else ()
    if len(certs) == 1 and cert.issuer != cert.subject:
        # No root in the file: the upstream CA itself becomes the trust anchor.
        root = cert
    return UpstreamCa(cert=cert, key=key, intermediates=intermediates, root=root)


def _check_room_below(certs: list[x509.Certificate], cert_path: Path) -> None:
    """Each upstream certificate signs the one before it, the first signs our CA: each must be
    a CA allowed to sign certificates, with a pathLenConstraint that leaves room for every CA
    below it (ours included). Verifiers refuse the SVIDs of a chain that breaks either, so such
    a file is a configuration error, not a CA to serve."""
    for index, cert in enumerate(certs):
        subject = cert.subject.rfc4514_string()
        what = f"upstream_ca_cert: {cert_path}: certificate {index + 1} ({subject})"
        try:
            basic: x509.BasicConstraints | None = cert.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.ca:
            raise CaConfigError(f"{what} is not a CA certificate (cA=false)")
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise CaConfigError(f"{what} has no keyCertSign key usage: it cannot sign a CA")
        # RFC 5280 §4.2.1.9: self-issued certificates below do not count.
        below = 1 + sum(1 for c in certs[:index] if c.issuer != c.subject)
        if basic.path_length is not None and basic.path_length < below:
            raise CaConfigError(
                f"{what} has pathLenConstraint {basic.path_length}, but {below} CA "
                f"certificate(s) would sit below it (the upstream chain and svidd's own CA)"
            )
