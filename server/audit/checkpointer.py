"""Writes signed checkpoints of the audit head: on an interval, at shutdown, and on demand; and
hands each new checkpoint and prune record it signs (and, at start, the last of each it finds
signed by its own key) to a listener: the server pushes them to its agents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from server.audit.checkpoint import PRUNE, Checkpoint, CheckpointFile, CheckpointSigner
from server.audit.event import GENESIS_HASH
from server.audit.log import AuditLog
from svid import AuditCheckpointError
from svid._clock import Clock

_log = logging.getLogger("svid.server.audit")


class Checkpointer:
    """Signs the head the audit log committed (as this process wrote it) and appends it to the
    checkpoint file. An interval tick writes only when the head moved since the last one."""

    def __init__(
        self,
        audit: AuditLog,
        signer: CheckpointSigner,
        file: CheckpointFile,
        clock: Clock,
        interval: float,
        *,
        on_checkpoint: Callable[[Checkpoint], None] = lambda _checkpoint: None,
    ) -> None:
        self._audit = audit
        self._signer = signer
        self._file = file
        self._clock = clock
        self._interval = interval
        self._on_checkpoint = on_checkpoint
        self._lock = threading.Lock()
        self._last = file.last()
        self._warn_if_behind()
        for last in (self._last, file.last(PRUNE)):
            if last is not None and self._signed_by_me(last):
                on_checkpoint(last)

    @property
    def last(self) -> Checkpoint | None:
        return self._last

    def last_prune(self) -> Checkpoint | None:
        """The newest prune record in the file (not verified), whoever signed it."""
        with self._lock:
            return self._file.last(PRUNE)

    def sign_prune(self, seq: int, digest: str, count: int) -> Checkpoint:
        """Sign and append a prune record: events through `seq` (whose hash is `digest`) may
        go, `count` of them in this prune. Durable in the file when this returns, which is
        before retention deletes anything."""
        with self._lock:
            record = self._signer.sign(seq, digest, count, self._clock.now(), PRUNE)
            self._file.append(record)
            self._on_checkpoint(record)
            return record

    @property
    def key_id(self) -> str:
        return self._signer.key_id

    def checkpoint(self, *, force: bool = False) -> Checkpoint:
        """Sign and append the committed head; without `force`, an unchanged head is not
        written again and the previous checkpoint is returned."""
        with self._lock:
            head = self._audit.committed_head()
            seq, digest = (0, GENESIS_HASH) if head is None else (head.seq, head.hash)
            last = self._last
            if not force and last is not None and (last.seq, last.hash) == (seq, digest):
                return last
            # Seqs run 1, 2, ... without gaps, so the head's seq is the event count.
            checkpoint = self._signer.sign(seq, digest, seq, self._clock.now())
            # Another server on the same database and data dir may have signed a newer head:
            # then that one stands (see append_unless_behind).
            checkpoint = self._file.append_unless_behind(checkpoint)
            self._last = checkpoint
            # Under the lock: listeners see checkpoints in the order they were signed.
            self._on_checkpoint(checkpoint)
            return checkpoint

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every interval until `stop`; a failed write is logged and tried next tick."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.checkpoint)
            except Exception:
                _log.exception("audit checkpoint failed; retrying next interval")

    def _signed_by_me(self, checkpoint: Checkpoint) -> bool:
        """The file's last line is not verified when read: only one this key signed is passed
        on as this server's checkpoint."""
        if checkpoint.key_id != self._signer.key_id:
            return False
        try:
            checkpoint.verify_signature(self._signer.public_key())
        except AuditCheckpointError:
            return False
        return True

    def _warn_if_behind(self) -> None:
        """A log that starts behind its own last checkpoint was cut back while the server was
        down: say so now (verify --anchor names it too; no checkpoint is written behind the
        last one until the head passes it)."""
        head = self._audit.committed_head()
        last = self._last
        if last is None or last.key_id != self._signer.key_id:
            return
        seq = 0 if head is None else head.seq
        if seq < last.seq:
            _log.error(
                "audit log is behind its last checkpoint: events were removed while the server "
                "was down; run `svid-server audit verify --anchor`",
                extra={"head_seq": seq, "checkpoint_seq": last.seq},
            )
