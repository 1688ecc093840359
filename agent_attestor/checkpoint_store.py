"""The newest audit checkpoint the server pushed, checked and kept on disk, never going back.

The server signs checkpoints of its audit chain head and pushes each new one over the Sync
stream, with the public key that signed it; the same for the prune records retention signs
before it removes old events. A copy on every node is one the server's operator (or an intruder
on the server) cannot quietly rewrite: `svid-server audit verify --anchor` on it proves the
server's log still holds the head it names (and, once the log was pruned, that its start is
where a signed prune record put it).

What the copy proves: the server that this agent reached over mTLS (its certificate chaining to
the agent's trust bundle) signed that head with that key at that time. The key is trusted for
arriving that way and is pinned with the first checkpoint kept: a later checkpoint by another
key is refused. It proves nothing about a server already compromised when it signed (it signs
what it holds), nor about events after the checkpoint.

A pushed checkpoint (or prune record) is kept when it verifies under the key it came with and
is newer than the one of its kind held: a later event, or the same one signed later. One that
goes back, gives an event another hash, names fewer events than a prune before it removed, or
comes under another key is a red flag (the log was cut back or rewritten, or the server's key
replaced): it is refused, logged as a warning and counted, and what is held stays. The file
holds those lines (oldest first) in the server's checkpoint-file format, so it is itself an
anchor file for `audit verify --anchor`; it is replaced atomically (temp file, fsync, rename),
mode 0600.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent_attestor.agent_store import _write_private
from svid import AuditCheckpoint, AuditCheckpointError
from svid._audit_checkpoint import CHECKPOINT, PRUNE, key_id_of, load_public_der

log = logging.getLogger(__name__)
FILE_NAME = "audit-checkpoint.jsonl"

# Why a pushed checkpoint was refused (the metric's `reason` label).
INVALID = "invalid"
BACKWARDS = "backwards"
FORKED = "forked"
KEY_CHANGED = "key_changed"
UNWRITABLE = "unwritable"  # verified and newer, but it could not be stored


@dataclass(frozen=True)
class PushedCheckpoint:
    """One checkpoint as the Sync stream carries it."""

    line: str
    public_key: bytes  # DER SubjectPublicKeyInfo of the key that signed it


class CheckpointStore:
    """Holds the newest checkpoint and prune record (in memory and in one file). Used from one
    thread."""

    def __init__(self, path: Path, on_refused: Callable[[str], None] = lambda _r: None) -> None:
        self.path = path
        self._on_refused = on_refused
        self._held: dict[str, AuditCheckpoint] = {r.kind: r for r in self._load()}

    @property
    def held(self) -> AuditCheckpoint | None:
        """The newest checkpoint kept."""
        return self._held.get(CHECKPOINT)

    @property
    def records(self) -> list[AuditCheckpoint]:
        """What the file holds: the newest checkpoint and prune record kept, oldest first."""
        return sorted(self._held.values(), key=lambda r: r.time)

    def offer(self, pushed: PushedCheckpoint) -> bool:
        """Keep `pushed` if it verifies and is newer than the one of its kind held; True when
        kept."""
        try:
            record = _verified(pushed)
        except AuditCheckpointError as e:
            return self._refuse(INVALID, f"it does not verify: {e}")
        pinned = next(iter(self._held.values()), None)
        if pinned is not None and record.key_id != pinned.key_id:
            return self._refuse(
                KEY_CHANGED,
                f"it is signed by key {record.key_id[:16]}, not by key {pinned.key_id[:16]} of "
                "the checkpoints kept so far",
                record,
            )
        held = self._held.get(record.kind)
        if held is not None:
            went_back = record.seq < held.seq or (
                record.kind == CHECKPOINT and record.count < held.count
            )
            if went_back:
                return self._refuse(
                    BACKWARDS,
                    f"it names event {record.seq}, before event {held.seq} of the {record.kind} "
                    "kept: the server's audit log may have been cut back",
                    record,
                )
            # A prune's count is what that one prune removed: only a checkpoint's must match.
            same_count = record.kind != CHECKPOINT or record.count == held.count
            if record.seq == held.seq and (record.hash != held.hash or not same_count):
                return self._refuse(
                    FORKED,
                    f"it gives event {record.seq} another hash than the {record.kind} kept: "
                    "the server's audit log may have been rewritten",
                    record,
                )
            if record.seq == held.seq and record.time <= held.time:
                return False  # the same head, not signed later: nothing new
        kept = {**self._held, record.kind: record}
        if _cut_back(kept):
            return self._refuse(
                BACKWARDS,
                "a checkpoint names fewer events than an earlier prune record removed: the "
                "server's audit log may have been cut back",
                record,
            )
        lines = "".join(r.to_line() + "\n" for r in sorted(kept.values(), key=lambda r: r.time))
        try:
            _write_private(self.path, lines.encode("utf-8"))
            _fsync_dir(self.path.parent)
        except OSError as e:
            # Serving identities matters more than this copy: the stream goes on, and the next
            # checkpoint (or the snapshot after a reconnect) tries again.
            self._on_refused(UNWRITABLE)
            log.error("cannot store the audit checkpoint", extra={"error": str(e)})
            return False
        self._held = kept
        log.info(
            f"audit {record.kind} kept",
            extra={"seq": record.seq, "count": record.count, "hash": record.hash},
        )
        return True

    def _refuse(self, reason: str, why: str, record: AuditCheckpoint | None = None) -> bool:
        self._on_refused(reason)
        held = self.held
        log.warning(
            f"refused an audit checkpoint from the server: {why}; kept the one held. Compare "
            "the server's log with this node's copy: svid-agent audit checkpoint > anchor.jsonl; "
            "svid-server audit verify --anchor anchor.jsonl",
            extra={
                "reason": reason,
                "offered_seq": None if record is None else record.seq,
                "held_seq": None if held is None else held.seq,
            },
        )
        return False

    def _load(self) -> list[AuditCheckpoint]:
        try:
            return read_records(self.path)
        except FileNotFoundError:
            return []
        except (OSError, AuditCheckpointError) as e:
            # Kept aside, not overwritten: it may be the evidence someone wanted gone.
            aside = self.path.with_name(self.path.name + ".invalid")
            log.error(
                "the stored audit checkpoint is unreadable; moved aside, keeping the next one "
                "the server pushes",
                extra={"error": str(e), "moved_to": str(aside)},
            )
            os.replace(self.path, aside)
            return []


def read_records(path: Path) -> list[AuditCheckpoint]:
    """The checkpoint and prune record stored at `path` (one of each at most, oldest first),
    each checked against the key it carries (FileNotFoundError when there is no file)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        # Damaged, not a checkpoint: refused like any other unreadable file, not raised as a
        # bare ValueError that stopped the agent's start.
        raise AuditCheckpointError(f"{path} is not UTF-8 text") from None
    records = [AuditCheckpoint.parse(line) for line in lines]
    kinds = [r.kind for r in records]
    if not records or len(set(kinds)) != len(kinds):
        raise AuditCheckpointError(f"{path} does not hold one checkpoint (and one prune record)")
    for record in records:
        if record.key_id != records[0].key_id:
            raise AuditCheckpointError(f"{path} holds lines signed by two keys")
        record.verify_signature(record.public_key_object())
    return records


def _cut_back(records: dict[str, AuditCheckpoint]) -> bool:
    """A checkpoint signed after a prune names at least the events that prune removed: the head
    the prune saw was at least that far, and heads only grow (audit verify checks the same)."""
    checkpoint, prune = records.get(CHECKPOINT), records.get(PRUNE)
    return (
        checkpoint is not None
        and prune is not None
        and checkpoint.time >= prune.time
        and checkpoint.seq < prune.seq
    )


def _verified(pushed: PushedCheckpoint) -> AuditCheckpoint:
    """The pushed line, checked against the key that came with it."""
    checkpoint = AuditCheckpoint.parse(pushed.line)
    if (
        key_id_of(pushed.public_key) != checkpoint.key_id
        or checkpoint.public_key_der() != pushed.public_key
    ):
        raise AuditCheckpointError("it carries another key than the one sent with it")
    checkpoint.verify_signature(load_public_der(pushed.public_key))
    return checkpoint


def _fsync_dir(directory: Path) -> None:
    """The rename is durable only once the directory is."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
