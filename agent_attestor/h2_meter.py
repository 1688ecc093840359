"""Budgets of the HTTP/2 frames a workload sends on one Workload API connection.

grpc-core answers or drops PING, PING ACK, SETTINGS, WINDOW_UPDATE, RST_STREAM, PRIORITY,
CONTINUATION and frames of unknown type as fast as a workload can write them, and closes the
connection for none of them but pings (after its third strike, and only once it has parsed all
it had read: ~25,000 pings later). Any local user kept ~75-100 % of a core of the agent busy with
one such connection, so the relay, which sees every byte first, reads the frames' headers and
cuts a connection that sends more of them than any gRPC client does.

Two budgets, each a token bucket. Control frames (any but HEADERS, DATA and WINDOW_UPDATE, and
an empty DATA frame that ends nothing): an honest client sends a few a second (keepalive and
BDP pings, a reset per cancelled call, one SETTINGS and its ACK), so a flood is cut after
CONTROL_BURST of them. All frames, a unit each and one more per 4 KiB of a header block: a
Workload API call is one request message (none streams from the client), HEADERS, DATA and the
two WINDOW_UPDATEs grpcio's client sends for each answer it reads, so FRAME_REFILL is ~16,000
calls a second on a connection (one grpcio channel made ~2,500 here, a benchmark on a faster
machine must not be cut); the frames are read in Python, a few hundred nanoseconds each, so a
flood of 1-byte DATA frames is cut too.
"""

from __future__ import annotations

from svid._clock import Clock

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER = 9
_DATA, _HEADERS, _WINDOW_UPDATE, _CONTINUATION = 0x0, 0x1, 0x8, 0x9
_END_STREAM = 0x1
HEADER_BLOCK_UNIT = 4096  # bytes of a header block that cost one more unit
CONTROL_BURST = 256
CONTROL_REFILL = 64.0  # per second
FRAME_BURST = 65536
FRAME_REFILL = 65536.0  # per second


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


class FrameMeter:
    """Fed the bytes a workload sends, in order; says when it has overspent either budget."""

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
        self._preface = len(PREFACE)  # bytes of the preface still to skip
        self._head = bytearray()  # a frame header split between two reads
        self._skip = 0  # bytes of the current frame's payload still to come

    def feed(self, data: memoryview) -> bool:
        """False once the connection has overspent (and ever after)."""
        if self._overspent:
            return False
        pos, end = 0, len(data)
        if self._preface:
            pos = min(self._preface, end)
            self._preface -= pos
        control = frames = 0
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            if self._head or end - pos < _HEADER:
                step = min(_HEADER - len(self._head), end - pos)
                self._head += data[pos : pos + step]
                pos += step
                if len(self._head) < _HEADER:
                    break
                head: bytes | memoryview = bytes(self._head)
                self._head.clear()
            else:
                head = data[pos : pos + _HEADER]
                pos += _HEADER
            length = (head[0] << 16) | (head[1] << 8) | head[2]
            kind = head[3]
            self._skip = length
            frames += 1
            if kind in (_HEADERS, _CONTINUATION):
                frames += length // HEADER_BLOCK_UNIT
            if kind == _DATA:
                if not length and not head[4] & _END_STREAM:
                    control += 1
            elif kind not in (_HEADERS, _WINDOW_UPDATE):
                control += 1
        if frames:
            now = self._clock.monotonic()
            spent_control = self._control.spend(control, now) if control else True
            self._overspent = not (self._frames.spend(frames, now) and spent_control)
        return not self._overspent
