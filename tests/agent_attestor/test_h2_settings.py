"""The internal server's SETTINGS as the relay passes them on (h2_settings.py): the stream limit
the workload reads is the advertised one, whatever else the frame says and however it is split."""

from __future__ import annotations

import struct

import pytest

from agent_attestor.h2_settings import STREAMS_ADVERTISED, STREAMS_ALLOWED, SettingsRewriter
from tests.agent_attestor.raw_h2 import ACK, DATA, END_STREAM, SETTINGS, frame

MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 0x3, 0x4


def entries(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">HI", key, value) for key, value in pairs)


def rewritten(data: bytes, piece: int) -> bytes:
    rewriter = SettingsRewriter()
    out = bytearray(data)
    view = memoryview(out)
    for start in range(0, len(out), piece):
        rewriter.rewrite(view[start : start + piece])
    return bytes(out)


# As grpc-core's server sends it: the stream limit between other settings.
SERVER_SETTINGS = frame(
    SETTINGS,
    0,
    0,
    entries(
        (0x2, 0),
        (MAX_CONCURRENT_STREAMS, STREAMS_ALLOWED),
        (INITIAL_WINDOW_SIZE, 65535),
        (0x5, 16384),
    ),
)


@pytest.mark.parametrize("piece", [1, 2, 5, 9, 13, 17, 1000])
def test_the_stream_limit_is_rewritten_however_the_frames_are_split(piece: int) -> None:
    answer = frame(DATA, END_STREAM, 1, entries((MAX_CONCURRENT_STREAMS, STREAMS_ALLOWED)))
    data = SERVER_SETTINGS + frame(SETTINGS, ACK, 0) + answer + SERVER_SETTINGS
    expected = SERVER_SETTINGS.replace(
        entries((MAX_CONCURRENT_STREAMS, STREAMS_ALLOWED)),
        entries((MAX_CONCURRENT_STREAMS, STREAMS_ADVERTISED)),
    )
    assert expected != SERVER_SETTINGS
    # A DATA frame's bytes that look like the setting are an answer's, and left alone.
    assert rewritten(data, piece) == expected + frame(SETTINGS, ACK, 0) + answer + expected


def test_settings_without_a_stream_limit_pass_unchanged() -> None:
    data = frame(SETTINGS, 0, 0, entries((INITIAL_WINDOW_SIZE, STREAMS_ALLOWED))) + frame(
        SETTINGS, 0, 0
    )
    assert rewritten(data, 4) == data


@pytest.mark.parametrize("piece", [1, 3, 1000])
@pytest.mark.parametrize("limit", [0, 1, STREAMS_ADVERTISED - 1, STREAMS_ADVERTISED])
def test_a_stream_limit_the_server_lowered_is_never_raised(piece: int, limit: int) -> None:
    # grpc-core may send SETTINGS again with a lower limit (its max_concurrent_streams policy
    # takes off streams it still counts): raised to the advertised one, the workload opened
    # streams the server then refused.
    data = frame(
        SETTINGS, 0, 0, entries((INITIAL_WINDOW_SIZE, 65535), (MAX_CONCURRENT_STREAMS, limit))
    )
    assert rewritten(SERVER_SETTINGS + data, piece)[len(SERVER_SETTINGS) :] == data


@pytest.mark.parametrize("piece", [1, 4, 1000])
@pytest.mark.parametrize("limit", [STREAMS_ADVERTISED + 1, 0x100, 0x10000, 0x7FFFFFFF])
def test_a_stream_limit_above_the_advertised_one_is_lowered(piece: int, limit: int) -> None:
    data = frame(SETTINGS, 0, 0, entries((MAX_CONCURRENT_STREAMS, limit)))
    expected = frame(SETTINGS, 0, 0, entries((MAX_CONCURRENT_STREAMS, STREAMS_ADVERTISED)))
    assert rewritten(data, piece) == expected
