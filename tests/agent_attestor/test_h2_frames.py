"""The frame reader the relay's meter and SETTINGS rewrite share (h2_frames.py): every frame's
header, and where its payload lies, however the stream is split between reads."""

from __future__ import annotations

import pytest

from agent_attestor.h2_frames import HEADER, PREFACE, FrameReader, payload_length
from tests.agent_attestor.raw_h2 import DATA, HEADERS, PING, SETTINGS, frame

FRAMES = [
    frame(SETTINGS, 0, 0, bytes(range(12))),
    frame(DATA, 0, 1),
    frame(HEADERS, 4, 1, b"h" * 300),
    frame(PING, 0, 0, b"p" * 8),
    frame(DATA, 1, 1, b"d" * 20),
]


@pytest.mark.parametrize("piece", [1, 2, 8, 9, 10, 31, 1000])
def test_each_frame_and_its_payload_are_found_however_the_stream_is_split(piece: int) -> None:
    stream = PREFACE + b"".join(FRAMES)
    reader = FrameReader(len(PREFACE))
    heads: list[bytes] = []
    payloads: list[bytes] = []
    for start in range(0, len(stream), piece):
        data = memoryview(stream[start : start + piece])
        got = reader.feed(data)
        pos = reader.first
        for head in got:
            # The part of the payload in this read (the rest follows in the next ones).
            payloads.append(bytes(data[pos : pos + payload_length(head)]))
            pos += payload_length(head) + HEADER
        heads += got
    assert heads == [one[:HEADER] for one in FRAMES]
    for one, seen in zip(FRAMES, payloads, strict=True):
        assert one[HEADER:].startswith(seen)
        if piece >= len(stream):
            assert seen == one[HEADER:]
