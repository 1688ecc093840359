"""The end reason a runtime gives with EndTask, as the task's end_reason and task_end event
record it: bounded, one printable line, no NUL (each refused: a malformed request), and never
a credential (dropped, the end still made: refusing it would leave the task, and its SVIDs,
valid until its TTL)."""

from __future__ import annotations

from server.audit.errors import SecretInAuditError
from server.audit.event import check_no_secret
from server.errors import InvalidRequestError
from server.input_text import refuse_unprintable

BY_RUNTIME = "ended by its runtime"
# The SDK's reasons ("block raised <exception type>") are far shorter; room for a sentence.
MAX_REASON = 200
DROPPED = "its reason was dropped: it looked like a credential"


def runtime_end_reason(given: str) -> str:
    """The end reason of a task its runtime ends, saying `given` why ("" for none)."""
    if len(given) > MAX_REASON:
        raise InvalidRequestError(f"reason: at most {MAX_REASON} characters")
    refuse_unprintable("reason", given)
    if not given:
        return BY_RUNTIME
    try:
        check_no_secret("reason", given)
    except SecretInAuditError:
        given = DROPPED
    return f"{BY_RUNTIME}: {given}"
