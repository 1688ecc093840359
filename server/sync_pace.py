"""A Sync stream's pace: when its last message went out, what its agent holds, and the
heartbeats it sends while its snapshot waits for the view to catch up.

A live stream whose backlog overflowed (or whose agent was attested again with other selectors)
starts again from a snapshot, and first waits for the view to catch up with the datastore: a
slow feed read, on a busy database, up to the staleness bound. Silent meanwhile, its agent,
counting two intervals of silence, would end the stream as its server's silence: every
overflowed stream of a healthy server at once, all onto the next one. So it beats while it
waits; but a heartbeat tells the agent it holds the view, and what it holds is the view as of
the stream's last messages, without what the backlog dropped: the beats stop, and the stream
ends as a stale view does, once that is as old as the staleness bound.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from typing import Any

from server.view_freshness import ViewFreshness
from svid._proto import node_pb2


class SyncPace:
    """Built as the stream's first messages are made; `beats`: whether its agent asked for
    heartbeats (SyncRequest.heartbeats)."""

    def __init__(
        self,
        freshness: ViewFreshness,
        heartbeat: node_pb2.SyncUpdate,
        interval: float,
        *,
        beats: bool,
    ) -> None:
        self._freshness = freshness
        self._heartbeat = heartbeat
        self._interval = interval
        self._beats = beats
        # The loop's clock, as the heartbeats' schedule (Propagator.run_heartbeats): a
        # catch-up's beats are timed from the last message on it.
        self._clock = asyncio.get_running_loop().time
        self._sent_at = self._clock()
        # What the agent holds once the messages being sent reach it: the view as of its mark.
        self._held = freshness.as_of

    def sending(
        self, messages: Iterable[node_pb2.SyncUpdate], beat: bool
    ) -> Iterator[node_pb2.SyncUpdate]:
        """`messages`, made of the view as it is now, then a heartbeat when `beat`; each
        noted as it goes out."""
        self._held = self._freshness.as_of
        return self._stamped(itertools.chain(messages, [self._heartbeat] if beat else []))

    def _stamped(self, messages: Iterable[node_pb2.SyncUpdate]) -> Iterator[node_pb2.SyncUpdate]:
        for message in messages:
            self._sent_at = self._clock()
            yield message

    async def during(
        self, catch_up: asyncio.Future[Any], still_served: Callable[[float], None]
    ) -> AsyncGenerator[node_pb2.SyncUpdate, None]:
        """Heartbeats until `catch_up` is done (none if the agent asked for none), each an
        interval after the stream's last message and once `still_served(held)` (the view
        and what the agent holds within the bound, the agent authorized) did not raise."""
        while self._beats and not catch_up.done():
            # An interval after the last message, not after the catch-up began: the beat due
            # at the wake that found the overflow (the subscription gone, it never came) and
            # the next an interval on made two intervals of silence, the very one the agent
            # ends the stream for.
            due = self._sent_at + self._interval - self._clock()
            await asyncio.wait({catch_up}, timeout=max(0.0, due))
            if not catch_up.done():
                # What the backlog dropped is missing meanwhile: the agent holds the view as
                # of the stream's last messages, in sync no longer than that is within the
                # bound (up to twice it, beating through the catch-up).
                still_served(self._held)
                self._sent_at = self._clock()
                yield self._heartbeat
