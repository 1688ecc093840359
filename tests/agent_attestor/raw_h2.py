"""A hand-made HTTP/2 client for what grpcio's own client never does: open gRPC streams and
grant the server no flow-control window, so that whatever it writes on them stays unsent.

Only what the server needs to start the calls is sent (the preface, SETTINGS, HEADERS with
literal HPACK fields, DATA); its SETTINGS and PINGs are acknowledged, nothing else is read.
"""

from __future__ import annotations

import socket
import struct
import threading

HEADERS, DATA, SETTINGS, PING = 1, 0, 4, 6
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal field without indexing, new name, no Huffman (both under 127 bytes)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def call_headers(stream: int, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The HEADERS frame that opens a gRPC call of `path` on `stream`."""
    fields = (
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    )
    return frame(HEADERS, END_HEADERS, stream, b"".join(_literal(k, v) for k, v in fields))


def grpc_call(
    stream: int, path: str, message: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> bytes:
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return call_headers(stream, path, metadata) + frame(DATA, END_STREAM, stream, body)


class StalledClient:
    """One connection to `path` whose streams the server may not send a byte of data on
    (`window`, the window it grants, is 0 unless given)."""

    def __init__(self, path: str, window: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, window))
        )
        self.headers_seen = threading.Event()  # the server answered a call's headers
        self._next = 1
        threading.Thread(target=self._pump, daemon=True).start()

    def call(self, path: str, message: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.sock.sendall(grpc_call(self._next, path, message, metadata))
        self._next += 2

    def _pump(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:  # a timeout set for sending: keep reading
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                kind, flags, payload = buf[3], buf[4], buf[9 : 9 + length]
                buf = buf[9 + length :]
                try:
                    if kind == SETTINGS and not flags & ACK:
                        self.sock.sendall(frame(SETTINGS, ACK, 0))
                    elif kind == PING and not flags & ACK:
                        self.sock.sendall(frame(PING, ACK, 0, payload))
                except OSError:
                    return
                if kind == HEADERS:
                    self.headers_seen.set()

    def send_partial_messages(self, path: str, streams: int, size: int) -> int:
        """Open `streams` calls of `path`, each announcing a `size`-byte message and sending all
        of it but its last 16 KiB. Returns how many bytes went out before the server stopped
        taking them (5 s without progress) or closed the connection."""
        chunk = bytes(16384)
        sent = 0
        self.sock.settimeout(5)
        try:
            for _ in range(streams):
                stream = self._next
                self._next += 2
                fields = (
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", path),
                    (":authority", "localhost"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                )
                block = b"".join(_literal(k, v) for k, v in fields)
                self.sock.sendall(frame(HEADERS, END_HEADERS, stream, block))
                self.sock.sendall(frame(DATA, 0, stream, b"\x00" + struct.pack(">I", size)))
                for _ in range(size // len(chunk) - 1):
                    self.sock.sendall(frame(DATA, 0, stream, chunk))
                    sent += len(chunk)
        except OSError:  # TimeoutError included: the server holds no more of it
            pass
        return sent

    def close(self) -> None:
        self.sock.close()
