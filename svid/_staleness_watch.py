"""Ends the requests an adapter is serving once its verifiers would refuse them for stale
revocation data (``max_revocation_staleness``): a verifier that fails closed refuses new
requests, and a stream admitted before the feed was lost must not outlive that. A task revoked
while the agent was unreachable would otherwise keep its open SSE stream for as long as its
client holds it.

One asyncio task per loop, running only while requests are open: it sleeps until the data
could be too old (the time the verifiers say is left), looks again, and ends the open requests
a verifier that now refuses had admitted (a JWT verifier's, an X.509 verifier's: their limits
may differ). An X.509 verifier also refuses the certificates of an issuer whose CRL is too far
past its nextUpdate while the feed is current, so each request it admitted is looked at by its
own chain: the one whose issuer's CRL lapsed ends, other callers' go on.

The MCP sessions those requests open are held in the same open requests, with the caller that
opened each (svid.mcp), so they end alike and keep the watch running while they last; a look
reads each session once, as it reads each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from svid._open_requests import OpenRequests
from svid._revocation import CertKey

ChainFreshFor = Callable[[tuple[CertKey, ...]], float | None]

# Past the moment the verifiers refuse: the feed's own clock and the loop's may differ by this.
SLACK = 0.01
# While one verifier refuses, how often the watch looks again: it may accept again, and admit
# requests its staleness limit then has to catch.
STALE_RECHECK = 1.0


class StalenessWatch:
    def __init__(
        self,
        fresh_for: Mapping[str, Callable[[], float | None]],
        open_requests: OpenRequests,
        chain_fresh_for: Mapping[str, ChainFreshFor] | None = None,
    ) -> None:
        """``fresh_for``: by what admitted a request (``"jwt"``, ``"x509"``: the request's
        ``admitted_by``), that verifier's ``revocations_fresh_for``. ``chain_fresh_for``: for
        what admits certificate chains, the same for one chain (the request's ``cert_keys``):
        its issuers' CRLs may lapse sooner."""
        self._fresh_for = dict(fresh_for)
        self._chain_fresh_for = dict(chain_fresh_for or {})
        self._open = open_requests
        self._task: asyncio.Task[None] | None = None

    def left(self) -> dict[str, float]:
        """Seconds until each verifier with a staleness limit refuses (0: it does now)."""
        left = {kind: f() for kind, f in self._fresh_for.items()}
        return {kind: t for kind, t in left.items() if t is not None}

    def admitted(self) -> None:
        """A request was opened on the running loop: watch, if no one is watching there."""
        task = self._task
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._watch(), name="svid-staleness-watch")

    def closed(self) -> None:
        """A request ended: with nothing open, stop watching (a task left sleeping would
        outlive the server's loop)."""
        task = self._task
        if task is not None and self._open.empty():
            self._task = None
            task.cancel()

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed already
                task.get_loop().call_soon_threadsafe(task.cancel)

    async def _watch(self) -> None:
        while not self._open.empty():
            left = self.left()
            stale = frozenset(kind for kind, t in left.items() if t <= 0)
            if stale:
                # Only what a refusing verifier admitted: the other still accepts its own.
                for request in self._open.take_where(_admitted_by(stale)):
                    request.end()
            waits = [t for t in left.values() if t > 0]
            if stale:
                waits.append(STALE_RECHECK)
            for kind, chain_left in self._chain_fresh_for.items():
                if kind not in stale:  # else all it admitted has just been ended
                    waits.extend(self._end_stale_chains(kind, chain_left))
            if not waits:
                return
            await asyncio.sleep(min(waits) + SLACK)

    def _end_stale_chains(self, kind: str, chain_left: ChainFreshFor) -> list[float]:
        """End the requests ``kind`` admitted whose chain it now refuses (the same check as
        for a new request of that chain); the soonest any other one may be, as a wait."""
        soonest = math.inf

        def refused(request: Any) -> bool:
            nonlocal soonest
            if getattr(request, "admitted_by", None) != kind:
                return False
            t = chain_left(request.cert_keys)
            if t is None:
                return False
            if t <= 0:
                return True
            soonest = min(soonest, t)
            return False

        for request in self._open.take_where(refused):
            request.end()
        return [] if math.isinf(soonest) else [soonest]


def _admitted_by(kinds: frozenset[str]) -> Callable[[Any], bool]:
    return lambda request: getattr(request, "admitted_by", None) in kinds
