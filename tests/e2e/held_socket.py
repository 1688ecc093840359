"""A Unix socket in front of another that can hold back the bytes of one direction: a slow link
or a stalled peer, for real, so a test can act (cancel, interrupt) while a call is in flight.

    with HeldSocket(root / "held.sock", agent.socket_path) as held:
        held.hold_answers()           # what the agent sends waits here
        ...                           # start a call, cancel it
        held.release()                # everything held goes on, in order

or only one gRPC call's request while the others on the same connection go on:

        held.hold_next_call()         # the next call's request message waits here
        ...                           # start it, make other calls, count held.calls
        held.release()
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType


class _Gate:
    """Open or closed; a pump waits at a closed gate with the one read it holds, counting it.
    What comes after waits unread in the socket, uncounted: `held` says that bytes wait, not
    which (to see one call's request held, hold_next_call and call_held)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.held = 0
        self._lock = threading.Lock()

    def pass_through(self, size: int) -> None:
        if not self.open.is_set():
            with self._lock:
                self.held += size
        self.open.wait()


# HTTP/2 (RFC 9113): what a client sends first, and the frame types that carry a header block.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
HEADERS = 0x1
CONTINUATION = 0x9


class _Calls:
    """The gRPC calls (HTTP/2 streams) callers open through the socket; the next one opened
    after hold_next() has its frames kept back, but for its header block: header blocks are
    compressed against each other (HPACK), so they must reach the target in their order. The
    target then waits for the call's request message, while later calls pass. One lock for
    every connection's sends: a release sends what it kept back before anything newer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.hold_next = False
        # (the connection's target side, stream ID) -> its frames kept back, in order.
        self.held: dict[tuple[socket.socket, int], list[bytes]] = {}

    def release(self) -> None:
        with self.lock:
            for (sink, _), frames in self.held.items():
                with contextlib.suppress(OSError):
                    sink.sendall(b"".join(frames))
            self.held = {}


class _RequestLink:
    """One connection's caller -> target bytes, cut into HTTP/2 frames on their way."""

    def __init__(self, sink: socket.socket, calls: _Calls) -> None:
        self.sink = sink
        self.calls = calls
        self._pending = b""
        self._preface = True
        self._last_stream = 0

    def forward(self, data: bytes) -> None:
        self._pending += data
        if self._preface:
            if len(self._pending) < len(PREFACE):
                return
            with self.calls.lock:
                self.sink.sendall(self._pending[: len(PREFACE)])
            self._pending = self._pending[len(PREFACE) :]
            self._preface = False
        while len(self._pending) >= FRAME_HEADER:
            size = FRAME_HEADER + int.from_bytes(self._pending[:3], "big")
            if len(self._pending) < size:
                return
            frame, self._pending = self._pending[:size], self._pending[size:]
            self._send(frame)

    def _send(self, frame: bytes) -> None:
        kind = frame[3]
        stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
        calls = self.calls
        with calls.lock:
            if kind == HEADERS and stream > self._last_stream:
                self._last_stream = stream
                calls.opened += 1
                if calls.hold_next:
                    calls.hold_next = False
                    calls.held[(self.sink, stream)] = []
            kept = calls.held.get((self.sink, stream))
            if kept is not None and kind not in (HEADERS, CONTINUATION):
                kept.append(frame)
                return
            self.sink.sendall(frame)


class HeldSocket:
    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self.requests = _Gate()  # caller -> target
        self.answers = _Gate()  # target -> caller
        self._calls = _Calls()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sockets: list[socket.socket] = []
        self._closed = False
        # A connection accepted as the test ends must be closed by one side or the other, or
        # its sockets are left to the collector (a ResourceWarning, which fails the test).
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"unix://{self.path}"

    def __enter__(self) -> HeldSocket:
        self._listener.bind(str(self.path))
        self._listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._closed = True
        self.release()
        self._listener.close()
        self.cut()

    def hold_requests(self) -> None:
        self.requests.open.clear()

    def hold_answers(self) -> None:
        self.answers.open.clear()

    def hold_next_call(self) -> None:
        """Keep back the request message of the next gRPC call made through the socket (until
        release()); the calls made after it go on."""
        with self._calls.lock:
            self._calls.hold_next = True

    @property
    def call_held(self) -> bool:
        """Whether a call's request message is being kept back now."""
        with self._calls.lock:
            return any(self._calls.held.values())

    @property
    def calls(self) -> int:
        """How many gRPC calls (HTTP/2 streams) callers have opened through it so far."""
        with self._calls.lock:
            return self._calls.opened

    def release(self) -> None:
        self.requests.open.set()
        self.answers.open.set()
        self._calls.release()

    @property
    def connections(self) -> int:
        """How many connections callers have made through it so far."""
        with self._lock:
            return len(self._sockets) // 2

    def cut(self) -> None:
        """Drop every connection made so far, as a network failure or the agent's restart
        would; new ones are still accepted. Shut down, not only closed: a pump blocked reading
        a socket would keep its connection up, unseen by either end."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                caller, _ = self._listener.accept()
            except OSError:
                return
            far = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with self._lock:
                closed = self._closed
                self._sockets += [caller, far]
            if closed:
                caller.close()
                far.close()
                return
            try:
                far.connect(str(self.target))
            except OSError:  # the target is down: the caller sees its connection closed
                caller.close()
                far.close()
                continue
            link = _RequestLink(far, self._calls)
            threading.Thread(
                target=self._pump, args=(caller, far, self.requests, link.forward), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(far, caller, self.answers, caller.sendall), daemon=True
            ).start()

    @staticmethod
    def _pump(
        source: socket.socket, sink: socket.socket, gate: _Gate, send: Callable[[bytes], None]
    ) -> None:
        try:
            while data := source.recv(65536):
                gate.pass_through(len(data))
                send(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            return
