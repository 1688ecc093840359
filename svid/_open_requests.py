"""The requests an adapter is serving, indexed by the credentials they were admitted with, so a
revocation can end the ones it hits: a streamed response (SSE) of a task that has just ended
must not keep flowing until the client hangs up. The MCP sessions those requests open are held
here too, with what admitted them, so revocation and stale revocation data (the staleness
watch) end them the way they end requests.

Revocation callbacks arrive on the source's thread or its loop; each request is ended on its
own loop, through the callback it registered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from svid._caller import Caller
from svid._errors import SpiffeIdError
from svid._revocation import KIND_JWT_ID, KIND_TASK, KIND_X509_SERIAL, CertKey, cert_key
from svid._source_state import RevocationEvent, named_task, task_id_of
from svid._spiffe_id import SpiffeId
from svid._task_claims import _MAX_ACT_DEPTH

Key = tuple[str, str | CertKey]
JWT, X509 = "jwt", "x509"  # what admitted a request or session (Admitted.admitted_by)
# A task: its end says so (a KIND_TASK revocation), and revokes its X.509-SVID with every
# other credential of it still live. A token of its SPIFFE ID alone says nothing of the task:
# one delegated from it (a token exchange acting for another workload) is revoked, the task
# going on, when that workload's agent is removed.
TXN = "txn"
# A certificate by issuer and serial, as a CRL's entry revokes it (svid._revocation.CertKey).
X509_ISSUED = "x509_issued"
# A task by its whole SPIFFE ID, where what admitted a request names it: a task ID is unique
# only within its runtime and trust domain, and the end of another's with the same ID must
# not end this one's requests. Such a request is keyed by its task ID as TXN_ONLY, which only
# an end naming no identity hits (an agent from before ends carried one: matched on the ID).
TASK_IDENTITY = "task_identity"
TXN_ONLY = "txn_only"


def _task_keys(task_id: str, identities: tuple[str, ...]) -> tuple[Key, ...]:
    if not identities:
        return ((TXN, task_id),)
    return (*((TASK_IDENTITY, i) for i in identities), (TXN_ONLY, task_id))


def _parsed_task(value: object, task_id: str) -> str | None:
    """`value` (a SpiffeId, or a claim's string) as a task SPIFFE ID of `task_id`, or None
    when it is not one."""
    if isinstance(value, SpiffeId):
        sid = value  # the caller's own, parsed already: not printed to be parsed again
    elif not isinstance(value, str) or not value:
        return None
    else:
        try:
            sid = SpiffeId.parse(value)
        except SpiffeIdError:
            return None
    named = named_task(sid, task_id)
    return None if named is None else str(named)


def _token_tasks(caller: Caller, task_id: str) -> tuple[str, ...]:
    """The task SPIFFE IDs of `task_id` a task token names: its `sub`, and each actor of its
    `act` chain (an exchange's `sub` is the principal, the task an actor). All of them, not
    the first found: a delegated token's current actor may itself be a task identity with
    that ID (another trust domain's, whose IDs it picks), and keyed on it alone, the end of
    the task the token was minted for (named by its own identity) left its requests open."""
    found: list[str] = []
    candidates: list[object] = [caller.spiffe_id]
    act = caller.claims.get("act")
    while isinstance(act, dict) and len(candidates) <= _MAX_ACT_DEPTH:
        candidates.append(act.get("sub"))
        act = act.get("act")
    for value in candidates:
        named = _parsed_task(value, task_id)
        if named is not None and named not in found:
            found.append(named)
    return tuple(found)


def caller_keys(caller: Caller) -> tuple[Key, ...]:
    """What revokes this caller's admission: its token's jti, its task, its peer's serials.
    Read when a revocation finds the admission open (or a session opens), not per request."""
    keys: list[Key] = []
    jti = caller.jti
    if jti is not None:
        keys.append((KIND_JWT_ID, jti))
    task_id = caller.task_id
    if task_id is not None:
        keys.extend(_task_keys(task_id, _token_tasks(caller, task_id)))
    peer = caller.x509
    if peer is not None:
        # A task's X.509-SVID cut to a CA's notAfter (a CA rotation within the task) expires
        # before the end and is not revoked then: the end (its task's key) closes what it
        # admitted.
        peer_task = task_id_of(peer.spiffe_id)
        if peer_task is not None:
            keys.extend(k for k in _task_keys(peer_task, (str(peer.spiffe_id),)) if k not in keys)
        td = peer.spiffe_id.trust_domain.name
        for cert in peer.chain:
            issued = cert_key(td, cert)
            keys.append((KIND_X509_SERIAL, issued[2]))
            keys.append((X509_ISSUED, issued))
    return tuple(keys)


def _ended_task_keys(event: RevocationEvent, task_id: str) -> tuple[Key, ...]:
    """What a task's end hits: requests of that task identity when the event names it (and
    those whose identity is unknown, by ID), else every request of the task ID."""
    identity = named_task(event.spiffe_id, task_id)
    if identity is None:
        return ((TXN, task_id), (TXN_ONLY, task_id))
    return ((TXN, task_id), (TASK_IDENTITY, str(identity)))


def event_keys(event: RevocationEvent) -> tuple[Key, ...]:
    if event.kind == KIND_TASK:
        # The task ended: what its tokens opened goes too, though the token that opened it
        # expired before the end (none revoked then) and the task had no X.509-SVID.
        return _ended_task_keys(event, event.value)
    issuer = event.issuer
    keys: list[Key] = [
        (event.kind, event.value) if issuer is None else (X509_ISSUED, issuer.key(event.value))
    ]
    if event.txn is not None and event.kind != KIND_JWT_ID:
        keys.extend(_ended_task_keys(event, event.txn))
    return tuple(keys)


class Revocable(Protocol):
    """What OpenRequests holds: the keys that revoke it (read once, when a revocation first
    finds it open), and ``end()`` (called once, from any thread, when one of them is
    revoked)."""

    @property
    def keys(self) -> tuple[Key, ...]: ...

    def end(self) -> None: ...


class Admitted:
    """What a request or session was admitted with, read from its verified Caller only when
    asked (most requests are answered before anyone asks): the keys that revoke it, which
    verifier admitted it and its mTLS peer's chain (what the staleness watch asks about)."""

    __slots__ = ("_caller", "_cert_keys")

    def __init__(self, caller: Caller) -> None:
        self._caller = caller
        self._cert_keys: tuple[CertKey, ...] | None = None

    @property
    def keys(self) -> tuple[Key, ...]:
        # Read only by a revocation that finds it open: most requests never are.
        return caller_keys(self._caller)

    @property
    def cert_keys(self) -> tuple[CertKey, ...]:
        """Its mTLS peer's chain as CertKeys (none for a bearer token): the staleness watch
        reads them at each look, so they are made once."""
        keys = self._cert_keys
        if keys is None:
            peer = self._caller.x509
            if peer is None:
                keys = ()
            else:
                td = peer.spiffe_id.trust_domain.name
                keys = tuple(cert_key(td, cert) for cert in peer.chain)
            self._cert_keys = keys
        return keys

    @property
    def admitted_by(self) -> str:
        """Which verifier admitted it (the staleness watch ends a refusing one's only): a
        bearer token's (a JWT-SVID, or an access token: svid.mcp) unless an mTLS peer's."""
        return X509 if self._caller.x509 is not None else JWT


class CallerAdmission(Admitted):
    """A session (or request) held open by ``caller``'s admission; ``end`` is called once,
    from any thread, when a revocation hits it or its verifier would now refuse it."""

    __slots__ = ("end",)

    def __init__(self, caller: Caller, end: Callable[[], None]) -> None:
        super().__init__(caller)
        self.end = end


class Admission:
    """One request or session known by its keys alone (no verifier to ask about stale data:
    only a revocation ends it); ``end`` is called when revoked."""

    __slots__ = ("end", "keys")

    def __init__(self, keys: tuple[Key, ...], end: Callable[[], None]) -> None:
        self.keys = keys
        self.end = end


class OpenRequests:
    """The index: each key maps to the one request admitted with it or, when several share it
    (a task's stream and its calls), to a set of them; no set is made for a key of its own.

    A request is indexed only when a revocation arrives while it is still open: until then it
    waits in a plain set, and most requests (answered before any revocation) are closed from
    there. Admission is then a set insert, and a request's keys are read only if it lives to
    meet a revocation; each one is indexed at most once (one with no keys stays in the set)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Key, Revocable | set[Revocable]] = {}
        self._unindexed: set[Revocable] = set()

    def __len__(self) -> int:
        with self._lock:
            held = self._by_key.values()
            indexed = {a for h in held for a in (h if isinstance(h, set) else (h,))}
            return len(indexed | self._unindexed)

    def open(self, keys: tuple[Key, ...], end: Callable[[], None]) -> Admission:
        admission = Admission(keys, end)
        self.add(admission)
        return admission

    def admit(self, caller: Caller, end: Callable[[], None]) -> CallerAdmission:
        """Hold what ``caller`` was admitted to until it closes: revocations of its
        credentials, and the staleness watch, end it through ``end``."""
        admission = CallerAdmission(caller, end)
        self.add(admission)
        return admission

    def add(self, admission: Revocable) -> None:
        with self._lock:
            self._unindexed.add(admission)

    def close(self, admission: Revocable) -> None:
        with self._lock:
            unindexed = self._unindexed
            if admission in unindexed:
                unindexed.discard(admission)
                return
            by_key = self._by_key
            for key in admission.keys:
                held = by_key.get(key)
                if held is admission:
                    del by_key[key]
                elif isinstance(held, set):
                    held.discard(admission)
                    if not held:
                        del by_key[key]

    def _index(self) -> None:
        """Index every request admitted since the last revocation (under the lock)."""
        by_key = self._by_key
        # One with no keys (a token without jti or task) no revocation can name, but it is still
        # open: left where take_where and empty (the staleness watch) see it.
        keyless: set[Revocable] = set()
        for admission in self._unindexed:
            keys = admission.keys
            if not keys:
                keyless.add(admission)
                continue
            for key in keys:
                # One lookup for a key of its own too (get, then set, would take two).
                held = by_key.setdefault(key, admission)
                if held is admission:
                    continue
                if isinstance(held, set):
                    held.add(admission)
                else:
                    by_key[key] = {held, admission}
        self._unindexed = keyless

    def empty(self) -> bool:
        """Whether nothing is open (read without the lock: a watcher's hint, not a count)."""
        return not self._unindexed and not self._by_key

    def take_where(self, wanted: Callable[[Revocable], bool]) -> list[Revocable]:
        """Remove and return the open requests ``wanted`` says yes to."""
        with self._lock:
            found = {a for a in self._unindexed if wanted(a)}
            for held in self._by_key.values():
                found.update(a for a in (held if isinstance(held, set) else (held,)) if wanted(a))
        for admission in found:
            self.close(admission)
        return list(found)

    def hit(self, keys: Iterable[Key]) -> list[Revocable]:
        """Remove and return the requests admitted with any of ``keys``."""
        with self._lock:
            if self._unindexed:
                self._index()
            found: set[Revocable] = set()
            for key in keys:
                held = self._by_key.get(key)
                if isinstance(held, set):
                    found.update(held)
                elif held is not None:
                    found.add(held)
        for admission in found:
            self.close(admission)
        return list(found)

    def on_revoked(self, event: RevocationEvent) -> None:
        """A source's on_revoked callback: end every request the revocation hits."""
        for admission in self.hit(event_keys(event)):
            admission.end()
