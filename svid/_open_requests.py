"""The requests an adapter is serving, indexed by the credentials they were admitted with, so a
revocation can end the ones it hits: a streamed response (SSE) of a task that has just ended
must not keep flowing until the client hangs up.

Revocation callbacks arrive on the source's thread or its loop; each request is ended on its
own loop, through the callback it registered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from svid._caller import Caller
from svid._revocation import KIND_JWT_ID, KIND_X509_SERIAL
from svid._source_state import RevocationEvent

Key = tuple[str, str]
TXN = "txn"  # a task: every credential of an ended task is revoked together


def caller_keys(caller: Caller) -> tuple[Key, ...]:
    """What revokes this caller's admission: its token's jti, its task, its peer's serials."""
    keys: list[Key] = []
    jti = caller.jti
    if jti is not None:
        keys.append((KIND_JWT_ID, jti))
    task_id = caller.task_id
    if task_id is not None:
        keys.append((TXN, task_id))
    if caller.x509 is not None:
        keys.extend((KIND_X509_SERIAL, format(c.serial_number, "x")) for c in caller.x509.chain)
    return tuple(keys)


def event_keys(event: RevocationEvent) -> tuple[Key, ...]:
    keys: list[Key] = [(event.kind, event.value)]
    if event.txn is not None:
        keys.append((TXN, event.txn))
    return tuple(keys)


class Admission:
    """One request being served; ``end`` is called (once, from any thread) when revoked."""

    __slots__ = ("end", "keys")

    def __init__(self, keys: tuple[Key, ...], end: Callable[[], None]) -> None:
        self.keys = keys
        self.end = end


class OpenRequests:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Key, set[Admission]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len({a for group in self._by_key.values() for a in group})

    def open(self, keys: tuple[Key, ...], end: Callable[[], None]) -> Admission:
        admission = Admission(keys, end)
        with self._lock:
            for key in keys:
                self._by_key.setdefault(key, set()).add(admission)
        return admission

    def close(self, admission: Admission) -> None:
        with self._lock:
            for key in admission.keys:
                group = self._by_key.get(key)
                if group is not None:
                    group.discard(admission)
                    if not group:
                        del self._by_key[key]

    def hit(self, keys: Iterable[Key]) -> list[Admission]:
        """Remove and return the requests admitted with any of ``keys``."""
        with self._lock:
            found = {a for key in keys for a in self._by_key.get(key, ())}
        for admission in found:
            self.close(admission)
        return list(found)

    def on_revoked(self, event: RevocationEvent) -> None:
        """A source's on_revoked callback: end every request the revocation hits."""
        for admission in self.hit(event_keys(event)):
            admission.end()
