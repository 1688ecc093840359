"""A prune record that removed events younger than the retention: `audit verify --anchor`.

Retention removes only events older than `audit_retention_days`; a key holder (an intruder on
one server of several shares the key) can sign a prune through the current head instead, and
delete what it wanted gone behind a record every verify and agent accepts. Such a record is
flagged here, from the anchor file alone (svid/_audit_checkpoint.py young_prune gives the two
signs): each prune record is judged at its own signing time.

The age is the operator's (`audit verify --min-prune-age-days`, the smallest retention ever in
force), not today's config: a retention raised since would flag every honest past prune. A count
bound (`audit_max_events`) removes young events by design, and `audit prune --through-seq N` of
young events is flagged as what it is.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path

from svid import AuditCheckpoint
from svid._audit_checkpoint import CHECKPOINT, PRUNE, young_prune


def young_prunes(records: Sequence[AuditCheckpoint], min_age: float) -> str | None:
    """Why the first prune record among `records` (one key's, verified) removed events younger
    than `min_age` seconds when it was signed, or None."""
    if min_age <= 0:
        return None
    checkpoints = sorted((r.seq, r.time) for r in records if r.kind == CHECKPOINT)
    seqs = [seq for seq, _ in checkpoints]
    # The newest signing time among checkpoints up to each one, by seq: one bisect per prune,
    # not a scan (a server's file holds a checkpoint a minute for as long as it is kept).
    newest = list(accumulate((t for _, t in checkpoints), max))
    for record in records:
        if record.kind != PRUNE:
            continue
        below = bisect.bisect_left(seqs, record.seq)
        why = young_prune(record, min_age, record.time, newest[below - 1] if below else None)
        if why is not None:
            return why
    return None


def young_prunes_in_file(path: Path, pinned_key_id: str | None, min_age: float) -> str | None:
    """young_prunes over an anchor file CheckpointFile.anchors already read whole (every line
    parsed and verified) with the same key choice: the pinned key, else the newest line's."""
    text = path.read_text(encoding="utf-8")
    # A last line without its newline is not a checkpoint yet (as CheckpointFile reads it).
    records = [AuditCheckpoint.parse(line) for line in text.split("\n")[:-1] if line.strip()]
    if not records:
        return None
    key_id = pinned_key_id or records[-1].key_id
    return young_prunes([r for r in records if r.key_id == key_id], min_age)
