"""The newest audit checkpoint the server pushed, checked and kept on disk, never going back.

The server signs checkpoints of its audit chain head and pushes each new one over the Sync
stream, with the public key that signed it. A copy on every node is one the server's operator
(or an intruder on the server) cannot quietly rewrite: `svid-server audit verify --anchor` on
it proves the server's log still holds the head it names.

What the copy proves: the server that this agent reached over mTLS (its certificate chaining to
the agent's trust bundle) signed that head with that key at that time. The key is trusted for
arriving that way and is pinned with the first checkpoint kept: a later checkpoint by another
key is refused. It proves nothing about a server already compromised when it signed (it signs
what it holds), nor about events after the checkpoint.

A pushed checkpoint is kept when it verifies under the key it came with and is newer than the
one held: more events, or the same head signed later. One that names fewer events, another
hash for the same head, or another key is a red flag (the log was cut back or rewritten, or the
server's key replaced): it is refused, logged as a warning and counted, and the held one stays.
The file holds one line in the server's checkpoint-file format, so it is itself an anchor file
for `audit verify --anchor`; it is replaced atomically (temp file, fsync, rename), mode 0600.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent_attestor.agent_store import _write_private
from svid import AuditCheckpoint, AuditCheckpointError
from svid._audit_checkpoint import CHECKPOINT, key_id_of, load_public_der

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
    """Holds the newest checkpoint (in memory and in one file). Used from one thread."""

    def __init__(self, path: Path, on_refused: Callable[[str], None] = lambda _r: None) -> None:
        self.path = path
        self._on_refused = on_refused
        self._held = self._load()

    @property
    def held(self) -> AuditCheckpoint | None:
        return self._held

    def offer(self, pushed: PushedCheckpoint) -> bool:
        """Keep `pushed` if it verifies and is newer than the one held; True when kept."""
        try:
            checkpoint = _verified(pushed)
        except AuditCheckpointError as e:
            return self._refuse(INVALID, f"it does not verify: {e}")
        held = self._held
        if held is not None:
            if checkpoint.key_id != held.key_id:
                return self._refuse(
                    KEY_CHANGED,
                    f"it is signed by key {checkpoint.key_id[:16]}, not by key "
                    f"{held.key_id[:16]} of the checkpoints kept so far",
                    checkpoint,
                )
            if checkpoint.count < held.count or checkpoint.seq < held.seq:
                return self._refuse(
                    BACKWARDS,
                    f"it names {checkpoint.count} events, fewer than the {held.count} of the "
                    "one kept: the server's audit log may have been cut back",
                    checkpoint,
                )
            if checkpoint.count == held.count and (
                checkpoint.seq != held.seq or checkpoint.hash != held.hash
            ):
                return self._refuse(
                    FORKED,
                    f"it gives event {checkpoint.seq} another hash than the one kept: the "
                    "server's audit log may have been rewritten",
                    checkpoint,
                )
            if checkpoint.count == held.count and checkpoint.time <= held.time:
                return False  # the same head, not signed later: nothing new
        try:
            _write_private(self.path, (checkpoint.to_line() + "\n").encode("utf-8"))
            _fsync_dir(self.path.parent)
        except OSError as e:
            # Serving identities matters more than this copy: the stream goes on, and the next
            # checkpoint (or the snapshot after a reconnect) tries again.
            self._on_refused(UNWRITABLE)
            log.error("cannot store the audit checkpoint", extra={"error": str(e)})
            return False
        self._held = checkpoint
        log.info(
            "audit checkpoint kept",
            extra={"seq": checkpoint.seq, "count": checkpoint.count, "hash": checkpoint.hash},
        )
        return True

    def _refuse(self, reason: str, why: str, checkpoint: AuditCheckpoint | None = None) -> bool:
        self._on_refused(reason)
        held = self._held
        log.warning(
            f"refused an audit checkpoint from the server: {why}; kept the one held. Compare "
            "the server's log with this node's copy: svid-agent audit checkpoint > anchor.jsonl; "
            "svid-server audit verify --anchor anchor.jsonl",
            extra={
                "reason": reason,
                "offered_seq": None if checkpoint is None else checkpoint.seq,
                "held_seq": None if held is None else held.seq,
            },
        )
        return False

    def _load(self) -> AuditCheckpoint | None:
        try:
            return read_checkpoint(self.path)
        except FileNotFoundError:
            return None
        except (OSError, AuditCheckpointError) as e:
            # Kept aside, not overwritten: it may be the evidence someone wanted gone.
            aside = self.path.with_name(self.path.name + ".invalid")
            log.error(
                "the stored audit checkpoint is unreadable; moved aside, keeping the next one "
                "the server pushes",
                extra={"error": str(e), "moved_to": str(aside)},
            )
            os.replace(self.path, aside)
            return None


def read_checkpoint(path: Path) -> AuditCheckpoint:
    """The checkpoint stored at `path`, checked against the key it carries (FileNotFoundError
    when there is none)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if len(lines) != 1:
        raise AuditCheckpointError(f"{path} holds {len(lines)} lines, not one checkpoint")
    checkpoint = AuditCheckpoint.parse(lines[0])
    checkpoint.verify_signature(checkpoint.public_key_object())
    return checkpoint


def _verified(pushed: PushedCheckpoint) -> AuditCheckpoint:
    """The pushed line, checked against the key that came with it."""
    checkpoint = AuditCheckpoint.parse(pushed.line)
    if checkpoint.kind != CHECKPOINT:
        raise AuditCheckpointError(f"a {checkpoint.kind} record, not a checkpoint")
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
