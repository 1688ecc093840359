"""Taking back keys a restored datastore does not journal.

A lone server writes each new key's slot, as it journals it, to a public record beside the key
file, naming the slots of its kind the journal held then and their own lineage (the key's
lineage, newest first, bounded). A datastore put
back from a backup taken before a key was made lacks its slot; without it the server made a new
CA at once and every agent, trusting the lost one, failed TLS with it. With the record the slot
is journaled again: the key goes on as it would have.

What is taken back, and why no more: a key whose record is the server's own (key file and
record owned by it, writable by no one else), whose certificate (X.509) or public key (JWT)
matches the private key, an X.509 one signed by the configured upstream CA or by itself and
naming this trust domain; made after the datastore's newest slot of its kind, from the journal
the datastore holds (its lineage names a journaled slot, or a key taken back before it: the
keys of another datastore sharing this data_dir descend from none of its slots); and still
valid now; and endorsed: its record carries a chain of signatures, each by the key of its kind
active when the key it names was made, back to a key the journal holds (or one taken back
before it). The slot ids a lineage names are public (in every CA certificate): without the
chain, anyone who could put a key file and record owned by the server in its keys directory,
without reading its keys, had a self-signed CA or a JWT key of their own taken back. A
datastore with no slot of a kind takes none back: that is a new start
(`--new-datastore`), not a restore. The newest key taken back waits as the prepared one and the
schedule activates it when it would have been (at once, when the key before it is past its
rotation point), so the restore never makes a key of its own. One before it comes back active
while its successor's activation time is still to come, retired once past: as the schedule had
them, so a key retired after the backup is never made to sign again; retired, it stays in the
bundle until it expires for the SVIDs it signed, and signs only its CRLs.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from server.ca.authority import UpstreamCa
from server.ca.keys import PrivateKey, PublicKey, signature_hash, spki_der
from server.ca.rotation import activate_at
from server.datastore.records import ACTIVE, JWT_KIND, PREPARED, RETIRED, X509_KIND, KeySlot
from svid import MAX_CLOCK_SKEW
from svid._jose import public_key_thumbprint_kid
from svid._spiffe_id import TrustDomain
from svid._x509 import spiffe_id_from_cert

_VERSION = 1
# How many ancestors a record names: 32 days of keys at the default ca_ttl (one every 12 h).
LINEAGE_DEPTH = 64


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key file's slot as journaled at its making (status left empty), and its lineage."""

    slot: KeySlot
    lineage: frozenset[str]
    # Links, the first endorsing this record's own body (`body`), each next one the body of
    # the key that signed the one before (see endorsed_by_known).
    chain: tuple[Link, ...] = ()
    body: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Link:
    """`signer` (its slot id and public_der) signed `signed`, the body of a key's record."""

    signer: str
    signer_public: bytes
    signed: bytes
    signature: bytes


def _slot_fields(slot: KeySlot) -> dict[str, object]:
    """A slot as journaled at its making, as a record holds it."""
    return {
        "slot_id": slot.slot_id,
        "kind": slot.kind,
        "public_der": base64.b64encode(slot.public_der).decode(),
        "kid": slot.kid,
        "not_before": slot.not_before,
        "not_after": slot.not_after,
        "created_at": slot.created_at,
    }


def _body(slot: KeySlot) -> bytes:
    """What an endorsement signs of a key's record: its slot as journaled at its making."""
    return json.dumps(_slot_fields(slot), sort_keys=True, separators=(",", ":")).encode()


def encode_record(
    slot: KeySlot,
    lineage: Sequence[str],
    endorser: tuple[KeySlot, PrivateKey, KeyRecord | None] | None = None,
) -> bytes:
    """The record of a key made now. `endorser`: the slot of its kind active now, its key and
    its own record, which signs this one's body, its own chain after (None: none is active, as
    at a first start; such a record is never taken back)."""
    chain: list[Link] = []
    if endorser is not None:
        by, key, by_record = endorser
        body = _body(slot)
        chain.append(Link(by.slot_id, by.public_der, body, _sign(key, body)))
        if by_record is not None:
            chain.extend(by_record.chain)
    return json.dumps(
        {
            "version": _VERSION,
            **_slot_fields(slot),
            "lineage": list(lineage),
            "chain": [
                {
                    "signer": link.signer,
                    "signer_public": base64.b64encode(link.signer_public).decode(),
                    "signed": base64.b64encode(link.signed).decode(),
                    "signature": base64.b64encode(link.signature).decode(),
                }
                for link in chain[:LINEAGE_DEPTH]
            ],
        },
        indent=1,
    ).encode()


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(signature_hash(key)))
    return key.sign(data, padding.PKCS1v15(), signature_hash(key))


def _verifies(kind: str, public_der: bytes, link: Link) -> bool:
    try:
        if kind == X509_KIND:
            public: Any = x509.load_der_x509_certificate(public_der).public_key()
        else:
            public = load_der_public_key(public_der)
        digest = signature_hash(public)
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(link.signature, link.signed, ec.ECDSA(digest))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(link.signature, link.signed, padding.PKCS1v15(), digest)
        else:
            return False
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def endorsed_by_known(record: KeyRecord, known: Mapping[str, KeySlot]) -> bool:
    """Whether `record`'s chain leads, signature by signature, from its own body to a key of
    `known` (journaled, or taken back before it) whose public part is the one the chain names.
    Each link's signer must be the key whose body the next link signed."""
    if len(record.chain) > LINEAGE_DEPTH:
        # Never written so (encode_record cuts it there), and each link walked is a signature
        # verified at the start: a planted record of thousands would hold it that long.
        return False
    kind = record.slot.kind
    expected = record.body
    for i, link in enumerate(record.chain):
        if link.signed != expected or not _verifies(kind, link.signer_public, link):
            return False
        anchor = known.get(link.signer)
        if anchor is not None:
            return anchor.kind == kind and anchor.public_der == link.signer_public
        # The next link must sign the signer's own body: its slot id and public part.
        if i + 1 >= len(record.chain):
            return False
        try:
            doc = json.loads(record.chain[i + 1].signed)
            if (
                doc["slot_id"] != link.signer
                or doc["kind"] != kind
                or base64.b64decode(doc["public_der"], validate=True) != link.signer_public
            ):
                return False
        except (ValueError, KeyError, TypeError):
            return False
        expected = record.chain[i + 1].signed
    return False


def decode_record(slot_id: str, data: bytes) -> KeyRecord | None:
    """The record of `slot_id`'s key file; None when it is not one this release wrote for it."""
    try:
        doc = json.loads(data)
        if doc["version"] != _VERSION or doc["slot_id"] != slot_id:
            return None
        slot = KeySlot(
            slot_id=slot_id,
            kind=str(doc["kind"]),
            status="",
            public_der=base64.b64decode(doc["public_der"], validate=True),
            kid=str(doc["kid"]),
            not_before=int(doc["not_before"]),
            not_after=int(doc["not_after"]),
            created_at=int(doc["created_at"]),
        )
        chain = tuple(
            Link(
                str(link["signer"]),
                base64.b64decode(link["signer_public"], validate=True),
                base64.b64decode(link["signed"], validate=True),
                base64.b64decode(link["signature"], validate=True),
            )
            for link in doc.get("chain", [])
        )
        return KeyRecord(slot, frozenset(str(s) for s in doc["lineage"]), chain, _body(slot))
    except (ValueError, KeyError, TypeError):  # json and base64 errors are ValueErrors
        return None


def matches_key(
    slot: KeySlot, key: PrivateKey, trust_domain: TrustDomain, upstream: UpstreamCa | None
) -> bool:
    """Whether `slot` is one this server would have made for `key`."""
    public: PublicKey = key.public_key()
    if slot.kind == JWT_KIND:
        return slot.public_der == spki_der(public) and slot.kid == public_key_thumbprint_kid(public)
    if slot.kind != X509_KIND:
        return False
    try:
        cert = x509.load_der_x509_certificate(slot.public_der)
        issuer = upstream.cert if upstream is not None else cert
        cert.verify_directly_issued_by(issuer)
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        named = spiffe_id_from_cert(cert).trust_domain
    except (ValueError, TypeError, IndexError, InvalidSignature, x509.ExtensionNotFound):
        return False
    cert_public: PublicKey = cert.public_key()  # type: ignore[assignment]
    return (
        ca
        and named == trust_domain
        and spki_der(cert_public) == spki_der(public)
        and slot.kid == ski.digest.hex()
        and slot.not_before == int(cert.not_valid_before_utc.timestamp())
        and slot.not_after == int(cert.not_valid_after_utc.timestamp())
    )


def plan_adoption(
    now: float,
    journal: Sequence[KeySlot],
    records: Sequence[KeyRecord],
    endorsed: Callable[[KeyRecord, Mapping[str, KeySlot]], bool] = endorsed_by_known,
) -> list[KeySlot]:
    """The slots of one kind to journal again, with their status, oldest first: `records` are
    the checked records of key files of that kind the journal does not name. The journal's
    prepared slot, when a key is taken back after it, comes first with its status as the
    schedule had it since."""
    if not journal:
        return []
    known = {slot.slot_id: slot for slot in journal}
    newest = max(slot.created_at for slot in journal)
    taken: list[KeySlot] = []
    descended: set[str] = set()  # the slots the keys taken back were made after
    for record in sorted(records, key=lambda r: (r.slot.created_at, r.slot.slot_id)):
        slot = record.slot
        if slot.created_at < newest or not record.lineage & known.keys():
            continue
        if not endorsed(record, known):
            continue
        known[slot.slot_id] = slot  # an expired key still links its successors to the journal
        descended |= record.lineage
        if now < slot.not_after and _begun(now, slot):
            taken.append(slot)
    if not taken:
        return []
    # A key with a successor was activated before that one was made (a key is prepared only
    # when none waits) and retired when the schedule activated its successor. The journal's
    # own prepared key is one: left prepared beside the newer one taken back, the schedule
    # kept the newer waiting and dropped it, key file and all, where it was the CA in use.
    waited = [
        slot
        for slot in journal
        if slot.status == PREPARED
        and slot.slot_id in descended
        and now < slot.not_after
        and _begun(now, slot)
    ]
    return [_by_schedule(now, slot) for slot in (*waited, *taken[:-1])] + [
        replace(taken[-1], status=PREPARED)
    ]


def _begun(now: float, slot: KeySlot) -> bool:
    return slot.not_before <= now + MAX_CLOCK_SKEW


def _by_schedule(now: float, slot: KeySlot) -> KeySlot:
    """A key with a successor: active until its successor's activation time, retired after."""
    return replace(
        slot, status=ACTIVE if now < activate_at(slot.not_before, slot.not_after) else RETIRED
    )
