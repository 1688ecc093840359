"""How long the agent waits before it connects again, by the kind of failure and by the life its
agent SVID has left: a pure decision of the attempt, the settings, that life and an injected
random source.

- A live Sync stream lost is the moment a server's agents share: a stall (a GC pause, a database
  hiccup) ends every stream with two heartbeats of silence, a restart or a deploy with a reset,
  and they all notice within a beat. Its first wait is drawn over HERD_SHARE of reconnect_max,
  not over reconnect_min: with the defaults 0-5 s, not 0-1 s, so a thousand agents come back
  (each a TLS handshake, a server check and a Sync snapshot or catch-up, maybe a renewal) at
  some 200 a second, not 1000: the load of SPIRE's agents polling every 5 s. Every wait is
  full jitter (uniform from 0), so the herd is spread over the window, not moved to its end.
- Any other failure (a connection refused, an attestation failing) backs off exponentially
  from reconnect_min, as before (svid._backoff). The backoff starts afresh only after a
  connection that lasted (LASTED: attempt_after), not after any stream that came up: a server
  that serves a snapshot then drops the stream, again and again, would otherwise have every
  agent back within the herd's window each time, each one a snapshot, never backing off to
  reconnect_max. A lost stream's wait is the longer of the two.
- No wait is longer than WAIT_SHARE of the life the agent SVID has left: an agent whose SVID
  is near expiry draws from a shorter window, so it is among the first back and renews before
  it lapses, however long the herd's window or the backoff has grown. Bouncing between slow
  servers, each turn (a wait, a connection, a renewal waiting a third of what is left:
  sync.renewal_timeout) leaves the next one a share of what is left, and the SVID never lapses
  for a wait. With a join token spent, a lapsed SVID is an agent that never comes back.
"""

from __future__ import annotations

import random

from svid._backoff import backoff_ceiling

# The share of reconnect_max the first wait after a live stream is lost spreads over. Half:
# the defaults' 5 s keeps a failover of a killed server's agents within 10 s (a connection and
# a catch-up after it), and an operator of a larger fleet widens it with reconnect_max.
HERD_SHARE = 0.5
# The longest wait, as a share of the life the agent SVID has left: the rest is for the
# connection and a renewal (a third of what is left then, sync.RENEW_SHARE), and for another
# server's turn after that.
WAIT_SHARE = 1 / 3
# Never a window shorter than this for the SVID's sake: one about to lapse still does not retry
# in a loop that never waits.
WAIT_FLOOR = 0.1
# Seconds a connection holds before its loss starts the backoff afresh: a crash-looping server
# drops each stream within seconds of its snapshot, and one up this long was no such loop.
LASTED = 30.0


def attempt_after(attempt: int, held_for: float) -> int:
    """The retry a failure counts as, the connection it ended having held `held_for` seconds
    (since its attempt began): the first again only past LASTED, else `attempt` as it was."""
    return 0 if held_for > LASTED else attempt


def reconnect_delay(
    attempt: int,
    low: float,
    high: float,
    rand: random.Random,
    *,
    lost_live: bool = False,
    life_left: float | None = None,
) -> float:
    """Seconds to wait before retry `attempt` (0 for the first since the agent was last in
    sync). `low`, `high`: reconnect_min, reconnect_max. `lost_live`: the failure ended a Sync
    stream that was up (see above). `life_left`: what the agent SVID in use has left (None:
    there is none; 0 or less: lapsed, and there is nothing left to hurry for)."""
    ceiling = backoff_ceiling(attempt, low, high)
    if lost_live:
        # Never under the herd's window, nor under the backoff grown: a server that drops
        # every stream soon after its snapshot (crash-looping) is not met ever sooner.
        ceiling = max(ceiling, low, high * HERD_SHARE)
    if life_left is not None and life_left > 0:
        ceiling = min(ceiling, max(WAIT_FLOOR, life_left * WAIT_SHARE))
    return rand.uniform(0.0, ceiling)
