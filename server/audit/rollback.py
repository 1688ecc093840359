"""A datastore gone back behind the audit checkpoints signed of it: refused, never served on.

A datastore restored from a backup (sqlite3 `.backup`, a copy of the file, pg_restore), or
rolled back any other way, lacks everything written after the copy: agents banned or evicted
since are admitted again, revocations and task ends since are forgotten, agents attested since
under an agent ID it does not hold are unknown (server/restore_adoption.py takes back the
others). The data directory's checkpoint file (and every agent's copy) still names the head
the server signed before: that the datastore's chain does not reach it, or reaches it with
another hash, is how a start tells. A start on it served at once, said so in one log line, and
signed the new events it appended at the seqs the checkpoints had already signed with other
hashes: the chain forked silently, and the checkpointer then refused every checkpoint (the
chain no longer ran from the last one signed) for as long as the server ran.

The start is refused naming what is lost (the events after the datastore's head through the
checkpoint's, and the times between) and what to do: restore a newer copy, or start once with
`svid-server run --restored-datastore`. That start records the rollback on the audit log
(`datastore_restored`: the checkpoint the datastore lacks and its head), moves the checkpoint
file aside (kept, as `<file>.before-restore-<time>`: with the agents' copies it proves what
the log held), and signs the restored chain anew.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from server.audit.checkpoint import (
    CHECKPOINT_FILE,
    PUBLIC_KEY_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointFile,
    load_public_key,
)
from server.audit.event import EventKind
from server.audit.log import AuditLog
from server.datastore.errors import DataStoreError
from server.datastore.records import Head
from svid._clock import format_utc
from svid._durable import fsync_dir
from svid._small_file import SmallFileError, check_regular_file

RESTORED_DATASTORE_FLAG = "--restored-datastore"

_log = logging.getLogger("svid.server.audit")


class DatastoreRolledBackError(DataStoreError):
    """The datastore's audit chain lacks the last checkpoint this data directory signed of it
    (restored from a backup, or rolled back): the message says what is lost and what to do."""


class RestoredFlagError(DataStoreError):
    """`--restored-datastore` given for a datastore that holds the last checkpoint this data
    directory signed of it: there is no restore to accept, and the flag, left where starts
    come from, would accept the next one unasked."""


class _ChainStore(Protocol):
    def audit_head(self) -> Head | None: ...

    def audit_base(self) -> Head | None: ...

    def audit_rows_after(self, after: int, limit: int) -> list[dict[str, object]]: ...


@dataclass(frozen=True)
class Rollback:
    """The newest checkpoint this data directory signed that the datastore's chain lacks, and
    the chain's head (None: an empty log) with the time of its last event."""

    checkpoint: Checkpoint
    head: Head | None
    head_time: float | None

    def describe(self) -> str:
        head_seq = 0 if self.head is None else self.head.seq
        cp = self.checkpoint
        if head_seq >= cp.seq:
            lost = (
                f"its event at seq {cp.seq} is not the one signed there (hash "
                f"{cp.hash[:16]}…): it was rolled back and written again since"
            )
        elif head_seq + 1 == cp.seq:
            lost = f"event {cp.seq} is gone"
        else:
            lost = f"events {head_seq + 1} to {cp.seq} are gone"
        # A head past the checkpoint was written after the rollback: its time says nothing.
        since = (
            f" after {format_utc(self.head_time)} (its last event)"
            if self.head_time is not None and head_seq < cp.seq
            else ""
        )
        return (
            f"the datastore's audit log ends at seq {head_seq}, but the checkpoint signed at "
            f"{format_utc(cp.time)} names seq {cp.seq}: {lost}. The datastore was restored "
            f"from a backup or rolled back, and what was written{since} is "
            "lost: agents banned or evicted since are admitted again, SVIDs and tasks revoked "
            "since are no longer revoked, agents attested since under an agent ID it does not "
            "hold are unknown (those that renewed, or attested again under an ID it holds, "
            "are taken back by a start with --restored-datastore), entries changed since are "
            "as they were"
        )


def find_rollback(store: _ChainStore, data_dir: Path) -> Rollback | None:
    """The newest checkpoint of `data_dir`'s file that the key published beside it signed,
    when the stored chain does not hold its (seq, hash); None when it does, or that event was
    pruned since (retention removes the oldest events, never the head). Reads only: a start
    asks before its CA makes or activates any key in a datastore it may refuse."""
    published = data_dir / PUBLIC_KEY_FILE
    try:
        # Not a regular file of its own (a FIFO, whose read waited for a writer and hung the
        # start; a link): not the key this server published, which the start rewrites.
        check_regular_file(published, follow_links=False)
    except SmallFileError:
        return None
    try:
        key_id, _ = load_public_key(published)
    except CheckpointError:
        return None
    # Not the newest line: one of another key, or one not verifying, would hide the rest.
    checkpoint = CheckpointFile(data_dir / CHECKPOINT_FILE).newest_signed_by(key_id)
    if checkpoint is None or checkpoint.seq == 0:
        return None
    head = store.audit_head()
    head_seq = 0 if head is None else head.seq
    if head_seq >= checkpoint.seq:
        base = store.audit_base()
        if base is not None and base.seq >= checkpoint.seq:
            if base.seq > checkpoint.seq or base.hash == checkpoint.hash:
                return None
        else:
            rows = store.audit_rows_after(checkpoint.seq - 1, 1)
            if rows and rows[0]["seq"] == checkpoint.seq and rows[0]["hash"] == checkpoint.hash:
                return None
    return Rollback(checkpoint, head, _last_time(store, head))


def _last_time(store: _ChainStore, head: Head | None) -> float | None:
    if head is None:
        return None
    rows = store.audit_rows_after(head.seq - 1, 1)
    ts = rows[0]["ts"] if rows else None
    return float(ts) if isinstance(ts, int | float) else None


def refuse_rollback(rollback: Rollback) -> DatastoreRolledBackError:
    return DatastoreRolledBackError(
        f"{rollback.describe()}. Restore a newer copy of the datastore if there is one; to "
        "serve from this one, start once with "
        f"`svid-server run {RESTORED_DATASTORE_FLAG}` and then ban, evict and revoke again "
        "what was banned, evicted and revoked since (the audit log exported or "
        "shipped elsewhere, or the server's logs, say what)"
    )


def refuse_restored_flag(data_dir: Path) -> RestoredFlagError:
    return RestoredFlagError(
        f"{RESTORED_DATASTORE_FLAG} was given, but the datastore holds the last audit "
        f"checkpoint signed in {data_dir} (or none was signed there): it lacks nothing signed "
        f"of it, and there is no restore to accept; start without {RESTORED_DATASTORE_FLAG}. "
        "It is a flag of one start: left where every start takes it (a unit file, a "
        "supervisor's command), it would serve the next restored or rolled-back datastore "
        "unasked"
    )


def accept_rollback(rollback: Rollback, audit: AuditLog, data_dir: Path, now: float) -> Path:
    """Record the rollback on the audit log, then move the checkpoint file (and its rotated
    `.1`) aside so the restored chain is signed anew; returns where the file went."""
    cp = rollback.checkpoint
    audit.append(
        EventKind.DATASTORE_RESTORED,
        action="restore_datastore",
        decision="accepted",
        reason="the datastore lacks events a checkpoint signed: restored, rolled back or new",
        extra={
            "checkpoint_seq": cp.seq,
            "checkpoint_hash": cp.hash,
            "checkpoint_time": cp.time,
            "head_seq": 0 if rollback.head is None else rollback.head.seq,
        },
    )
    path = data_dir / CHECKPOINT_FILE
    aside = path.with_name(f"{path.name}.before-restore-{int(now)}")
    rotated = CheckpointFile(path).rotated
    if rotated.exists():
        rotated.rename(aside.with_name(aside.name + ".1"))
    path.rename(aside)
    fsync_dir(data_dir)
    _log.warning(
        "serving from a restored datastore as asked (%s): %s; the checkpoints signed before "
        "are kept in %s",
        RESTORED_DATASTORE_FLAG,
        rollback.describe(),
        aside,
    )
    return aside
