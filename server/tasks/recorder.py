"""Batched, off-the-hot-path recording of issued credentials and their audit events.

Every X.509-SVID and JWT-SVID the server signs is recorded (so eviction and task end can revoke
it) and audited. Doing that with an fsync per signature would cost more than the signature, so
issuance only enqueues; a writer thread commits what has queued up through the ledger: the
credential rows and their audit events in one transaction. Anything that revokes calls `flush()`
first, so nothing issued before a revocation is missed.

Durability: a record waits at most MAX_DELAY in memory before its commit, so a server crash can
lose that window of issuance records (never an acknowledged admin write). Such credentials still
expire on their minute-scale TTLs; they just cannot be named on a revocation list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from server.audit.log import DraftTuple
from server.tasks.model import Credential

_log = logging.getLogger("svid.server.tasks")
MAX_DELAY = 0.02  # seconds a record may wait for company before it is written


class LedgerWriter(Protocol):
    def record(self, credentials: Sequence[Credential], events: Sequence[DraftTuple]) -> None:
        """Commit both in one transaction; durable when this returns (server.ledger.Ledger)."""
        ...


class IssuanceRecorder:
    def __init__(self, ledger: LedgerWriter) -> None:
        self._ledger = ledger
        self._cond = threading.Condition()
        self._creds: list[Credential] = []
        self._events: list[DraftTuple] = []
        self._write_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="svid-recorder", daemon=True)
        self._thread.start()

    def add(self, creds: Sequence[Credential], events: Sequence[DraftTuple]) -> None:
        """Queue; `events` are audit drafts as plain tuples (AuditLog.append_tuples)."""
        with self._cond:
            idle = not (self._creds or self._events)
            self._creds.extend(creds)
            self._events.extend(events)
            # Only the first record of a burst wakes the writer; it then gathers the rest for
            # MAX_DELAY. (Waking it on every add ended its wait at the next JWT, so a stream of
            # single JWTs cost a transaction, and an fsync per database, every few tokens.)
            if idle:
                self._cond.notify()

    def flush(self) -> None:
        """Write everything queued so far (the caller waits for it)."""
        with self._write_lock:
            with self._cond:
                creds, self._creds = self._creds, []
                events, self._events = self._events, []
            if creds or events:
                self._ledger.record(creds, events)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._creds or self._events or self._closed):
                    self._cond.wait()
                if self._closed and not (self._creds or self._events):
                    return
                # Let a burst (a batch of signatures) gather into one transaction: MAX_DELAY
                # from the first record queued, whatever arrives meanwhile.
                deadline = time.monotonic() + MAX_DELAY
                while not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            try:
                self.flush()
            except Exception:
                _log.exception("recording issued credentials failed")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(10)
        self.flush()
