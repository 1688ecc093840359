"""Every audit checkpoint the server pushed, checked and kept on disk, never going back.

The server signs checkpoints of its audit chain head and pushes each new one over the Sync
stream, with the public key that signed it; the same for the prune records retention signs
before it removes old events. A copy on every node is one the server's operator (or an intruder
on the server) cannot quietly rewrite: `svid-server audit verify --anchor` on it proves the
server's log still holds every head it names (and, once the log was pruned, that its start is
where a signed prune record put it).

What the copy proves: the server that this agent reached over mTLS (its certificate chaining to
the agent's trust bundle) signed that head with that key at that time. The key is trusted for
arriving that way and is pinned with the first checkpoint kept: a later checkpoint by another
key is refused. It proves nothing about a server already compromised when it signed (it signs
what it holds), nor about events after the checkpoint.

A pushed checkpoint (or prune record) is kept when it verifies under the key it came with and
is newer than the newest of its kind held: a later event, or the same one signed later. One that
goes back, gives an event another hash, names fewer events than a prune before it removed, or
comes under another key is a red flag (the log was cut back or rewritten, or the server's key
replaced): it is refused, logged as a warning and counted, and what is held stays.

Every one kept stays, not only the newest: the agent holds no events, so it cannot tell a head
that extends the one it holds from one signed over a rewritten chain (a server holding the
shared key can sign either). Only verify, given both heads, can: the old one no longer matches.
The file is append-only JSON lines in the server's checkpoint-file format, each line fsynced
before it counts, mode 0600, so it is itself an anchor file for `audit verify --anchor`. Lines
are in an order that file's checks accept (checkpoints' seq and count never going back, a
checkpoint never after a prune that removed more); a crash mid-line leaves a last line without
its newline, which is not a checkpoint and is cut off before the next one is appended. Beyond
MAX_LINES the oldest are dropped (the newest prune record kept: a pruned log's start needs it),
with a warning, by writing the rest to a new file renamed over the old. A file read and found
damaged (at start, or by that rewrite) is moved aside as <name>.invalid, logged as an error, and
the copy starts again from the next checkpoint that verifies: offer never raises for it. One the
system cannot read at start (EIO) is not known damaged: it stays, and the start fails.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import _write_private
from agent_attestor.errors import CheckpointUnreadableError
from svid import AuditCheckpoint, AuditCheckpointError
from svid._audit_checkpoint import (
    CHECKPOINT,
    PRUNE,
    cut_torn_tail,
    key_id_of,
    load_public_der,
    young_prune,
)
from svid._clock import Clock, SystemClock
from svid._durable import fsync_dir, replace_durably
from svid._small_file import SmallFileError, read_small_file

log = logging.getLogger(__name__)
FILE_NAME = "audit-checkpoint.jsonl"

# Why a pushed checkpoint was refused (the metric's `reason` label).
INVALID = "invalid"
BACKWARDS = "backwards"
FORKED = "forked"
KEY_CHANGED = "key_changed"
UNWRITABLE = "unwritable"  # verified and newer, but it could not be stored
YOUNG_PRUNE = "young_prune"  # a prune record removing events younger than the retention
# About 40 MB of lines: at one checkpoint a minute (a head that moves every minute) ten weeks.
MAX_LINES = 100_000
# Far above MAX_LINES lines: a bigger file is not one the store kept, and is not read whole.
_MAX_FILE_BYTES = 1 << 30


@dataclass(frozen=True)
class PushedCheckpoint:
    """One checkpoint as the Sync stream carries it."""

    line: str
    public_key: bytes  # DER SubjectPublicKeyInfo of the key that signed it


class CheckpointStore:
    """Holds every checkpoint and prune record kept (in one file; in memory only the newest of
    each kind and the line count). Used from one thread."""

    def __init__(
        self,
        path: Path,
        on_refused: Callable[[str], None] = lambda _r: None,
        max_lines: int = MAX_LINES,
        *,
        clock: Clock | None = None,
        min_prune_age: float = 0.0,
    ) -> None:
        self.path = path
        self._on_refused = on_refused
        self._max_lines = max_lines
        self._clock = clock or SystemClock()
        self._min_prune_age = min_prune_age
        self._held: dict[str, AuditCheckpoint] = {}
        self._count_none()
        for record in self._load():
            self._note(record)

    @property
    def held(self) -> AuditCheckpoint | None:
        """The newest checkpoint kept."""
        return self._held.get(CHECKPOINT)

    @property
    def records(self) -> list[AuditCheckpoint]:
        """The newest checkpoint and prune record kept, oldest first (the file holds them all:
        read_records)."""
        return sorted(self._held.values(), key=lambda r: r.time)

    def offer(self, pushed: PushedCheckpoint) -> bool:
        """Keep `pushed` if it verifies and is newer than the newest of its kind held; True
        when kept."""
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
        if record.kind == PRUNE:
            # A future signing time would push the limit forward: the agent's own clock caps it.
            at = min(self._clock.now(), record.time)
            young = young_prune(record, self._min_prune_age, at, self._signed_before(record.seq))
            if young is not None:
                return self._refuse(
                    YOUNG_PRUNE,
                    f"{young}: a holder of the checkpoint key may be pruning recent history",
                    record,
                    level=logging.ERROR,
                )
        kept = {**self._held, record.kind: record}
        if _cut_back(kept):
            return self._refuse(
                BACKWARDS,
                "a checkpoint names fewer events than an earlier prune record removed: the "
                "server's audit log may have been cut back",
                record,
            )
        try:
            try:
                self._store(record)
            except AuditCheckpointError as e:
                # Damaged since start (only a rewrite reads the file whole): raised, it ended
                # the Sync stream on every reconnect. Set aside as at start, and the copy
                # starts again from the record just verified.
                self._move_aside(e)
                _append_line(self.path, record.to_line())
        except OSError as e:
            # Serving identities matters more than this copy: the stream goes on, and the next
            # checkpoint (or the snapshot after a reconnect) tries again.
            self._on_refused(UNWRITABLE)
            log.error("cannot store the audit checkpoint", extra={"error": str(e)})
            return False
        self._note(record)
        log.info(
            f"audit {record.kind} kept",
            extra={"seq": record.seq, "count": record.count, "hash": record.hash},
        )
        return True

    def _signed_before(self, seq: int) -> float | None:
        """The newest signing time of a held checkpoint naming fewer than `seq` events."""
        pairs = zip(self._checkpoint_seqs, self._checkpoint_times, strict=True)
        times = (t for s, t in pairs if s < seq)
        return max(times, default=None)

    def _note(self, record: AuditCheckpoint) -> None:
        self._lines += 1
        if record.kind == CHECKPOINT:
            self._checkpoint_seqs.append(record.seq)
            self._checkpoint_times.append(record.time)
        held = self._held.get(record.kind)
        if held is None or (record.seq, record.time) >= (held.seq, held.time):
            self._held[record.kind] = record

    def _store(self, record: AuditCheckpoint) -> None:
        prune = self._held.get(PRUNE)
        before_prune = record.kind == CHECKPOINT and prune is not None and record.seq < prune.seq
        if before_prune or self._lines + 1 > self._max_lines:
            self._rewrite(record)
        else:
            _append_line(self.path, record.to_line())

    def _rewrite(self, record: AuditCheckpoint) -> None:
        """The file again with `record` where the anchor file's order allows it, and the oldest
        lines dropped beyond the cap: rare (a checkpoint signed before a prune that removed
        more, which goes before that prune; or the cap reached), so written whole."""
        try:
            records = _read_unverified(self.path) if self._lines else []
        except FileNotFoundError:
            # Removed since start: the lines counted are gone; another way a copy is damaged.
            raise AuditCheckpointError(f"{self.path} is gone") from None
        # A checkpoint signed before a prune that removed more goes before that prune: verify
        # reads a checkpoint after a prune naming less as the log cut back.
        at = len(records)
        if record.kind == CHECKPOINT:
            at = next(
                (i for i, r in enumerate(records) if r.kind == PRUNE and r.seq > record.seq),
                at,
            )
        records.insert(at, record)
        if len(records) > self._max_lines:
            # Down to nine tenths, so the next lines append rather than rewrite the file again.
            room = max(2, self._max_lines * 9 // 10)
            prunes = [r for r in records if r.kind == PRUNE]
            keep = records[len(records) - room :]
            if prunes and prunes[-1] not in keep:
                # A pruned log's start is vouched for by the newest prune record only.
                keep = [prunes[-1], *records[len(records) - room + 1 :]]
            dropped = len(records) - len(keep)
            log.warning(
                "the agent's copy of the audit checkpoints reached its cap: dropped the oldest",
                extra={"dropped": dropped, "kept": len(keep), "cap": self._max_lines},
            )
            records = keep
        # Its directory fsynced after the rename too (replace_durably).
        _write_private(self.path, "".join(r.to_line() + "\n" for r in records).encode("utf-8"))
        # What the file now holds but `record`, which _note adds.
        self._count_none()
        for r in records:
            if r is not record:
                self._note(r)

    def _refuse(
        self,
        reason: str,
        why: str,
        record: AuditCheckpoint | None = None,
        *,
        level: int = logging.WARNING,
    ) -> bool:
        self._on_refused(reason)
        held = self.held
        log.log(
            level,
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
            return read_records(self.path, verify_all=False)
        except FileNotFoundError:
            return []
        except AuditCheckpointError as e:
            self._move_aside(e)  # read, and found damaged
            return []
        except OSError as e:
            # Not read at all (EIO, not a file): nothing says the copy is damaged. Set aside,
            # the anchor against a rewrite of the server's audit log were lost for a fault of
            # the disk; it stays where it is, and the start fails until it can be read.
            raise CheckpointUnreadableError(
                f"cannot read the audit checkpoint copy {self.path}: {e.strerror or e}; left in "
                "place (it anchors the server's audit log): mend the disk or the file, then "
                "start the agent again"
            ) from None

    def _move_aside(self, damage: Exception) -> None:
        """The damaged file renamed to <name>.invalid, and nothing held: what it held can no
        longer be trusted, and the copy starts again from the next checkpoint kept."""
        # Kept aside, not overwritten: it may be the evidence someone wanted gone.
        aside = self.path.with_name(self.path.name + ".invalid")
        log.error(
            "the stored audit checkpoint is unreadable; moved aside, keeping the next one "
            "the server pushes",
            extra={"error": str(damage), "moved_to": str(aside)},
        )
        with contextlib.suppress(FileNotFoundError):  # already gone: nothing to keep
            replace_durably(self.path, aside)
        self._held = {}
        self._count_none()

    def _count_none(self) -> None:
        """No line counted, no checkpoint's seq and time held: what _note adds to."""
        self._lines = 0
        # Every held checkpoint's seq and signing time, compactly (16 bytes each): what a
        # pushed prune record's age is checked against.
        self._checkpoint_seqs = array("q")
        self._checkpoint_times = array("d")


def read_records(path: Path, verify_all: bool = True) -> list[AuditCheckpoint]:
    """The checkpoints and prune records stored at `path`, in file order, each checked against
    the key it carries, all one key (FileNotFoundError when there is no file). A last line
    without its newline (a write cut short) is not one.

    `verify_all=False` checks the signatures of the newest checkpoint and prune record only
    (what the store compares pushed ones against): the agent's start would otherwise spend
    ~80 µs a line, 8 s on a full file, before serving identities. verify --anchor and
    `svid-agent audit checkpoint` check every line."""
    records = _read_unverified(path)
    if not records:
        raise AuditCheckpointError(f"{path} holds no checkpoint")
    if any(r.key_id != records[0].key_id for r in records):
        raise AuditCheckpointError(f"{path} holds lines signed by two keys")
    checked = records
    if not verify_all:
        newest = {r.kind: r for r in sorted(records, key=lambda r: (r.seq, r.time))}
        checked = list(newest.values())
    keys: dict[tuple[str, str], ec.EllipticCurvePublicKey] = {}
    for record in checked:
        # One key for every line: decode it once, not 100,000 times.
        key = keys.get((record.key_id, record.public_key))
        if key is None:
            key = keys[(record.key_id, record.public_key)] = record.public_key_object()
        record.verify_signature(key)
    return records


def _read_unverified(path: Path) -> list[AuditCheckpoint]:
    try:
        text = _file_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        # Damaged, not a checkpoint: refused like any other unreadable file, not raised as a
        # bare ValueError that stopped the agent's start.
        raise AuditCheckpointError(f"{path} is not UTF-8 text") from None
    # An agent before every line was kept wrote its one or two lines the same way.
    return [AuditCheckpoint.parse(line) for line in text.split("\n")[:-1] if line.strip()]


def _file_bytes(path: Path) -> bytes:
    """The file's bytes, read without waiting on a FIFO at its name (that hung the agent's start,
    and `audit checkpoint`), and only from a regular file. Links are followed: the CLI reads a
    file the operator names. FileNotFoundError when there is none; OSError naming what is there
    otherwise, saying what is there (the callers name the path)."""
    try:
        return read_small_file(path, max_bytes=_MAX_FILE_BYTES, follow_links=True)
    except SmallFileError as refused:
        if refused.missing:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
        raise OSError(f"it {refused.problem}") from None


def _append_line(path: Path, line: str) -> None:
    """`line` appended and fsynced; on failure the file is cut back to what it held, so a line
    the store did not keep never counts. Never follows a link planted at the name."""
    data = (line + "\n").encode("utf-8")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        cut_torn_tail(fd)
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # os.write may write part (a disk filling up)
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


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
