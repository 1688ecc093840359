"""A datastore whose next ledger write is held until the test lets it go, and callers of one
AuditLog queued behind it: a group commit, made to happen on demand."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from server.audit import AuditLog
from server.datastore import DataStore, StorageError
from server.datastore.testing import FaultInjectingDataStore
from svid._clock import Clock


class HeldStore(FaultInjectingDataStore):
    """Holds the next ledger write until `release` is set, then writes it (`fails`: fails it)."""

    def __init__(self, inner: DataStore, *, fails: bool = False) -> None:
        super().__init__(inner)
        self.fails = fails
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def write_ledger(
        self, credentials: object, audit_rows: object, *a: object, **kw: object
    ) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(10)
            if self.fails:
                raise StorageError("cannot commit: disk I/O error")
        super().write_ledger(credentials, audit_rows, *a, **kw)  # type: ignore[arg-type]


class GroupCommit:
    """Callers of one AuditLog on `store` made to share a group commit: a lead whose ledger
    write `held` holds (`fails`: then fails), the rest queued behind it, then all let go at
    once. Each caller's outcome is kept by name: None where it returned, else what it raised."""

    def __init__(self, store: DataStore, clock: Clock, *, fails: bool = False) -> None:
        self.held = HeldStore(store, fails=fails)
        self.log = AuditLog(self.held, clock)
        self.outcomes: dict[str, BaseException | None] = {}
        self._threads: list[threading.Thread] = []

    def lead(self, name: str, run: Callable[[], object]) -> None:
        """Starts `run` and is back once its write is held: the callers started next queue."""
        self.held.armed = True
        self.queue({name: run})
        assert self.held.entered.wait(10)

    def queue(self, calls: dict[str, Callable[[], object]]) -> None:
        for name, run in calls.items():
            thread = threading.Thread(target=self._call, args=(name, run))
            thread.start()
            self._threads.append(thread)

    def wait_queued(self, count: int) -> None:
        """Back once `count` callers (those queued here and any others) wait for the commit
        after the lead's: no fewer, or a late one would commit alone, no more."""
        deadline = time.monotonic() + 10
        while len(self.log._tickets) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.log._tickets) == count

    def share(self, calls: dict[str, Callable[[], object]]) -> dict[str, BaseException | None]:
        """Queues `calls` behind the lead, lets them all go once they wait, and returns every
        caller's outcome (release)."""
        self.queue(calls)
        self.wait_queued(len(calls))
        return self.release()

    def release(self) -> dict[str, BaseException | None]:
        """Lets the lead's write go, and returns every caller's outcome once all are back."""
        self.held.release.set()
        for thread in self._threads:
            thread.join(10)
        return self.outcomes

    def _call(self, name: str, run: Callable[[], object]) -> None:
        try:
            run()
            self.outcomes[name] = None
        except BaseException as e:
            self.outcomes[name] = e
