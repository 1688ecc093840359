"""The one rule every backend applies when it appends to the audit chain: a batch must link to
the stored head. Several servers append to one chain; a batch sealed on a head another writer
has since moved would fork it or repeat a seq, so the backend refuses it and the audit log
(server/audit/log.py) seals it again on the stored head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from server.datastore.errors import ChainMovedError
from server.datastore.records import AuditRow, Head

# Seals a refused batch's events again on the stored head (the audit log's): called by the
# backend inside the transaction, under its write lock, so no other writer can move the chain
# again before the rows it returns are written.
Resealer = Callable[[Head | None], Sequence[AuditRow]]


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


def rows_to_write(
    stored: Head | None, rows: Sequence[AuditRow], reseal: Resealer | None
) -> Sequence[AuditRow]:
    """`rows` if they follow the stored head; else, given `reseal`, the rows it seals on that
    head (checked too); else ChainMovedError.

    Why under the lock: a writer that finds the chain moved and seals again outside it must
    queue for the lock once more, and whoever holds it meanwhile moves the chain again. Three
    servers issuing at once made a server lose that race 16 times in a row about once in 70
    commits, and its callers got UNAVAILABLE.
    """
    try:
        check_follows(stored, rows[0])
    except ChainMovedError:
        if reseal is None:
            raise
        resealed = reseal(stored)
        check_follows(stored, resealed[0])
        return resealed
    return rows
