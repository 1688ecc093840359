"""The one rule every backend applies when it appends to the audit chain: a batch must link to
the stored head. Several servers append to one chain; a batch sealed on a head another writer
has since moved would fork it or repeat a seq, so the backend refuses it and the audit log
(server/audit/log.py) seals it again on the stored head.
"""

from __future__ import annotations

from server.datastore.errors import ChainMovedError
from server.datastore.records import AuditRow, Head


def check_follows(stored: Head | None, first: AuditRow) -> None:
    """ChainMovedError unless the batch's first row links to the stored head (seq 1 on an
    empty chain): a batch sealed on a stale head would fork the chain or repeat a seq."""
    seq, prev = first[0], first[-2]
    if stored is None:
        if seq == 1:
            return
    elif seq == stored.seq + 1 and prev == stored.hash:
        return
    at = "an empty chain" if stored is None else f"seq {stored.seq}"
    raise ChainMovedError(
        f"the audit batch starting at seq {seq} was sealed on a head the chain has moved "
        f"past: it is at {at}",
        stored,
    )
