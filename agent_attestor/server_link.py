"""Whether the agent holds a live Sync stream to a server, and since when it has not: how old
its copy of the server's revocations may be. The Revocations service tells verifiers (a quiet
stream to them says nothing of a partition behind the agent), so that their
max_revocation_staleness fails closed while revocations made at the server cannot arrive.

A stream open is not a server heard: one hung without closing it (stopped, behind a network
black hole) is noticed only when gRPC keepalive fails, some 20 s on. A server that sends
heartbeats (SyncUpdate.HEARTBEAT) bounds that: past SILENT_BEATS of its intervals without a
message the link counts lost, since the last message heard. A server that sends none (older
than heartbeats) is counted in sync for as long as its stream lives, as before.
"""

from __future__ import annotations

from agent_attestor.watchers import Signal
from svid._clock import Clock, ElapsedClock

# Heartbeat intervals without a message before the link counts lost: one late or lost beat
# (a busy server) is no outage.
SILENT_BEATS = 2
# The longest interval a server's heartbeat is taken to promise: past it, keepalive (~20 s)
# notices a hung server first anyway, and the promise is taken as none. Cut down to this
# instead, it had the agent count lost between two beats of a server set to beat less often.
# (server/config.py bounds sync_heartbeat_interval to the same.)
MAX_HEARTBEAT_INTERVAL = 60.0
# A silence watch woken later than this (seconds) found the agent's loop held up when it was
# due: what came meanwhile may wait unread (ServerLink.resumed). Not an interval: a pause from
# just after a beat past the next two (2.8 intervals) had the watch wake 0.8 of one late,
# and it ended a healthy server's stream; a timer's own lateness on a busy loop is far less,
# and one taken for a stall costs a hung server's agent one more silence at most (resumed).
HELD_UP = 0.05
# The shortest: a promise of a beat every few milliseconds counted every pause of the agent's
# loop (a GC) as an outage and every next beat as its end, each turn told to every verifier.
MIN_HEARTBEAT_INTERVAL = 0.1


class ServerLink:
    def __init__(self, clock: Clock) -> None:
        # An interval, so on the elapsed clock: no wall-clock step shortens it.
        self._elapsed = ElapsedClock(clock)
        # Out of sync since the start: what the state file gave is older than that, and the
        # revocations made since it was written arrive only with the first Sync.
        self._lost_at: float | None = self._elapsed.monotonic()
        self._live = False  # a Sync stream is up and caught up
        self._heard_at = self._lost_at  # the last message of a live stream
        # Seconds of silence past which a live stream's server counts lost; None: its server
        # sent no heartbeat on this stream, so silence says nothing.
        self._silence: float | None = None
        # The agent is handling a message it read (hear to handled): its own time, a bundle
        # saved on a slow disk, is no silence of the server's to end the stream for.
        self._handling = False
        self._listening_since = self._lost_at  # when the agent last went back to reading
        # resumed() counted the silence from then, and no message came since (hear).
        self._resumed = False
        self.changed = Signal()  # bumped when the link is lost or back, not in between
        self.heard = Signal()  # bumped by every message of a live stream (check's wake-up)

    @property
    def in_sync(self) -> bool:
        return self._lost_at is None

    def up(self) -> None:
        """A Sync stream is live and caught up, and its server was heard now: revocations
        arrive as the server makes them."""
        self._live = True
        self._heard_at = self._elapsed.monotonic()
        self.heard.bump()
        if self._lost_at is not None:
            self._lost_at = None
            self.changed.bump()

    def hear(self) -> None:
        """A message came on the stream (any: a part of a run not applied yet too), which the
        agent handles until handled(): on a live stream its server was heard now. Whether the
        agent is in sync is up()'s to say."""
        if self._live and self._lost_at is None:
            self._heard_at = self._elapsed.monotonic()
            self.heard.bump()
        self._handling = True
        self._resumed = False

    def handled(self) -> None:
        """The agent is done with the message hear() announced and reads the stream again."""
        self._handling = False
        self._listening_since = self._elapsed.monotonic()
        self.heard.bump()  # a silence counted meanwhile is looked at again (silent_left)

    def resumed(self) -> None:
        """The agent's loop ran again after it was held up (a stalled host, a long pause): as
        after a message it was slow to handle, what the server sent meanwhile waits unread,
        and the silence that ends the stream is counted from now (silent_left). Once until
        a message comes: the loop ran since, and what was waiting was read; held up again
        with nothing heard, the silence is the server's. Counted again at every late wake,
        a hung server's stream lived as long as a loaded host held the loop up a little past
        an interval at each (0.1 s for the shortest)."""
        if self._resumed:
            return
        self._resumed = True
        self._listening_since = self._elapsed.monotonic()

    def beat(self, interval: float) -> None:
        """A heartbeat came, promising another within `interval` seconds. Before the stream is
        caught up it only says that this server sends them."""
        if interval > MAX_HEARTBEAT_INTERVAL:
            self._silence = None
        elif interval > 0:  # none promised: a server's bug is not an outage every instant
            self._silence = SILENT_BEATS * max(interval, MIN_HEARTBEAT_INTERVAL)
        if self._live:
            self.up()

    def down(self) -> None:
        """The Sync stream ended: what the agent holds grows old from now. Not from the last
        message: a server's quiet stream is in sync until it ends (it ended from the server, or
        a reset), and one silent past its heartbeats' promise was counted lost already."""
        if self._lost_at is None:
            self._lost_at = self._elapsed.monotonic()
            self.changed.bump()
        self._live = False
        self._silence = None  # the next stream's server may send none
        self._resumed = False

    def check(self) -> float | None:
        """Count the link lost, since the last message heard, if its server promised
        heartbeats and fell silent for longer than they allow. Returns the seconds until that
        could happen next; None: not before a message comes (`heard` moves)."""
        if self._silence is None or self._lost_at is not None:
            return None
        left = self._heard_at + self._silence - self._elapsed.monotonic()
        if left > 0:
            return left
        self._lost_at = self._heard_at
        self.changed.bump()
        return None

    def silent_left(self) -> float | None:
        """Seconds until the stream, still open, is to be ended for its server's silence (0 or
        less: now), once check() counted the link lost; None while it is not, or while the
        agent handles a message (hear to handled). Counted from the server's last message or
        the agent's return to reading, whichever is later: a message the agent was slow to
        handle (a bundle saved on a stalled disk) counts the link lost on time, as check()
        does, but ends the stream only if nothing comes once the agent reads again (a
        heartbeat sent meanwhile is waiting there)."""
        if not self._live or self._lost_at is None or self._handling or self._silence is None:
            return None
        since = max(self._heard_at, self._listening_since or self._heard_at)
        return since + self._silence - self._elapsed.monotonic()

    @property
    def silence(self) -> float | None:
        """The seconds of silence the current stream's heartbeats allow (None: it sent none)."""
        return self._silence

    def out_of_sync_ms(self) -> int:
        """0 while in sync; else milliseconds since the link was lost, at least 1 (0 would say
        in sync)."""
        lost_at = self._lost_at
        if lost_at is None:
            return 0
        return max(1, int((self._elapsed.monotonic() - lost_at) * 1000))
