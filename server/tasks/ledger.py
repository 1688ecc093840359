"""The ledger port (server.issuance.ledger) over today's stores: credential rows in tasks.db,
audit events in audit.db. The one module to replace when both move into the main datastore.

Group commit: callers queue their rows and wait; one writer thread takes everything queued,
writes the credentials in one transaction and the events in one audit append, then wakes
every caller whose rows it wrote. While it writes, the next group gathers, so the number of
fsyncs follows the storage's speed, not the number of calls.

The two files are written at the same time (the credential rows on a helper thread): a caller
waits for one fsync's latency, not two in a row. So when one write fails and the other does
not, a record or an event may name a credential that was then refused to its caller and never
sent; never the reverse.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from server.audit import AuditError, AuditLog
from server.audit.log import check_draft_tuple
from server.issuance.ledger import Credential, EventTuple, LedgerUnavailableError
from server.tasks.store import TaskStore

_log = logging.getLogger("svid.server.ledger")

# What a failed write means, from the words SQLite and the OS use for it.
_REASONS = (
    ("disk full", ("database or disk is full", "no space left")),
    ("read-only", ("readonly database", "read-only file system")),
    ("I/O error", ("disk i/o error", "input/output error")),
)
_ERRNO_REASONS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only", errno.EIO: "I/O error"}


def failure_reason(exc: BaseException) -> str:
    """A short, path-free name for why a write failed (for logs and metric labels)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[seen.errno]
        text = str(seen).lower()
        for reason, words in _REASONS:
            if any(w in text for w in words):
                return reason
        seen = seen.__cause__ or seen.__context__
    return "audit log" if isinstance(exc, AuditError) else "storage error"


Done = Callable[[BaseException | None], None]


class _Pending:
    __slots__ = ("credentials", "done", "events")

    def __init__(
        self, credentials: Sequence[Credential], events: Sequence[EventTuple], done: Done
    ) -> None:
        self.credentials = credentials
        self.events = events
        self.done = done


class StoreLedger:
    """Implements server.issuance.ledger.Ledger; see that module for the contract."""

    def __init__(self, store: TaskStore, audit: AuditLog) -> None:
        self._store = store
        self._audit = audit
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._queued = 0  # groups queued so far
        self._written = 0  # groups whose write has finished (committed or failed)
        self._closed = False
        self._records = ThreadPoolExecutor(1, thread_name_prefix="svid-ledger-records")
        self._thread = threading.Thread(target=self._loop, name="svid-ledger", daemon=True)
        self._thread.start()

    async def commit(self, credentials: Sequence[Credential], events: Sequence[EventTuple]) -> None:
        if not credentials and not events:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if future.done():  # the caller went away; its rows were written all the same
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        def done(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(settle, error)

        self._enqueue(credentials, events, done)
        await future

    def commit_blocking(
        self, credentials: Sequence[Credential], events: Sequence[EventTuple]
    ) -> None:
        """`commit` for a caller on a plain thread."""
        finished = threading.Event()
        failure: list[BaseException] = []

        def done(error: BaseException | None) -> None:
            if error is not None:
                failure.append(error)
            finished.set()

        self._enqueue(credentials, events, done)
        finished.wait()
        if failure:
            raise failure[0]

    def _enqueue(
        self, credentials: Sequence[Credential], events: Sequence[EventTuple], done: Done
    ) -> None:
        with self._cond:
            if self._closed:
                raise LedgerUnavailableError("shutting down")
            self._queue.append(_Pending(credentials, events, done))
            self._queued += 1
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until everything queued before this call is written (committed or failed)."""
        with self._cond:
            target = self._queued
            while self._written < target and self._thread.is_alive():
                self._cond.wait(0.5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                group, self._queue = self._queue, []
            try:
                self._write(group)
            finally:
                with self._cond:
                    self._written += len(group)
                    self._cond.notify_all()

    def _write(self, group: list[_Pending]) -> None:
        # A caller whose event the audit log would refuse (a value that looks like a secret)
        # fails alone, not the group it happened to share a commit with.
        accepted: list[_Pending] = []
        for pending in group:
            try:
                for values in pending.events:
                    check_draft_tuple(values)
            except AuditError as exc:
                pending.done(exc)
            else:
                accepted.append(pending)
        credentials = [c for p in accepted for c in p.credentials]
        events = [e for p in accepted for e in p.events]
        try:
            recorded = None
            if credentials:
                recorded = self._records.submit(self._store.record, credentials)
            try:
                if events:
                    self._audit.append_tuples(events, checked=True)
            finally:
                if recorded is not None:
                    recorded.result()
        except (sqlite3.Error, OSError, AuditError) as exc:
            failure = LedgerUnavailableError(failure_reason(exc))
            failure.__cause__ = exc
            for pending in accepted:
                pending.done(failure)
            return
        except BaseException as exc:  # a bug: the callers must not wait forever
            _log.exception("the ledger write failed unexpectedly")
            for pending in accepted:
                pending.done(exc)
            return
        for pending in accepted:
            pending.done(None)

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(10)
        self._records.shutdown(wait=True)
