"""Records <-> protobuf messages. No decisions here, only field copying."""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives import serialization

from server.datastore.records import AttestedAgent, Entry, Revocation, Selector
from svid._bundle import SpiffeBundle
from svid._proto import admin_pb2, common_pb2

_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def selector_to_proto(selector: Selector) -> common_pb2.Selector:
    return common_pb2.Selector(type=selector.type, value=selector.value)


def entry_to_proto(entry: Entry) -> common_pb2.Entry:
    return common_pb2.Entry(
        id=entry.id,
        spiffe_id=entry.spiffe_id,
        parent_id=entry.parent_id,
        selectors=[selector_to_proto(s) for s in entry.selectors],
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=list(entry.dns_names),
        hint=entry.hint,
        admin=entry.admin,
        expires_at=entry.expires_at,
        revision=entry.revision,
        created_at=entry.created_at,
        federates_with=list(entry.federates_with),
    )


def entry_from_proto(message: common_pb2.Entry) -> Entry:
    return Entry(
        id=message.id,
        spiffe_id=message.spiffe_id,
        parent_id=message.parent_id,
        selectors=tuple(Selector(s.type, s.value) for s in message.selectors),
        x509_svid_ttl=message.x509_svid_ttl,
        jwt_svid_ttl=message.jwt_svid_ttl,
        dns_names=tuple(message.dns_names),
        hint=message.hint,
        admin=message.admin,
        expires_at=message.expires_at,
        revision=message.revision,
        created_at=message.created_at,
        federates_with=tuple(message.federates_with),
    )


def agent_to_proto(agent: AttestedAgent) -> admin_pb2.Agent:
    return admin_pb2.Agent(
        spiffe_id=agent.spiffe_id,
        attestation_type=agent.attestation_type,
        serial=agent.serial,
        expires_at=agent.expires_at,
        banned=agent.banned,
        attested_at=agent.attested_at,
        selectors=[selector_to_proto(s) for s in agent.selectors],
    )


def bundle_to_proto(
    bundle: SpiffeBundle, jwt_expiry: Mapping[str, int] | None = None
) -> common_pb2.Bundle:
    expiry = jwt_expiry or {}
    return common_pb2.Bundle(
        trust_domain=bundle.trust_domain.name,
        x509_authorities=[c.public_bytes(_DER) for c in bundle.x509_authorities],
        jwt_keys=[
            common_pb2.JWTKey(
                kid=kid,
                public_key=key.public_bytes(_DER, _SPKI),
                expires_at=expiry.get(kid, 0),
            )
            for kid, key in sorted(bundle.jwt_authorities.items())
        ],
        sequence=bundle.sequence,
        refresh_hint=bundle.refresh_hint,
    )


_REVOCATION_KINDS = {
    "x509_serial": common_pb2.Revocation.X509_SERIAL,
    "jwt_id": common_pb2.Revocation.JWT_ID,
    "task": common_pb2.Revocation.TASK,
}


def revocation_to_proto(item: Revocation) -> common_pb2.Revocation:
    return common_pb2.Revocation(
        kind=_REVOCATION_KINDS.get(item.kind, common_pb2.Revocation.KIND_UNSPECIFIED),
        value=item.value,
        expires_at=item.expires_at,
        reason=item.reason,
        spiffe_id=item.spiffe_id,
    )
