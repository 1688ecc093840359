"""Where the frames of an HTTP/2 byte stream begin, as it is read in pieces of any size.

One reader per direction of a relayed connection: the workload's frames are metered
(h2_meter.py), the agent's tell the meter what the workload may answer and carry the SETTINGS
the relay lowers (h2_settings.py), each read once. Only a frame's 9-byte header is looked at
and kept, never its payload, and at most one header split between two reads, so memory is
bounded whatever a frame's length says.
"""

from __future__ import annotations

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER = 9


def payload_length(head: bytes) -> int:
    return (head[0] << 16) | (head[1] << 8) | head[2]


class FrameReader:
    """Fed a byte stream in order; `feed` returns the headers completed in each piece, and
    `first` says where in that piece the payload of the first of them begins (the others' follow
    from their lengths: frames are back to back)."""

    __slots__ = ("_head", "_skip", "first")

    def __init__(self, skip: int = 0) -> None:
        self._skip = skip  # bytes still to pass over: the preface, or a frame's payload
        self._head = bytearray()  # a frame header split between two reads
        self.first = 0

    def feed(self, data: memoryview) -> list[bytes]:
        heads: list[bytes] = []
        end = len(data)
        pos = self._skip  # past `end` when the frame goes on in a later read
        if self._head:
            pos = HEADER - len(self._head)
            self._head += data[:pos]
            if len(self._head) < HEADER:
                return heads
            head = bytes(self._head)
            self._head.clear()
            heads.append(head)
            self.first = pos
            pos += (head[0] << 16) | (head[1] << 8) | head[2]
        else:
            self.first = pos + HEADER
        # A jump from header to header: the payload is never looked at.
        while pos + HEADER <= end:
            head = bytes(data[pos : pos + HEADER])
            heads.append(head)
            pos += HEADER + ((head[0] << 16) | (head[1] << 8) | head[2])
        if pos >= end:
            self._skip = pos - end
        else:
            self._skip = 0
            self._head += data[pos:]
        return heads
