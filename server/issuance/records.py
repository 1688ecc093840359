"""What the ledger is handed for each issued credential: its row and its audit event.

Events are plain tuples in DRAFT_FIELDS order (kind, agent_id, node_id, on_behalf_of, resource,
action, decision, reason, task_id, risk, credential_id, policy_ids, policy_set_hash, ttl,
latency_us, extra): these run per signature on the issuing thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from json.encoder import encode_basestring  # how the audit log's canonical encoder writes text

from server.audit.event import CHECK_MARKERS
from server.datastore.records import REVOKED_JWT_ID, REVOKED_X509_SERIAL
from server.issuance.ledger import Credential, EventTuple
from server.issuance.task_port import TaskGrant, TaskJwtGrant


def x509_record(
    agent_id: str,
    spiffe_id: str,
    *,
    serial_hex: str,
    expires_at: int,
    now: int,
    task: TaskGrant | None,
    issuer: str,
) -> tuple[Credential, EventTuple]:
    """`issuer`: the signing CA's key id (X509Signer.key_id), kept for the CRLs."""
    task_id = task.task_id if task is not None else ""
    credential = Credential(
        REVOKED_X509_SERIAL, serial_hex, agent_id, spiffe_id, task_id, expires_at, issuer
    )
    event: EventTuple = (
        "x509_issued",
        task.runtime_id if task is not None else spiffe_id,
        agent_id,
        None,
        None,
        None,
        "allow",
        None,
        task_id or None,
        None,
        serial_hex,
        (),
        None,
        max(0, expires_at - now),
        None,
        {"spiffe_id": spiffe_id},
    )
    return credential, event


def workload_jwt_record(
    agent_id: str, spiffe_id: str, *, jti: str, issued_at: int, expires_at: int, audience: str
) -> tuple[Credential, EventTuple]:
    """`audience` joined with commas, as the event's resource."""
    credential = Credential(REVOKED_JWT_ID, jti, agent_id, spiffe_id, "", expires_at)
    event: EventTuple = (
        "jwt_minted",
        spiffe_id,
        agent_id,
        None,
        audience,
        None,
        "allow",
        None,
        None,
        None,
        jti,
        (),
        None,
        expires_at - issued_at,
        None,
        {},
    )
    return credential, event


def workload_jwt_prefix(agent_id: str, spiffe_id: str) -> str | None:
    """The start of the audit body (see AuditLog.record_later) shared by the events of
    every workload JWT `agent_id` gets for `spiffe_id`; None when either value needs the
    log's own check. With workload_jwt_body: a signing worker's draft, at a fraction of the
    generic check and encoder's cost (a test holds the two equal)."""
    for value in (agent_id, spiffe_id):
        if type(value) is not str or any(marker in value for marker in CHECK_MARKERS):
            return None
    return f'["jwt_minted",{encode_basestring(spiffe_id)},{encode_basestring(agent_id)},null,'


def workload_jwt_body(prefix: str | None, jti: str, audience: str, ttl: int) -> str | None:
    """The audit body of workload_jwt_record's event (after `prefix`, workload_jwt_prefix of its
    agent and SPIFFE ID): `ttl` is expires_at - issued_at, `audience` joined with commas.
    None when any value needs the log's own check."""
    if prefix is None or type(jti) is not str or type(audience) is not str or type(ttl) is not int:
        return None
    for marker in CHECK_MARKERS:
        if marker in jti or marker in audience:
            return None
    return (
        f'{prefix}{encode_basestring(audience)},null,"allow",null,null,null,'
        f"{encode_basestring(jti)},[],null,{ttl},null]"
    )


def task_jwt_record(
    agent_id: str,
    spiffe_id: str,
    *,
    jti: str,
    expires_at: int,
    audience: Sequence[str],
    grant: TaskJwtGrant,
) -> tuple[Credential, EventTuple]:
    credential = Credential(REVOKED_JWT_ID, jti, agent_id, spiffe_id, grant.task_id, expires_at)
    event: EventTuple = (
        "jwt_minted",
        grant.runtime_id,
        agent_id,
        grant.on_behalf_of or None,
        ",".join(audience),
        grant.scope,
        "allow",
        None,
        grant.task_id,
        None,
        jti,
        (),
        grant.policy_set_hash or None,
        grant.ttl,
        None,
        {},
    )
    return credential, event


def attestation_event(
    agent_id: str, attestation_type: str, serial: str, *, ok: bool, reason: str = ""
) -> EventTuple:
    return (
        "node_attestation",
        agent_id or None,
        agent_id or None,
        None,
        None,
        None,
        "allow" if ok else "deny",
        reason or None,
        None,
        None,
        serial or None,
        (),
        None,
        None,
        None,
        {"type": attestation_type},
    )
