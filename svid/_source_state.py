"""What a Workload API source knows, and how each stream message changes it. No I/O and no
waiting: the thread-driven and the asyncio sources feed the same state from their loops.

Streams (svid._workload_calls): FetchX509SVID (this workload's own SVIDs), FetchX509Bundles
(authorities and CRLs), FetchJWTBundles, and the agent's Revocations/Watch. Every message is full
state; a revocation that joins the set is announced to ``on_revoked`` subscribers after verifiers
already refuse it.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from svid._bundle import BundleSet, JwtBundle
from svid._clock import Clock
from svid._crl import revoked_from_crls
from svid._errors import SpiffeIdError, SvidError
from svid._revocation import (
    KIND_TASK,
    KIND_X509_SERIAL,
    CertIssuer,
    CertKey,
    RevocationSet,
    Revoked,
    cert_key,
    normalize_serial,
)
from svid._source import MemoryBundleSource
from svid._spiffe_id import SpiffeId
from svid._workload_calls import (
    JWT_BUNDLES,
    REVOCATIONS,
    X509_BUNDLES,
    X509_SVIDS,
    RevocationsUpdate,
    X509BundlesUpdate,
)
from svid._workload_errors import WorkloadApiError
from svid._x509 import X509Svid

log = logging.getLogger("svid.workloadapi")

TASK_SEGMENT = "task"  # a task's SPIFFE ID is <runtime ID>/task/<task id> (AGENTIC.md)


def task_id_of(spiffe_id: SpiffeId | None) -> str | None:
    """The task ID a task's SPIFFE ID ends with; None for any other identity."""
    segments = spiffe_id.segments if spiffe_id is not None else ()
    if len(segments) >= 2 and segments[-2] == TASK_SEGMENT:
        return segments[-1]
    return None


def named_task(spiffe_id: SpiffeId | None, task_id: str) -> SpiffeId | None:
    """`spiffe_id` when it is a task identity of `task_id`, else None. A task's end names the
    identity of the task that ended: a task ID is unique only within its runtime and trust
    domain, and another's end with the same ID must not end this one. An end naming none (an
    agent from before ends carried one) is matched on the task ID alone."""
    return spiffe_id if task_id_of(spiffe_id) == task_id else None


@dataclass(frozen=True, slots=True)
class RevocationEvent:
    """A credential that has just joined the revocation set.

    ``value`` is the X.509 serial (lowercase hex) or the JWT ``jti``; for ``kind`` "task"
    (KIND_TASK) no credential but a task that ENDED, ``value`` its id: everything of the task
    is over. ``spiffe_id`` is the credential's identity when known (the agent sent it, or it
    is one of this workload's own SVIDs), else None; for a task's credential, ``task_id`` and
    ``txn`` (a task token's ``txn`` is its task id) follow. ``issuer``: the one issuer whose
    serial it is (a CRL's entry), or None for the serial whoever issued it; ``revokes`` tells
    whether it hits a certificate.
    """

    kind: str
    value: str
    expires_at: float
    spiffe_id: SpiffeId | None = None
    issuer: CertIssuer | None = None

    def revokes(self, key: CertKey) -> bool:
        """Whether this revocation hits the certificate ``key`` names (svid._revocation)."""
        return Revoked(self.kind, self.value, self.expires_at, issuer=self.issuer).revokes(key)

    @property
    def task_id(self) -> str | None:
        if self.kind == KIND_TASK:
            return self.value
        return task_id_of(self.spiffe_id)

    @property
    def txn(self) -> str | None:
        return self.task_id


RevokedCallback = Callable[[RevocationEvent], Any]
# A revocation as the set tells it from others (_key): kind, value, issuer, task identity.
_Key = tuple[str, str, CertIssuer | None, str]


class SourceState:
    """The bundles, revocations and SVIDs a source holds, updated one stream message at a time.

    ``streams`` names the calls the source runs; it is ready once every one of them but the
    revocation stream has delivered.
    """

    def __init__(
        self,
        streams: Iterable[str],
        revocations: RevocationSet,
        clock: Clock,
        *,
        schedule: Callable[[Any], None] | None = None,
    ) -> None:
        self.streams = tuple(streams)
        # Where coroutines that on_revoked callbacks return go (an asyncio source's loop).
        self._schedule = schedule
        self.bundles = MemoryBundleSource()
        self.revocations = revocations
        self.clock = clock
        self.errors: dict[str, str] = {}  # last error per stream, for diagnostics
        self.rejected_crls: tuple[str, ...] = ()
        self.revocation_stream_supported: bool | None = None
        self.svids: tuple[X509Svid, ...] = ()
        self._lock = threading.Lock()
        self._delivered: set[str] = set()
        self._live: dict[str, float] = {}  # stream -> when it last delivered, while it is up
        self._bundle_crls: tuple[bytes, ...] = ()
        self._stream_crls: tuple[bytes, ...] = ()
        self._stream_items: tuple[Revoked, ...] = ()
        self._have_x509 = False  # CRLs are judged against bundles only once there are some
        self._revoked: frozenset[_Key] = frozenset()
        self._subscribers: list[RevokedCallback] = []
        # Until the feed delivers, the set is not known to be complete.
        self.revocations.feed_lost(None)
        self._apply: dict[str, Callable[[Any], None]] = {
            X509_SVIDS.name: self._on_svids,
            X509_BUNDLES.name: self._on_x509,
            JWT_BUNDLES.name: self._on_jwt,
            REVOCATIONS.name: self._on_revocations,
        }

    # --- readiness ---

    @property
    def ready(self) -> bool:
        required = (s for s in self.streams if s != REVOCATIONS.name)
        return all(s in self._delivered for s in required)

    def not_ready_reason(self) -> str:
        missing = [s for s in self.streams if s != REVOCATIONS.name and s not in self._delivered]
        errors = "; ".join(f"{s}: {self.errors[s]}" for s in missing if s in self.errors)
        return f"no answer yet on {', '.join(missing)}" + (f" ({errors})" if errors else "")

    # --- stream events ---

    def delivered(self, stream: str, update: Any) -> None:
        """Apply one message of ``stream``."""
        self._apply[stream](update)
        with self._lock:
            self._delivered.add(stream)
            self._live[stream] = self.clock.now()
            self.errors.pop(stream, None)
        if stream == self._revocation_feed():
            # A live stream from an agent cut off from its server (behind > 0) brings a list
            # as old as the agent says, and no revocation made at the server meanwhile.
            behind = update.behind if stream == REVOCATIONS.name else 0.0
            if behind > 0:
                self.revocations.feed_behind(self.clock.now(), self.clock.monotonic(), behind)
            else:
                self.revocations.feed_delivered(self.clock.now())

    def failed(self, stream: str, exc: Exception | None) -> bool:
        """``stream`` broke (``exc`` None: it ended); True when it should not be opened again.

        Both sources' loops hand every exception here, not only SvidErrors: one from applying
        an update (a bug, or a library raising what we did not foresee) makes that update
        unusable like any other. The stream is reopened with backoff for a fresh full state,
        and the revocation data ages meanwhile (a loop that died instead would leave the
        bundles and revocations frozen while still counted as live)."""
        with self._lock:
            self._live.pop(stream, None)
        if stream == self._revocation_feed():
            self.revocations.feed_lost(self.clock.monotonic(), self.clock.now())
        if isinstance(exc, WorkloadApiError):
            if stream == REVOCATIONS.name and exc.code == "UNIMPLEMENTED":
                self.revocation_stream_supported = False
                log.info("agent has no revocation stream; using CRLs from the bundles only")
                self._feed_switched()
                return True
            if exc.code == "PERMISSION_DENIED":
                self._identity_gone(stream)
            self.errors[stream] = str(exc)
            log.warning("%s", exc)  # it names the call: "Workload API <call>: ..."
        elif isinstance(exc, SvidError):  # an update we could not apply: reconnect for a fresh one
            self.errors[stream] = str(exc)
            log.warning("Workload API %s: unusable update: %s", stream, exc)
        elif exc is not None:  # unforeseen: the traceback says where
            self.errors[stream] = f"{type(exc).__name__}: {exc}"
            log.error("Workload API %s: unusable update", stream, exc_info=exc)
        else:
            self.errors[stream] = "stream ended"
        return False

    def _identity_gone(self, stream: str) -> None:
        """The agent holds no identity for this workload any more (or is itself refused): drop
        what ``stream`` gave. It no longer backs it: SVIDs that may be revoked, and bundles
        that would verify peers for ever, never updated, with keys since withdrawn."""
        if stream == X509_SVIDS.name:
            self.svids = ()
        elif stream == X509_BUNDLES.name:
            self.bundles.set_x509_bundles(BundleSet())
        elif stream == JWT_BUNDLES.name:
            self.bundles.set_jwt_bundles(BundleSet())
        # The revocation set is left alone: forgetting revocations could only admit more.

    def _revocation_feed(self) -> str:
        """The stream whose liveness says whether the revocation set is complete."""
        if REVOCATIONS.name in self.streams and self.revocation_stream_supported is not False:
            return REVOCATIONS.name
        return X509_BUNDLES.name

    def _feed_switched(self) -> None:
        with self._lock:
            since = self._live.get(self._revocation_feed())
        if since is not None:
            self.revocations.feed_delivered(since)
        else:
            self.revocations.feed_lost(None)

    # --- applying messages ---

    def _on_svids(self, svids: list[X509Svid]) -> None:
        self.svids = tuple(svids)

    def _on_x509(self, update: X509BundlesUpdate) -> None:
        self.bundles.set_x509_bundles(update.bundles)
        with self._lock:
            self._bundle_crls = update.crls
            self._have_x509 = True
        self._publish_revocations()  # new authorities may vouch for (or drop) CRLs

    def _on_jwt(self, update: BundleSet[JwtBundle]) -> None:
        self.bundles.set_jwt_bundles(update)

    def _on_revocations(self, update: RevocationsUpdate) -> None:
        self.revocation_stream_supported = True
        items = tuple(_usable(update.items))
        with self._lock:
            self._stream_items, self._stream_crls = items, update.crls
        self._publish_revocations()

    def _publish_revocations(self) -> None:
        with self._lock:
            # Before the first bundles no CRL can be vouched for; judging them then only warns
            # about good CRLs that arrived first on the revocation stream (they are kept).
            crls = tuple(dict.fromkeys(self._bundle_crls + self._stream_crls))
            if not self._have_x509:
                crls = ()
            result = revoked_from_crls(crls, self.bundles.x509_bundles)
            self.rejected_crls = result.rejected
            for message in result.rejected:
                log.warning("ignoring CRL: %s", message)
            items = self._stream_items + result.revoked
            self.revocations.replace(items, result.next_update, result.pending)
            now = self.clock.now()
            for issuer, until in result.next_update.items():
                if now > until:
                    log.warning(
                        "a CRL of trust domain %s is %.0fs past its nextUpdate: its entries still "
                        "apply; verifiers with max_revocation_staleness refuse its certificates "
                        "past that bound",
                        issuer.trust_domain,
                        now - until,
                    )
            keys = {_key(item): item for item in items}
            # A CRL's entry for a serial the agent's list revokes whoever the issuer adds nothing
            # (ending a task puts its serial in both): announced, it would end things twice.
            bare = {key[1] for key in keys if key[0] == KIND_X509_SERIAL and key[2] is None}
            added = [
                item
                for key, item in keys.items()
                if key not in self._revoked and not (key[2] is not None and key[1] in bare)
            ]
            self._revoked = frozenset(keys)
            subscribers = list(self._subscribers)
        if added and subscribers:
            self._announce(added, subscribers)

    # --- revocation subscribers ---

    def subscribe(self, callback: RevokedCallback) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _announce(self, added: list[Revoked], subscribers: list[RevokedCallback]) -> None:
        own = [(cert_key(s.spiffe_id.trust_domain.name, s.leaf), s.spiffe_id) for s in self.svids]
        for item in added:
            value = _key(item)[1]
            spiffe_id = said_id(item) or next((sid for k, sid in own if item.revokes(k)), None)
            event = RevocationEvent(item.kind, value, item.expires_at, spiffe_id, item.issuer)
            for callback in subscribers:
                try:
                    result = callback(event)
                    if inspect.isawaitable(result):
                        self._run_awaitable(result)
                except Exception:
                    # One subscriber's bug must not stop the stream that feeds every verifier.
                    log.exception("on_revoked callback %r failed", callback)

    def _run_awaitable(self, awaitable: Any) -> None:
        if self._schedule is not None:
            self._schedule(awaitable)
            return
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        log.error("an on_revoked callback returned a coroutine; only asyncio sources run those")


def said_id(item: Revoked) -> SpiffeId | None:
    """The SPIFFE ID the agent sent with a revocation, if any and well formed."""
    if not item.spiffe_id:
        return None
    try:
        return SpiffeId.parse(item.spiffe_id)
    except SpiffeIdError:
        return None


def _key(item: Revoked) -> _Key:
    """What tells one revocation from another: a serial by its issuer; a task's end by the
    task identity it names too (a task ID is unique only within its runtime and trust domain,
    and another task's end with the same ID must not hide this one's)."""
    if item.kind == KIND_X509_SERIAL:
        return item.kind, normalize_serial(item.value), item.issuer, ""
    if item.kind == KIND_TASK:
        return item.kind, item.value, None, item.spiffe_id
    return item.kind, item.value, None, ""


def _usable(items: Iterable[Revoked]) -> Iterable[Revoked]:
    """The entries this library understands; one bad entry must not drop the whole list."""
    for item in items:
        try:
            RevocationSet([item])
        except SvidError as exc:
            log.warning("ignoring revocation entry of kind %r: %s", item.kind, exc)
            continue
        yield item
