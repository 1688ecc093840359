"""When to renew an SVID, and the loop that keeps every served entry's X.509-SVID fresh."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor import _crypto
from agent_attestor.cache import Cache
from agent_attestor.model import Entry, IssuedSvid
from agent_attestor.schedule import DueHeap
from agent_attestor.signer import SvidSigner
from svid._backoff import Retry
from svid._clock import Clock, ElapsedClock, format_utc
from svid._log_throttle import KeyedThrottles

log = logging.getLogger(__name__)

ROTATE_AT = 0.5
JITTER = 0.1
MAX_BATCH = 500
# Renewals come due one by one; waiting this long after one lets the next few join its batch (a
# CSR batch and a thread hop per SVID would cost more than the minting). 0.1 % of a 5 min TTL.
BATCH_WINDOW = 0.3
# Seconds between "SVID issuance failed" lines while issuance keeps failing (the server away):
# each retry, every retry_max seconds at most, wrote its own.
FAILURE_LOG_INTERVAL = 300.0


def _failure_kind(exc: BaseException) -> tuple[type[BaseException], object]:
    # A new kind (the server refusing, after it was away) is news, not one more of the same.
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
    return type(exc), code


def should_rotate(
    now: float, not_before: float, not_after: float, jitter: float = 0.0, arrived: float = 0.0
) -> bool:
    """Renew at half the lifetime, moved by `jitter` (a fraction of life, within ±JITTER)."""
    return now >= rotation_point(not_before, not_after, jitter, arrived=arrived)


def rotation_point(
    not_before: float, not_after: float, jitter: float = 0.0, *, arrived: float = 0.0
) -> float:
    """ROTATE_AT ± JITTER of the certificate's own NotBefore -> NotAfter span, back-dating
    included: that is how SPIRE and clients measure it, so a 30 s SVID renews within 0.4-0.6.

    Only if that point is not after `arrived` (a TTL shorter than the server's back-dating, or
    this clock ahead of the server's) does it fall to the same fraction of what is left after
    arrival: a point in the past would renew every fresh SVID at once, forever.
    """
    fraction = rotate_fraction(jitter)
    point = not_before + (not_after - not_before) * fraction
    if point <= arrived:
        point = arrived + (not_after - arrived) * fraction
    return point


def rotate_fraction(jitter: float) -> float:
    """The fraction of an SVID's life at which it is renewed: ROTATE_AT moved by `jitter`,
    held within ±JITTER."""
    return ROTATE_AT + max(-JITTER, min(JITTER, jitter))


class Serialled(Protocol):
    """An SVID known by its leaf's serial number (IssuedSvid, the agent's own AgentSvid)."""

    @property
    def serial_hex(self) -> str: ...


def jitter_for(svid: Serialled) -> float:
    """A per-SVID jitter in [-JITTER, JITTER], stable for the SVID so the decision never flaps,
    and different across SVIDs so renewals of many entries (and agents) spread out."""
    digest = hashlib.sha256(svid.serial_hex.encode()).digest()
    return (int.from_bytes(digest[:4], "big") / 0xFFFFFFFF * 2 - 1) * JITTER


def _make_requests(
    entries: Sequence[Entry],
) -> list[tuple[Entry, ec.EllipticCurvePrivateKey, bytes]]:
    out: list[tuple[Entry, ec.EllipticCurvePrivateKey, bytes]] = []
    for entry in entries:
        key = _crypto.new_key()
        out.append((entry, key, _crypto.make_csr(key, entry.spiffe_id)))
    return out


def renewal_due(svid: IssuedSvid) -> float:
    """When `svid` is to be renewed: computed once, when it arrives (its serial hashed once)."""
    return rotation_point(
        svid.not_before, svid.not_after, jitter_for(svid), arrived=svid.received_at
    )


class Rotator:
    """Issues SVIDs for new entries and renews old ones, pushing them into the cache at once.

    Nothing here scans the entries: renewal points wait in a heap (computed once per SVID),
    new and changed entries arrive through the cache's entry listener, and workloads asking for
    an SVID not held yet (`demand`) go first. With `max_prefetched` > 0 at most that many
    entries hold SVIDs (least recently used out), except those open streams are served; the
    rest are minted when a workload first asks.
    """

    def __init__(
        self,
        cache: Cache,
        signer: SvidSigner,
        clock: Clock,
        retry_min: float = 0.2,
        retry_max: float = 10.0,
        *,
        max_prefetched: int = 0,
        batch_window: float = BATCH_WINDOW,
    ) -> None:
        self._cache = cache
        self._signer = signer
        self._clock = clock
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._cap = max_prefetched
        self._batch_window = batch_window
        self._failures = 0
        self._failure_log = KeyedThrottles(FAILURE_LOG_INTERVAL, clock)
        self._wake = asyncio.Event()
        self._renew = DueHeap()  # entry id -> rotation point of its SVID
        self._expire = DueHeap()  # entry id -> NotAfter of its SVID
        # Entries asked for again after a wait of their own (the server refused them, or sent
        # an SVID expired on arrival): a wait is an interval, so on the elapsed clock, which a
        # step back of the wall clock does not put off by the step.
        self._elapsed = ElapsedClock(clock)
        self._retry = DueHeap()  # entry id -> when to ask again (elapsed clock)
        self._late: dict[str, Retry] = {}  # the back-off of entries whose SVIDs came expired
        self._pending: dict[str, None] = {}  # needs an SVID now (insertion-ordered)
        self._urgent: dict[str, None] = {}  # a workload is waiting for it: goes first
        self._held: OrderedDict[str, None] = OrderedDict()  # with a cap: LRU of entries served
        self._in_flight: set[str] = set()  # the batch at the server now
        self.issued_total = 0
        cache.on_entries(self._entries_changed)
        cache.on_distrusted(self._distrusted)
        self._adopt(cache.snapshot().svids.values())
        self._entries_changed(cache.snapshot().entries, ())

    def _adopt(self, svids: Iterable[IssuedSvid]) -> None:
        """Take on SVIDs already in the cache (restored from disk): renewed on their schedule
        and, with a cap, counted in it first; those past the cap are dropped, not minted."""
        over: list[str] = []
        for svid in svids:
            if self._cap and len(self._held) >= self._cap:
                over.append(svid.entry_id)
                continue
            if self._cap:
                self._held[svid.entry_id] = None
            self._schedule(svid)
        self._cache.drop_svids(over)

    # ---- what needs an SVID ----------------------------------------------------------------

    def _entries_changed(self, changed: Sequence[Entry], removed: Sequence[str]) -> None:
        for eid in removed:
            self._forget(eid)
        for entry in changed:
            if self._cache.svid(entry.id) is None:  # new, or its SVID no longer fits it
                self._unschedule(entry.id)
                if not self._cap or entry.id in self._held or len(self._held) < self._cap:
                    self._held[entry.id] = None
                    self._pending[entry.id] = None
        if changed or removed:
            self._wake.set()

    def _distrusted(self, entry_ids: Sequence[str]) -> None:
        """These entries' SVIDs were dropped, the bundle no longer verifying them: mint them now,
        not at their renewal point."""
        for eid in entry_ids:
            self._unschedule(eid)
            if self._cache.entry(eid) is not None:
                self._pending[eid] = None
        if entry_ids:
            self._wake.set()

    def _forget(self, eid: str) -> None:
        self._unschedule(eid)
        self._pending.pop(eid, None)
        self._urgent.pop(eid, None)
        self._held.pop(eid, None)

    def demand(self, entry_ids: Iterable[str]) -> None:
        """A workload asks for these entries' SVIDs: mint those not held first, and (with a cap)
        mark them most recently used."""
        now = self._clock.now()
        wanted = False
        for eid in entry_ids:
            if self._cap:
                self._held[eid] = None
                self._held.move_to_end(eid)
            svid = self._cache.svid(eid)
            if (svid is None or svid.not_after <= now) and eid not in self._in_flight:
                self._urgent[eid] = None
                self._pending.pop(eid, None)
                wanted = True
        if self._cap and len(self._held) > self._cap:
            self._evict()
        if wanted:
            self._wake.set()

    def _evict(self) -> None:
        """Down to the cap, least recently used first, sparing entries an open stream serves."""
        gone: list[str] = []
        in_use: list[str] = []
        excess = len(self._held) - self._cap
        for eid in self._held:
            if len(gone) >= excess:
                break
            if eid in self._urgent or self._cache.watchers.watched(eid):
                in_use.append(eid)
            else:
                gone.append(eid)
        # In use means recently used: moved to the young end, the next scan does not pass them.
        for eid in in_use:
            self._held.move_to_end(eid)
        for eid in gone:
            self._forget(eid)
        self._cache.drop_svids(gone)

    def nudge(self) -> None:
        """The server is back (or something changed): retry now instead of after the backoff."""
        self._failures = 0
        self._wake.set()

    # ---- the schedule ------------------------------------------------------------------------

    def _schedule(self, svid: IssuedSvid) -> None:
        self._unschedule(svid.entry_id)
        self._renew.set(svid.entry_id, renewal_due(svid))
        self._expire.set(svid.entry_id, svid.not_after)

    def _unschedule(self, eid: str) -> None:
        self._renew.discard(eid)
        self._expire.discard(eid)
        self._retry.discard(eid)
        self._late.pop(eid, None)

    def due(self) -> list[str]:
        """Entry ids to mint for now (they leave the schedule): waited-for first, then new or
        failed ones, then renewals in due order."""
        for eid in self._retry.pop_due(self._elapsed.monotonic()):
            self._pending.setdefault(eid, None)
        for eid in self._renew.pop_due(self._clock.now()):
            self._pending.setdefault(eid, None)
        out = [*self._urgent, *(e for e in self._pending if e not in self._urgent)]
        self._urgent.clear()
        self._pending.clear()
        return out

    def next_due_in(self) -> float | None:
        """Seconds until the next renewal, expiry or retry is due (None when none is)."""
        if self._pending or self._urgent:
            return 0.0
        now = self._clock.now()
        points = (self._renew.next_due(), self._expire.next_due())
        waits = [p - now for p in points if p is not None]
        retry = self._retry.next_due()
        if retry is not None:
            waits.append(retry - self._elapsed.monotonic())
        return max(0.0, min(waits)) if waits else None

    def _drop_expired(self, now: float) -> None:
        expired = []
        for eid in self._expire.pop_due(now):
            svid = self._cache.svid(eid)
            if svid is not None and svid.not_after <= now:
                expired.append(eid)
                self._renew.discard(eid)
                self._pending.setdefault(eid, None)
        if expired:
            self._cache.drop_svids(expired)
            log.warning("X.509-SVIDs expired before renewal", extra={"entries": len(expired)})

    async def tick(self) -> float | None:
        """Do the work that is due now; return how long until more is due (None: unknown)."""
        self._drop_expired(self._clock.now())
        urgent = set(self._urgent)
        due = self.due()
        if not due:
            return self.next_due_in()
        for start in range(0, len(due), MAX_BATCH):
            batch = due[start : start + MAX_BATCH]
            self._in_flight = set(batch)
            try:
                deferred = await self._issue(batch)
            except Exception as exc:  # the server being away must never stop the loop
                for eid in due[start:]:
                    if self._cache.entry(eid) is not None:
                        queue = self._urgent if eid in urgent else self._pending
                        queue.setdefault(eid, None)
                self._failures += 1
                delay: float = min(self._retry_max, self._retry_min * 2.0 ** (self._failures - 1))
                times = self._failure_log.due(_failure_kind(exc))
                if times:
                    log.warning(
                        "SVID issuance failed; will retry",
                        extra={
                            "entries": len(due) - start,
                            "retry_in": delay,
                            "error": str(exc)[:300],
                            "times": times,
                        },
                    )
                return delay
            finally:
                self._in_flight = set()
            for eid in deferred:  # the server's reply had no room for them: next tick
                (self._urgent if eid in urgent else self._pending).setdefault(eid, None)
            rest = due[start + MAX_BATCH :]
            if rest and self._urgent:
                # A workload started waiting while a long backlog (a restart) is minted: it
                # goes next, the backlog after it.
                self._pending = {**dict.fromkeys(rest), **self._pending}
                self._issued_again()
                return 0.0
        self._issued_again()
        return self.next_due_in()

    def _issued_again(self) -> None:
        if self._failures:
            self._failures = 0
            self._failure_log = KeyedThrottles(FAILURE_LOG_INTERVAL, self._clock)  # next: news

    async def _issue(self, entry_ids: Sequence[str]) -> list[str]:
        """Mint and install SVIDs for `entry_ids`; return those the server left for another
        call (its reply had no room for them)."""
        entries = [e for e in map(self._cache.entry, entry_ids) if e is not None]
        if not entries:
            return []
        # Key generation and CSR signing are CPU work: keep them off the event loop.
        requests = await asyncio.to_thread(_make_requests, entries)
        results = await self._signer.batch_new_x509([(e.id, csr) for e, _, csr in requests])
        by_id = {r.entry_id: r for r in results}
        issued: list[IssuedSvid] = []
        expired: list[IssuedSvid] = []
        deferred: list[str] = []
        received = self._clock.now()
        elapsed = self._elapsed.monotonic()
        for entry, key, _ in requests:
            if self._cache.entry(entry.id) is None:
                continue  # removed while it was minted (_forget): nothing to retry or keep
            result = by_id.get(entry.id)
            if result is not None and result.deferred:
                deferred.append(entry.id)
                continue
            if result is None or result.error or not result.chain_der:
                log.warning(
                    "server refused an SVID",
                    extra={"entry_id": entry.id, "error": result.error if result else "missing"},
                )
                # Asked again later, not on every tick: the server decided.
                self._retry.set(entry.id, elapsed + self._retry_max)
                continue
            try:
                svid = _crypto.issued_svid(entry.id, result.chain_der, key, entry.issuance_key)
            except Exception as exc:
                log.warning(
                    "server sent an unusable SVID", extra={"entry_id": entry.id, "error": str(exc)}
                )
                self._retry.set(entry.id, elapsed + self._retry_max)
                continue
            if svid.not_after <= received:
                # Expired on arrival: this clock is ahead of the server's by more than the TTL.
                # Never served; minted again at once it would come back expired again, on every
                # tick: retried after a back-off of its own (on the elapsed clock, so a clock
                # put right by a step back is not waited out). Its own: the other entries'
                # renewals, which a back-off of the whole rotator held up, still come on time.
                expired.append(svid)
                late = self._late.setdefault(entry.id, Retry(self._retry_min, self._retry_max))
                self._retry.set(entry.id, elapsed + late.failed())
                continue
            issued.append(dataclasses.replace(svid, received_at=received))
        if expired:
            log.warning(
                "server sent X.509-SVIDs already expired by this agent's clock: is it ahead of "
                "the server's?",
                extra={
                    "entries": len(expired),
                    "not_after": format_utc(expired[0].not_after),
                    "now": format_utc(received),
                },
            )
        installed = self._cache.put_svids(issued)
        evicted = []
        for svid in installed:
            if not self._cap or svid.entry_id in self._held:
                self._schedule(svid)
            else:  # evicted while it was being minted: nothing would renew it
                evicted.append(svid.entry_id)
        self._cache.drop_svids(evicted)
        self.issued_total += len(installed)
        log.info(
            "issued X.509-SVIDs",
            extra={"count": len(installed), "next_due_in": self.next_due_in()},
        )
        return deferred

    async def run(self, idle: float = 30.0) -> None:
        """Tick forever: sleep until the next due time or a wake-up (new entries, a workload
        waiting, the server back). Renewals wait out a short window so they go in batches."""
        while True:
            delay = await self.tick()
            if self._wake.is_set():
                self._wake.clear()
                continue
            wait = idle if delay is None else min(idle, max(delay, self._batch_window))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow this task's
            # cancellation when the wake-up comes with it, and the loop then ran on (cancel.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
