"""A Unix socket in front of another that can hold back the bytes of one direction: a slow link
or a stalled peer, for real, so a test can act (cancel, interrupt) while a call is in flight.

    with HeldSocket(root / "held.sock", agent.socket_path) as held:
        held.hold_answers()           # what the agent sends waits here
        ...                           # start a call, cancel it
        held.release()                # everything held goes on, in order
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from types import TracebackType


class _Gate:
    """Open or closed; a pump waits at a closed gate, counting what it holds."""

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


class HeldSocket:
    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self.requests = _Gate()  # caller -> target
        self.answers = _Gate()  # target -> caller
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

    def release(self) -> None:
        self.requests.open.set()
        self.answers.open.set()

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
            threading.Thread(
                target=self._pump, args=(caller, far, self.requests), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(far, caller, self.answers), daemon=True
            ).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, gate: _Gate) -> None:
        try:
            while data := source.recv(65536):
                gate.pass_through(len(data))
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            return
