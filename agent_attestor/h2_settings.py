"""The internal server's HTTP/2 SETTINGS as the workload reads them: a lower stream limit.

grpc-core counts a stream against its max_concurrent_streams until grpc.aio has let go of its
call (grpc.http.overload_protection, on by default), not until the stream closes, and refuses a
stream past that count with RST_STREAM REFUSED_STREAM, which grpcio does not retry (its
transparent retry takes only streams a GOAWAY says were never seen) and reports as UNAVAILABLE.
A client opens its next stream the moment one closes, in C, before the agent's Python has let
go of that stream's call, so a grpcio client with more calls than the limit (an asyncio app
firing 200 fetches on one channel) had some refused, and so did one whose calls time out (its
resets close streams whose handlers still run). The workload is told STREAMS_ADVERTISED; the
server refuses only past STREAMS_ALLOWED, so the difference is room for calls let go of late.
"""

from __future__ import annotations

from agent_attestor.h2_frames import HEADER, FrameReader, payload_length

# What a workload may hold open on one connection, as HTTP/2 counts (its calls past that wait).
STREAMS_ADVERTISED = 24
# What the internal server holds on one connection, open or let go of late: 200 parallel calls
# on one channel saw ~1 refusal in 100 calls at 24 (no room), none in 2,000 at 32 or 48. A client
# that resets calls faster than the agent finishes them (20 at a time with 3 ms deadlines, most
# past their deadline anyway) still has some refused, 6-10 % at 24 and 0-7 % at 48: that is
# the bound doing its job, each reset call's handler still holding memory.
STREAMS_ALLOWED = 48
_SETTINGS = 0x4
_ACK = 0x1
_ENTRY = 6  # a 16-bit identifier, a 32-bit value
_MAX_CONCURRENT_STREAMS = 0x3


class SettingsRewriter:
    """Fed the internal server's bytes in order, in reads of any size; lowers in place the
    SETTINGS_MAX_CONCURRENT_STREAMS value of each SETTINGS frame to `advertised`, never raising
    one: grpc-core may send SETTINGS again with a lower limit (its max_concurrent_streams
    policy takes off the streams it still counts), and a workload told more opened streams the
    server refused. A frame's length and every other byte are left as they are."""

    def __init__(self, advertised: int = STREAMS_ADVERTISED) -> None:
        self._value = advertised.to_bytes(4, "big")
        self._frames = FrameReader()
        self._left = 0  # bytes of a SETTINGS payload still to come, in later reads
        self._at = 0  # offset in the SETTINGS payload
        self._id = 0  # the identifier of the setting at _at
        # The value's bytes so far against `advertised`'s, most significant first: a value's
        # first bytes may have gone to the workload in an earlier read, so each byte is decided
        # as it comes, 0 while they are equal, 1 once the value is the greater, -1 the smaller.
        self._order = 0

    def rewrite(self, data: memoryview) -> list[bytes]:
        """Returns the headers of the frames read (h2_frames.py), for the meter."""
        heads = self._frames.feed(data)
        end = len(data)
        if self._left:  # a SETTINGS payload begun in an earlier read
            n = min(self._left, end)
            self._entries(data, 0, n)
            self._left -= n
        for i, head in enumerate(heads):
            if head[3] == _SETTINGS and not head[4] & _ACK:
                # Rare (once or twice a connection): only then is the frame's place reckoned.
                pos = self._frames.first + sum(payload_length(h) + HEADER for h in heads[:i])
                length = payload_length(head)
                n = min(length, end - pos)
                self._at = 0
                self._entries(data, pos, n)
                self._left = length - n
        return heads

    def _entries(self, data: memoryview, pos: int, n: int) -> None:
        # Byte by byte: a SETTINGS payload is a few entries, sent once or twice a connection.
        for i in range(pos, pos + n):
            k = self._at % _ENTRY
            if k == 0:
                self._id = data[i] << 8
            elif k == 1:
                self._id |= data[i]
                self._order = 0
            elif self._id == _MAX_CONCURRENT_STREAMS and self._order >= 0:
                want = self._value[k - 2]
                if self._order or data[i] > want:
                    self._order = 1
                    data[i] = want
                elif data[i] < want:
                    self._order = -1
            self._at += 1
