"""Which open Sync streams a change concerns, found through indexes, not by asking each stream.

Every connected stream is indexed by the parent IDs whose entries its agent serves (its own ID
and its node aliases), by its agent's selectors and by its agent's ID. A logged change is handed
only to the streams it concerns: an entry change to the streams serving its old or new parent,
a node-alias change to the streams whose agent it may match, an agent's record change to that
agent's streams, a bundle, revocation or audit checkpoint change to all. A write that concerns
no connected agent costs a few dictionary lookups, whatever the agents hold.

Entry expiry is a change too: a heap of expiry times is swept as time passes, and what expired
is logged like any other change (ServerState.record_expired).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from server.changelog import Change
from server.datastore.records import AttestedAgent, Entry, Selector
from server.entitlement import EntryIndex, agent_parents
from server.errors import RateLimitedError
from svid._clock import Clock
from svid._waits import set_within

# The expiry sweep re-reads the clock at least this often (seconds): a test's fake clock may
# jump ahead while the sweep waits.
_MAX_EXPIRY_WAIT = 1.0
# The expiry heap holds one item per entry expiry pushed; those of entries deleted or given
# another expiry since stay until their time comes (a month ahead, say). Past twice the
# entries plus this many, it keeps only the items of entries that still carry that expiry.
EXPIRY_SLACK = 1024
_K = TypeVar("_K", bound=Hashable)
# A stream whose agent reads slower than changes come gives up its backlog past this many
# changes and sends a snapshot instead: memory stays bounded whatever the agent does.
MAX_INBOX = 10_000
# Sync streams one agent may hold open on one server. A sound agent holds one, and for a moment
# two while it moves to a renewed certificate; a connection that died unseen holds its stream
# until keepalive notices (about 40 s). Each stream costs a snapshot, a subscription every
# shared change wakes and an inbox of up to MAX_INBOX changes: a compromised agent must not
# multiply them.
MAX_STREAMS_PER_AGENT = 4
# Sync heartbeats go out to one slice of the streams asking for them at a time, a slice each
# interval / HEARTBEAT_SLICES: each stream still has one an interval, and the streams woken at
# once are a tenth of them. All at once, 10,000 streams woke on one tick and their heartbeats
# held the server's loop for about a second every interval (some 90 us each), every call
# waiting behind them.
HEARTBEAT_SLICES = 10


class ChangeSource(Protocol):
    """What the propagator reads and listens to (ServerState)."""

    @property
    def entries(self) -> EntryIndex: ...

    def on_change(self, listener: Callable[[Change], None]) -> None: ...

    def record_expired(self, entries: Iterable[Entry]) -> None: ...


@dataclass(eq=False)
class StreamPlace:
    """One of an agent's MAX_STREAMS_PER_AGENT places, held by a Sync stream from its opening
    to its end: while it waits for its snapshot's catch-up as while it is subscribed."""

    spiffe_id: str
    given_back: bool = False


@dataclass(eq=False)
class Subscription:
    """One open Sync stream: the changes dispatched to it since it last looked."""

    agent: AttestedAgent
    parents: frozenset[str]
    inbox: list[Change] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    # The backlog was dropped (MAX_INBOX): the stream must send a snapshot.
    overflowed: bool = False
    # The agent reads HEARTBEAT messages (SyncRequest.heartbeats); `beat`: one is due.
    heartbeats: bool = False
    beat: bool = False
    # Its place in Propagator's heartbeat slices (heartbeats only).
    slice: int = 0

    async def next(self) -> list[Change]:
        """The changes dispatched since the last call (waits for one; [] when woken empty)."""
        await self.wake.wait()
        self.wake.clear()
        taken, self.inbox = self.inbox, []
        return taken


class Propagator:
    def __init__(
        self,
        state: ChangeSource,
        server_id: str,
        clock: Clock,
        max_streams_per_agent: int = MAX_STREAMS_PER_AGENT,
    ) -> None:
        self._state = state
        self._server_id = server_id
        self._clock = clock
        self._max_streams_per_agent = max_streams_per_agent
        self._by_parent: dict[str, set[Subscription]] = {}
        self._by_selector: dict[Selector, set[Subscription]] = {}
        self._by_agent: dict[str, set[Subscription]] = {}
        # Places held per agent (take_place): the cap counts streams, subscribed or waiting.
        self._places: dict[str, int] = {}
        self._all: set[Subscription] = set()
        # The streams that asked for heartbeats, in HEARTBEAT_SLICES slices: `beat` takes the
        # next slice in turn.
        self._slices: list[set[Subscription]] = [set() for _ in range(HEARTBEAT_SLICES)]
        self._next_slice = 0
        self._expiries: list[tuple[int, str]] = []
        self._expiry_moved = asyncio.Event()
        # Work counters, for tests and metrics: streams handed a change, changes dispatched.
        self.deliveries = 0
        self.dispatched = 0

    def start(self) -> None:
        """Listen to the state's changes (call on the event loop, after ServerState.load)."""
        for entry in self._state.entries.by_id.values():
            if entry.expires_at:
                self._expiries.append((entry.expires_at, entry.id))
        heapq.heapify(self._expiries)
        self._state.on_change(self.dispatch)

    def _now(self) -> int:
        return int(self._clock.now())

    # -- subscriptions ------------------------------------------------------------------------

    def take_place(self, spiffe_id: str) -> StreamPlace:
        """A place for a new stream of the agent, taken before anything it waits for (a
        snapshot's catch-up): refused (RateLimitedError) while the agent holds as many as it
        may, waiting or subscribed. The stream gives it back at its end (`give_back`)."""
        held = self._places.get(spiffe_id, 0)
        if held >= self._max_streams_per_agent:
            raise RateLimitedError(
                f"agent {spiffe_id} holds {held} open Sync streams on this server, the "
                f"most one agent may; close one first (a stream whose connection died ends "
                f"once keepalive notices, within a minute)"
            )
        self._places[spiffe_id] = held + 1
        return StreamPlace(spiffe_id)

    def give_back(self, place: StreamPlace) -> None:
        if place.given_back:
            return
        place.given_back = True
        left = self._places[place.spiffe_id] - 1
        if left:
            self._places[place.spiffe_id] = left
        else:
            del self._places[place.spiffe_id]

    def subscribe(self, agent: AttestedAgent, heartbeats: bool = False) -> Subscription:
        """A stream's subscription (the stream holds a place: `take_place`); `heartbeats`:
        its agent asked for them."""
        sub = Subscription(agent, self._parents(agent, self._state.entries), heartbeats=heartbeats)
        self._all.add(sub)
        if heartbeats:
            # The smallest slice: streams come and go, and slices taken in turn could fill one.
            sub.slice = min(range(HEARTBEAT_SLICES), key=lambda n: len(self._slices[n]))
            self._slices[sub.slice].add(sub)
        self._by_agent.setdefault(agent.spiffe_id, set()).add(sub)
        for selector in agent.selectors:
            self._by_selector.setdefault(selector, set()).add(sub)
        self._index_parents(sub, sub.parents, ())
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.closed:
            return
        sub.closed = True
        self._all.discard(sub)
        self._slices[sub.slice].discard(sub)
        _drop(self._by_agent, sub.agent.spiffe_id, sub)
        for selector in sub.agent.selectors:
            _drop(self._by_selector, selector, sub)
        self._index_parents(sub, (), sub.parents)

    def wake_all(self) -> None:
        """Wake every stream with nothing new (shutdown: each then sees the server stopping)."""
        for sub in self._all:
            sub.wake.set()

    def beat(self) -> None:
        """Make a heartbeat due on the next slice of the streams whose agent asked for them:
        on one timer (run_heartbeats), not a timer per stream."""
        turn = self._slices[self._next_slice]
        self._next_slice = (self._next_slice + 1) % HEARTBEAT_SLICES
        for sub in turn:
            sub.beat = True
            sub.wake.set()

    async def run_heartbeats(
        self,
        interval: float,
        stop: asyncio.Event,
        *,
        wait: Callable[[asyncio.Event, float], Awaitable[bool]] = set_within,
        now: Callable[[], float] | None = None,
    ) -> None:
        """`beat` a slice every `interval` / HEARTBEAT_SLICES seconds until `stop` is set:
        every stream once an interval. On a schedule, not a wait after each beat: a loop
        late by a little at each of the ten ticks made a stream's interval ten times as late,
        and agents allow two intervals of silence before they count the server lost."""
        clock = now if now is not None else asyncio.get_running_loop().time
        step = interval / HEARTBEAT_SLICES
        due = clock() + step
        while not await wait(stop, max(0.0, due - clock())):
            self.beat()
            # Ticks missed (a loop held up for long) are caught up with, but only for one
            # round: a slice beaten twice in a row has one heartbeat due all the same.
            due = max(due + step, clock() - interval)

    @property
    def subscriber_count(self) -> int:
        return len(self._all)

    def _parents(self, agent: AttestedAgent, index: EntryIndex) -> frozenset[str]:
        return agent_parents(index, agent.spiffe_id, agent.selectors, self._server_id, self._now())

    def _index_parents(
        self, sub: Subscription, joined: Iterable[str] = (), left: Iterable[str] = ()
    ) -> None:
        for parent in left:
            _drop(self._by_parent, parent, sub)
        for parent in joined:
            self._by_parent.setdefault(parent, set()).add(sub)

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self, change: Change) -> None:
        """Hand `change` to the streams it concerns (on the event loop, as it is logged)."""
        self.dispatched += 1
        if (
            change.bundle
            or change.revocations_added
            or change.revocations_removed
            or change.audit_checkpoint
            or change.crl
        ):
            targets = set(self._all)
        else:
            targets = set()
        for agent_id in change.agents:
            targets |= self._by_agent.get(agent_id, set())
        index = self._state.entries
        realias: set[Subscription] = set()
        for touch in change.entries:
            for parent in touch.parents():
                targets |= self._by_parent.get(parent, set())
            for version in (touch.old, touch.new):
                if version is None:
                    continue
                if (
                    version.expires_at
                    and version is touch.new
                    and touch.old is not touch.new
                    # The same expiry is on the heap already: pushed again on every write,
                    # it grew by an item a write until that expiry came.
                    and (touch.old is None or touch.old.expires_at != version.expires_at)
                ):
                    heapq.heappush(self._expiries, (version.expires_at, version.id))
                    self._expiry_moved.set()
                if version.parent_id == self._server_id and version.selectors:
                    realias |= self._matching(version.selectors)
        # A node alias changed: the streams it may match recompute their parents, and streams
        # serving a parent they just joined are handed the change too.
        for sub in realias:
            parents = self._parents(sub.agent, index)
            if parents != sub.parents:
                self._index_parents(sub, parents - sub.parents, sub.parents - parents)
                sub.parents = parents
            targets.add(sub)
        if change.entries and len(self._expiries) > 2 * len(index.by_id) + EXPIRY_SLACK:
            self._compact_expiries(index)
        for sub in targets:
            if len(sub.inbox) >= MAX_INBOX:
                sub.inbox.clear()
                sub.overflowed = True
            elif not sub.overflowed:
                sub.inbox.append(change)
            sub.wake.set()
        self.deliveries += len(targets)

    def _matching(self, selectors: tuple[Selector, ...]) -> set[Subscription]:
        """Streams whose agent has every one of `selectors` (looked up by the rarest)."""
        groups = [self._by_selector.get(s, set()) for s in selectors]
        smallest = min(groups, key=len)
        want = frozenset(selectors)
        return {sub for sub in smallest if want <= frozenset(sub.agent.selectors)}

    # -- expiry -------------------------------------------------------------------------------

    def _compact_expiries(self, index: EntryIndex) -> None:
        """Keep the heap items of entries that still carry that expiry, once each: the others
        would only be popped and found stale (sweep), up to a month later."""
        by_id = index.by_id
        kept = {
            (at, entry_id)
            for at, entry_id in self._expiries
            if (entry := by_id.get(entry_id)) is not None and entry.expires_at == at
        }
        self._expiries = list(kept)
        heapq.heapify(self._expiries)

    def due_expiries(self, now: int) -> list[str]:
        """Pop the ids of entries whose expiry time has come (pure heap work)."""
        out: list[str] = []
        while self._expiries and self._expiries[0][0] <= now:
            out.append(heapq.heappop(self._expiries)[1])
        return out

    def sweep(self) -> None:
        """Log the entries that expired by now and still carry that expiry."""
        now = self._now()
        by_id = self._state.entries.by_id
        expired = []
        for entry_id in self.due_expiries(now):
            entry = by_id.get(entry_id)
            if entry is not None and entry.expires_at and entry.expires_at <= now:
                expired.append(entry)
        self._state.record_expired(expired)

    async def run_expiry(self, stopped: Callable[[], bool] = lambda: False) -> None:
        """The loop that only ticks: wait for the next expiry (or a sooner one), sweep."""
        while not stopped():
            self.sweep()
            delay = _MAX_EXPIRY_WAIT
            if self._expiries:
                delay = min(delay, max(0.05, self._expiries[0][0] - self._clock.now()))
            self._expiry_moved.clear()
            await set_within(self._expiry_moved, delay)


def _drop(index: dict[_K, set[Subscription]], key: _K, sub: Subscription) -> None:
    group = index.get(key)
    if group is not None:
        group.discard(sub)
        if not group:
            del index[key]
