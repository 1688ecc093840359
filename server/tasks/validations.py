"""The audit events of the ValidateJWTSVID answers an agent reports (task_pb2.Validation).

The claims of a refused token may be unverified: a value that looks like a credential is not
recorded (the event keeps the decision and the reason it was dropped). Those of a token whose
signature did not hold (claims_verified unset: forged, or garbled) are anyone's words: kept in
`extra` as `claimed`, never as the event's agent, task or credential, so that no one files
refusals under another workload's ID or task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.audit import AuditError, EventDraft, EventKind
from server.audit.event import joined_names


def _text(value: str, limit: int = 512) -> str | None:
    # PostgreSQL text holds no NUL: one in a claim would fail the whole report as storage
    # unavailable, which the agent retries, so no later report would land.
    return value[:limit].replace("\x00", "\ufffd") or None


def validation_events(agent_id: str, validations: Sequence[Any]) -> list[EventDraft]:
    """One jwt_validated event for each of `validations`, as agent `agent_id` reported them."""
    events = []
    for v in validations:
        signed = v.ok or v.claims_verified
        named = {"sub": _text(v.subject), "txn": _text(v.txn), "jti": _text(v.jti)}
        claimed = {} if signed else {k: value for k, value in named.items() if value}
        try:
            event = EventDraft(
                kind=EventKind.JWT_VALIDATED,
                agent_id=named["sub"] if signed else None,
                node_id=agent_id,
                # Another issuer's audience may hold a comma (the agent lets it through).
                resource=_text(joined_names(v.audience)),
                decision="allow" if v.ok else "deny",
                reason=_text(v.reason),
                task_id=named["txn"] if signed else None,
                credential_id=named["jti"] if signed else None,
                extra={
                    "validated_at": int(v.at),
                    "caller_id": v.caller_id[:512],
                    **({"claimed": claimed} if claimed else {}),
                },
            )
        except AuditError:
            event = EventDraft(
                kind=EventKind.JWT_VALIDATED,
                node_id=agent_id,
                decision="allow" if v.ok else "deny",
                reason="report dropped: a field looked like a credential",
            )
        events.append(event)
    return events
