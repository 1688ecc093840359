"""When to renew an SVID, and the loop that keeps every served entry's X.509-SVID fresh."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor import _crypto
from agent_attestor.cache import Cache
from agent_attestor.model import Entry, IssuedSvid
from agent_attestor.signer import SvidSigner
from svid._clock import Clock

log = logging.getLogger(__name__)

ROTATE_AT = 0.5
JITTER = 0.1
MAX_BATCH = 500


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
    fraction = ROTATE_AT + max(-JITTER, min(JITTER, jitter))
    point = not_before + (not_after - not_before) * fraction
    if point <= arrived:
        point = arrived + (not_after - arrived) * fraction
    return point


def jitter_for(svid: IssuedSvid) -> float:
    """A per-SVID jitter in [-JITTER, JITTER], stable for the SVID so the decision never flaps,
    and different across SVIDs so renewals of many entries spread out."""
    digest = hashlib.sha256(svid.serial_hex.encode()).digest()
    return (int.from_bytes(digest[:4], "big") / 0xFFFFFFFF * 2 - 1) * JITTER


def _needs_svid(entry: Entry, svid: IssuedSvid | None, now: float) -> bool:
    if svid is None or svid.issuance_key != entry.issuance_key:
        return True
    return should_rotate(
        now, svid.not_before, svid.not_after, jitter_for(svid), arrived=svid.received_at
    )


def _make_requests(
    entries: Sequence[Entry],
) -> list[tuple[Entry, ec.EllipticCurvePrivateKey, bytes]]:
    out: list[tuple[Entry, ec.EllipticCurvePrivateKey, bytes]] = []
    for entry in entries:
        key = _crypto.new_key()
        out.append((entry, key, _crypto.make_csr(key, entry.spiffe_id)))
    return out


class Rotator:
    """Issues SVIDs for new entries and renews old ones, pushing them into the cache at once."""

    def __init__(
        self,
        cache: Cache,
        signer: SvidSigner,
        clock: Clock,
        retry_min: float = 0.2,
        retry_max: float = 10.0,
    ) -> None:
        self._cache = cache
        self._signer = signer
        self._clock = clock
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._failures = 0
        self._wake = asyncio.Event()
        self.issued_total = 0

    def nudge(self) -> None:
        """The server is back (or something changed): retry now instead of after the backoff."""
        self._failures = 0
        self._wake.set()

    def due(self) -> list[Entry]:
        now = self._clock.now()
        svids = self._cache.svids()
        return [e for e in self._cache.entries().values() if _needs_svid(e, svids.get(e.id), now)]

    def next_due_in(self) -> float | None:
        """Seconds until the next renewal is due (None when nothing is held)."""
        now = self._clock.now()
        points = [
            rotation_point(s.not_before, s.not_after, jitter_for(s), arrived=s.received_at)
            for s in self._cache.svids().values()
        ]
        return max(0.0, min(points) - now) if points else None

    async def tick(self) -> float | None:
        """Do the work that is due now; return how long until more is due (None: unknown)."""
        expired = self._cache.drop_expired(self._clock.now())
        if expired:
            log.warning("X.509-SVIDs expired before renewal", extra={"entries": len(expired)})
        due = self.due()
        if not due:
            return self.next_due_in()
        try:
            for start in range(0, len(due), MAX_BATCH):
                await self._issue(due[start : start + MAX_BATCH])
        except Exception as exc:  # the server being away must never stop the loop
            self._failures += 1
            delay: float = min(self._retry_max, self._retry_min * 2.0 ** (self._failures - 1))
            log.warning(
                "SVID issuance failed; will retry",
                extra={"entries": len(due), "retry_in": delay, "error": str(exc)},
            )
            return delay
        self._failures = 0
        return self.next_due_in()

    async def _issue(self, entries: Sequence[Entry]) -> None:
        # Key generation and CSR signing are CPU work: keep them off the event loop.
        requests = await asyncio.to_thread(_make_requests, entries)
        results = await self._signer.batch_new_x509([(e.id, csr) for e, _, csr in requests])
        by_id = {r.entry_id: r for r in results}
        issued: list[IssuedSvid] = []
        received = self._clock.now()
        for entry, key, _ in requests:
            result = by_id.get(entry.id)
            if result is None or result.error or not result.chain_der:
                log.warning(
                    "server refused an SVID",
                    extra={"entry_id": entry.id, "error": result.error if result else "missing"},
                )
                continue
            try:
                svid = _crypto.issued_svid(entry.id, result.chain_der, key, entry.issuance_key)
                issued.append(dataclasses.replace(svid, received_at=received))
            except Exception as exc:
                log.warning(
                    "server sent an unusable SVID", extra={"entry_id": entry.id, "error": str(exc)}
                )
        self.issued_total += self._cache.put_svids(issued)
        log.info(
            "issued X.509-SVIDs",
            extra={"count": len(issued), "next_due_in": self.next_due_in()},
        )

    async def run(self, idle: float = 30.0) -> None:
        """Tick forever: wake when work is due or the cache changed (new entries)."""
        seen = -1
        while True:
            seen = self._cache.version
            delay = await self.tick()
            wait = idle if delay is None else min(idle, max(delay, 0.01))
            if self._cache.version != seen or self._wake.is_set():
                self._wake.clear()
                continue
            change = asyncio.ensure_future(self._cache.wait_change(seen))
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait(
                    {change, wake}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                change.cancel()
                wake.cancel()
            self._wake.clear()
