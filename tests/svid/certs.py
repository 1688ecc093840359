"""Test certificate factory: CAs and leaves with a knob for every SPIFFE profile rule.

Other test packages may import it: ``from tests.svid.certs import make_ca, make_leaf``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

T0 = 1_700_000_000.0


def ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


_RSA_CACHE: list[rsa.RSAPrivateKey] = []


def rsa_key() -> rsa.RSAPrivateKey:
    """A 2048-bit RSA key; generation is slow, so tests share a couple."""
    if len(_RSA_CACHE) < 2:
        _RSA_CACHE.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        return _RSA_CACHE[-1]
    _RSA_CACHE.reverse()
    return _RSA_CACHE[0]


def slow_rsa_key(e: int | None = None) -> rsa.RSAPrivateKey:
    """A valid 2048-bit RSA key whose public exponent is ``e``, by default one as long as its
    modulus (each signature check then costs ~100x a usual key's): what a hostile bundle
    could publish. ``e`` must be odd and coprime to the modulus's lambda."""
    base = rsa_key().private_numbers()
    p, q, n = base.p, base.q, base.public_numbers.n
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    if e is None:
        e = (n - 2) | 1
        while math.gcd(e, lam) != 1:
            e -= 2
    d = pow(e, -1, lam)
    return rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, n),
    ).private_key()


@dataclass
class Issued:
    cert: x509.Certificate
    key: Key


@dataclass
class LeafOptions:
    """Every field is a profile knob; the defaults give a valid SPIRE-like leaf."""

    uris: list[str] = field(default_factory=lambda: ["spiffe://example.org/workload"])
    dns: list[str] = field(default_factory=list)
    ca: bool = False
    basic_constraints: bool = True
    key_usage: bool = True
    key_usage_critical: bool = True
    digital_signature: bool = True
    key_cert_sign: bool = False
    crl_sign: bool = False
    eku: list[x509.ObjectIdentifier] | None = field(
        default_factory=lambda: [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    subject: str | None = None
    san_critical: bool = False
    not_before: float = T0 - 10
    not_after: float = T0 + 3600
    serial: int | None = None
    subject_key_id: bool = False  # SPIRE-made leaves carry one (a hash of their own key)


def make_ca(
    name: str = "example.org",
    *,
    parent: Issued | None = None,
    key: Key | None = None,
    not_before: float = T0 - 3600,
    not_after: float = T0 + 86400,
    spiffe_id: str | None = "default",
    path_length: int | None = None,
    key_cert_sign: bool = True,
    ca: bool = True,
) -> Issued:
    """A CA cert: self-signed, or signed by ``parent`` (an intermediate)."""
    key = key or ec_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"CA {name}")])
    issuer = parent.cert.subject if parent else subject
    signer = parent.key if parent else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ts(not_before))
        .not_valid_after(ts(not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if parent:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    sid = f"spiffe://{name}" if spiffe_id == "default" else spiffe_id
    if sid:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), critical=False
        )
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def _random_serial() -> int:
    # Random, with its top bit (of 159) set: always 20 bytes in DER. One serial in 256 drawn
    # plainly is shorter, and tests that compare a leaf's shape with another's (the verifier's
    # fast-path templates) then failed at random.
    return x509.random_serial_number() | (1 << 158)


def make_leaf(
    issuer: Issued,
    opts: LeafOptions | None = None,
    *,
    key: Key | None = None,
    **overrides: object,
) -> Issued:
    """A leaf signed by ``issuer``; pass LeafOptions fields as keywords to break one rule."""
    o = opts or LeafOptions()
    for name, value in overrides.items():
        if not hasattr(o, name):
            raise TypeError(f"unknown leaf option {name}")
        setattr(o, name, value)
    key = key or ec_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, o.subject)] if o.subject else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(o.serial or _random_serial())
        .not_valid_before(ts(o.not_before))
        .not_valid_after(ts(o.not_after))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if o.basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=o.ca, path_length=None), True)
    if o.key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=o.digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=o.key_cert_sign,
                crl_sign=o.crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=o.key_usage_critical,
        )
    if o.eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(o.eku), critical=False)
    if o.subject_key_id:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in o.uris]
    names += [x509.DNSName(d) for d in o.dns]
    if names:
        # An empty subject forces a critical SAN (RFC 5280 §4.2.1.6) unless a test says otherwise.
        critical = o.san_critical or (not o.subject and not _explicit_noncritical(overrides))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=critical)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key)


def _explicit_noncritical(overrides: dict[str, object]) -> bool:
    return overrides.get("san_critical") is False


def junk_cert(serial: int, size: int, *, now: float = T0) -> x509.Certificate:
    """A self-signed certificate of about ``size`` bytes, valid around ``now`` and in no bundle:
    what a peer may send after its path, which verification ignores."""
    key = ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"junk {serial}")])
    filler = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), bytes(size))
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(ts(now - 60))
        .not_valid_after(ts(now + 60))
        .add_extension(filler, critical=False)
        .sign(key, hashes.SHA256())
    )


def reissue(
    issued: Issued,
    signer: Issued,
    serial: int,
    *,
    not_before: float | None = None,
    not_after: float | None = None,
    issuer: x509.Name | None = None,
    critical: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """``issued``'s subject, key and extensions again, then ``critical`` as critical extensions,
    signed by ``signer``'s key; valid as ``issued`` is unless told, naming ``signer`` as its
    issuer unless ``issuer`` is given."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(issued.cert.subject)
        .issuer_name(issuer or signer.cert.subject)
        .public_key(issued.key.public_key())
        .serial_number(serial)
        .not_valid_before(
            issued.cert.not_valid_before_utc if not_before is None else ts(not_before)
        )
        .not_valid_after(issued.cert.not_valid_after_utc if not_after is None else ts(not_after))
    )
    for ext in issued.cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    for value in critical:
        builder = builder.add_extension(value, critical=True)
    return builder.sign(signer.key, hashes.SHA256())
