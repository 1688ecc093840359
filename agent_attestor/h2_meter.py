"""Budgets of the HTTP/2 frames a workload sends on one Workload API connection.

grpc-core answers or drops PING, PING ACK, SETTINGS, WINDOW_UPDATE, RST_STREAM, PRIORITY,
CONTINUATION and frames of unknown type as fast as a workload can write them, and closes the
connection for none of them but pings (after its third strike, and only once it has parsed all
it had read: ~25,000 pings later). Any local user kept ~75-100 % of a core of the agent busy with
one such connection, so the relay, which sees every byte first, reads the frames' headers and
cuts a connection that sends more of them than any gRPC client does.

Two budgets, each a token bucket. Control frames (any but HEADERS, DATA and WINDOW_UPDATE, and
an empty DATA frame that ends nothing): an honest client sends a few a second (keepalive pings,
one SETTINGS and its ACK), so a flood is cut after CONTROL_BURST of them. Some control frames
are a call's or an answer's own, and cost a frame only: the RST_STREAM of a stream the client
opened (each cancelled or timed-out call sends one, and so does each of svid's and py-spiffe's
one-shot fetches, which read a stream's first message and cancel it: an asyncio app cancelling
hundreds a second, or a loop of fetches, was cut), the PING that follows a DATA frame of the
agent's (grpc-go's BDP estimator pings after each DATA frame it reads while no such ping is
out, until its window reaches 16 MiB: a ping per answer, a go-spiffe client making a hundred
calls a second would have been cut), and the ACK of the agent's own PING or SETTINGS. So the
agent's frames are read too (`answers`).
All frames, a unit each and one more per 4 KiB of a header block: a Workload API call is one
request message (none streams from the client), HEADERS, DATA and the two WINDOW_UPDATEs
grpcio's client sends for each answer it reads, so FRAME_REFILL is ~16,000 calls a second on a
connection (one grpcio channel made ~2,500 here, a benchmark on a faster machine must not be
cut); the frames are read in Python, a few hundred nanoseconds each, so a flood of 1-byte DATA
frames is cut too, and so are calls reset as soon as made (rapid resets) past that rate.
"""

from __future__ import annotations

from agent_attestor.h2_frames import PREFACE, FrameReader
from svid._clock import Clock

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING = 0x0, 0x1, 0x3, 0x4, 0x6
_WINDOW_UPDATE, _CONTINUATION = 0x8, 0x9
_END_STREAM = 0x1
_ACK = 0x1
HEADER_BLOCK_UNIT = 4096  # bytes of a header block that cost one more unit
CONTROL_BURST = 256
CONTROL_REFILL = 64.0  # per second
FRAME_BURST = 65536
FRAME_REFILL = 65536.0  # per second
# Streams remembered as opened and not yet reset: a workload is told 24 at once per connection
# and the agent's server holds at most 48 (h2_settings), and a client resets only the ones it
# holds open, so this many is far past what an honest client has open.
OPEN_STREAMS_KEPT = 256
# Frames of the agent's owed an answer not counted as control (a PING after its DATA, an ACK
# of its PING or SETTINGS): a bound, so that a long answer does not bank a flood of pings.
ANSWERS_OWED = 16


class _Bucket:
    def __init__(self, burst: int, refill: float, now: float) -> None:
        self.burst = float(burst)
        self.refill = refill
        self.tokens = float(burst)
        self.at = now

    def spend(self, units: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.refill) - units
        self.at = now
        return self.tokens >= 0


def _stream(head: bytes) -> int:
    return int.from_bytes(head[5:9], "big") & 0x7FFFFFFF


class FrameMeter:
    """Fed the bytes a workload sends, in order (and the agent's, in order, as the relay reads
    them); says when the workload has overspent either budget."""

    def __init__(
        self,
        clock: Clock,
        *,
        control: tuple[int, float] = (CONTROL_BURST, CONTROL_REFILL),
        frames: tuple[int, float] = (FRAME_BURST, FRAME_REFILL),
    ) -> None:
        self._clock = clock
        now = clock.monotonic()
        self._control = _Bucket(*control, now)
        self._frames = _Bucket(*frames, now)
        self._overspent = False
        self._sent = FrameReader(len(PREFACE))
        self._open: dict[int, None] = {}  # streams the client opened, oldest first
        self._last_opened = 0
        self._pings_owed = 0  # the agent sent DATA: a PING of the client's may follow (BDP)
        self._ping_acks_owed = 0
        self._settings_acks_owed = 0

    def answers(self, heads: list[bytes]) -> None:
        """The headers of the agent's frames to the workload (as a FrameReader reads them): what
        they let the workload answer for free."""
        for head in heads:
            kind = head[3]
            if kind == _DATA and (head[0] or head[1] or head[2]):
                self._pings_owed = min(ANSWERS_OWED, self._pings_owed + 1)
            elif kind == _PING and not head[4] & _ACK:
                self._ping_acks_owed = min(ANSWERS_OWED, self._ping_acks_owed + 1)
            elif kind == _SETTINGS and not head[4] & _ACK:
                self._settings_acks_owed = min(ANSWERS_OWED, self._settings_acks_owed + 1)

    def feed(self, data: memoryview) -> bool:
        """False once the connection has overspent (and ever after)."""
        if self._overspent:
            return False
        heads = self._sent.feed(data)
        if not heads:
            return True
        control = 0
        frames = len(heads)
        for head in heads:
            kind = head[3]
            if kind in (_HEADERS, _CONTINUATION):
                frames += ((head[0] << 16) | (head[1] << 8) | head[2]) // HEADER_BLOCK_UNIT
                if kind == _HEADERS:
                    self._opened(_stream(head))
                    continue
            elif kind == _DATA:
                if head[0] or head[1] or head[2] or head[4] & _END_STREAM:
                    continue
            elif kind == _WINDOW_UPDATE or (
                kind == _RST_STREAM and self._open.pop(_stream(head), 0) is None  # its own call's
            ):
                continue
            elif kind == _PING:
                if head[4] & _ACK:
                    if self._ping_acks_owed:
                        self._ping_acks_owed -= 1
                        continue
                elif self._pings_owed:
                    self._pings_owed -= 1
                    continue
            elif kind == _SETTINGS and head[4] & _ACK and self._settings_acks_owed:
                self._settings_acks_owed -= 1
                continue
            control += 1
        now = self._clock.monotonic()
        spent_control = self._control.spend(control, now) if control else True
        self._overspent = not (self._frames.spend(frames, now) and spent_control)
        return not self._overspent

    def _opened(self, stream: int) -> None:
        # Only a new stream of the client's (odd, past the last): trailers or a HEADERS sent
        # again on one stream open nothing a reset may then close for free.
        if stream & 1 and stream > self._last_opened:
            self._last_opened = stream
            self._open[stream] = None
            if len(self._open) > OPEN_STREAMS_KEPT:
                del self._open[next(iter(self._open))]
