"""How old this server's view of a shared datastore is, and refusing to serve it past a bound.

Servers sharing one datastore learn each other's writes from its change feed
(server.replication). A server that cannot read the feed (its database connection cut or
silent) goes on holding the view it last read: an entry deleted and a token revoked through
another server meanwhile are still served by it, over Sync, to its agents. Each successful
catch-up of the feed marks the view fresh as of when that read began (once it had its thread
and its connection: time queued for either, on a loaded server, is no age); once the last mark is
older than the bound, Sync refuses new streams and ends the open ones (UNAVAILABLE), so
agents move to a server that can read the datastore, and serves again at the next catch-up.

Staleness is not the only gap: a view read a moment ago may still lack a revocation committed
through another server since (the follower reads the feed at each wake-up, at least every
`feed_poll_interval`). A delta only adds to what an agent holds, but a snapshot replaces it
whole: an agent failing over from the server that revoked a token would forget the revocation.
So before Sync sends a snapshot, `CurrentView.current` catches the view up with the datastore
as of the request (the follower's catch-up, one shared by all who ask at once), and refuses
the stream (UNAVAILABLE) when that fails or takes longer than the bound.

The bound is a few feed polls: a healthy follower reads the feed at least every
`feed_poll_interval`, so a view older than several polls means reads are failing. A single
server on SQLite has no feed to lag and no bound.

Time here is real time (the feed's poll waits real seconds, whatever a test's clock says):
the server hands in a SystemClock; tests of this module a FakeClock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from server.errors import UnavailableError
from svid._clock import Clock
from svid._waits import set_within

_log = logging.getLogger("svid.server.view_freshness")
# A view is stale past this many feed polls without a successful read...
STALE_POLLS = 3
# ...and never sooner than this (seconds): a catch-up that reloads much, or a slow query on a
# busy database, does not send every agent elsewhere.
MIN_STALE_AFTER = 3.0
# While stale, how often the watcher looks for the view to be fresh again (seconds).
_STALE_RECHECK = 0.25


def stale_after(poll_interval: float) -> float:
    """The age (seconds) past which a view followed every `poll_interval` seconds is stale."""
    return max(MIN_STALE_AFTER, STALE_POLLS * poll_interval)


class ViewFreshness:
    """The time of the last successful catch-up; `limit` None: never stale (no feed)."""

    def __init__(self, clock: Clock, limit: float | None) -> None:
        self._clock = clock
        self.limit = limit
        # Fresh as the state was loaded, just before this was built.
        self._as_of = clock.monotonic()

    def now(self) -> float:
        """A mark to hand to `caught_up` once the read begun now succeeded."""
        return self._clock.monotonic()

    def caught_up(self, as_of: float) -> None:
        """Every change committed before `as_of` (a `now()`) is in the view."""
        self._as_of = max(self._as_of, as_of)

    @property
    def as_of(self) -> float:
        """The mark of the last catch-up: every change committed before it is in the view."""
        return self._as_of

    def age(self, as_of: float | None = None) -> float:
        """Seconds since `as_of` (a `now()`); by default since the last catch-up."""
        return max(0.0, self._clock.monotonic() - (self._as_of if as_of is None else as_of))

    def left(self) -> float:
        """Seconds until the view turns stale (<= 0: stale); infinite without a limit."""
        return float("inf") if self.limit is None else self.limit - self.age()

    def check(self, held: float | None = None) -> None:
        """UnavailableError when the view is stale: its agents should use another server.
        `held`: the mark of what a Sync stream holds, the view as of then and nothing since
        (its backlog overflowed while its snapshot waits for a catch-up); stale as the view
        is past the bound too. A heartbeat tells the agent it holds the view: past the bound,
        it would be told so of what is older than any view served."""
        if self._stale(self._as_of):
            raise UnavailableError(
                f"this server's view is {self.age():.0f} s old: its datastore is unreachable; "
                "use another server"
            )
        if held is not None and self._stale(held):
            raise UnavailableError(
                f"this server could not bring a Sync stream up to its view within "
                f"{self.limit:g} s (its datastore's changes read too slowly); use another server"
            )

    def _stale(self, as_of: float) -> bool:
        """Whether a view as of `as_of` is past the bound."""
        return self.limit is not None and self.age(as_of) >= self.limit

    async def watch(
        self,
        stop: asyncio.Event,
        on_stale: Callable[[], None],
        on_turn: Callable[[bool], Awaitable[object]] | None = None,
    ) -> None:
        """Until `stop`: call `on_stale` each time the view turns stale (the Sync streams,
        woken by it, see `check` fail and end), await `on_turn(stale)` at each turn both ways
        (the node service's health), and log the turns."""
        if self.limit is None:
            return
        stale = False
        while not stop.is_set():
            left = self.left()
            if (left <= 0) != stale:
                stale = not stale
                if stale:
                    _log.warning(
                        "no change feed read for %.0f s: refusing Sync until the datastore "
                        "answers again, so agents move to another server",
                        self.age(),
                    )
                    on_stale()
                else:
                    _log.warning("the change feed is read again: serving Sync")
                if on_turn is not None:
                    await on_turn(stale)
            await set_within(stop, left if left > 0 else _STALE_RECHECK)


class CurrentView:
    """The view Sync serves: refused when stale (`check`), and brought up to the datastore as of
    the call before a snapshot is made of it (`current`). `catch_up` None: the view is all
    there is (one server, no feed), and it is always current."""

    def __init__(
        self,
        freshness: ViewFreshness,
        catch_up: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.freshness = freshness
        self._catch_up = catch_up
        # A catch-up slower than the staleness bound is as good as none: the agent had better
        # ask another server than wait longer.
        self.bound = freshness.limit if freshness.limit is not None else MIN_STALE_AFTER

    def check(self, held: float | None = None) -> None:
        self.freshness.check(held)

    async def current(self) -> None:
        """Return once every change committed before the call is in the view; UnavailableError
        when the datastore's feed cannot be read within the bound."""
        if self._catch_up is None:
            return
        try:
            await asyncio.wait_for(self._catch_up(), self.bound)
        except TimeoutError as exc:
            raise UnavailableError(
                f"this server could not read its datastore's changes within {self.bound:g} s; "
                "use another server"
            ) from exc
        except Exception as exc:
            raise UnavailableError(
                "this server could not read its datastore's changes: its datastore is "
                "unreachable; use another server"
            ) from exc
