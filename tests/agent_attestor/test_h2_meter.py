"""The relay's budgets of HTTP/2 frames (h2_meter.py): floods of frames grpc-core answers or
drops for ever are cut, a gRPC client's calls are not."""

from __future__ import annotations

import struct
from collections.abc import Callable

from agent_attestor.h2_frames import FrameReader
from agent_attestor.h2_meter import (
    ANSWERS_OWED,
    CONTROL_BURST,
    CONTROL_REFILL,
    FRAME_BURST,
    OPEN_STREAMS_KEPT,
    PREFACE,
    FrameMeter,
)
from svid._clock import FakeClock
from tests.agent_attestor.raw_h2 import DATA, END_STREAM, HEADERS, PING, SETTINGS, frame, grpc_call

WINDOW_UPDATE, RST_STREAM = 8, 3
PING_ACK = frame(PING, 1, 0, bytes(8))


def _agent(meter: FrameMeter) -> Callable[[bytes], None]:
    """The agent's side of a relay: its bytes, read by one FrameReader, told to `meter`."""
    reader = FrameReader()

    def sends(data: bytes) -> None:
        meter.answers(reader.feed(memoryview(data)))

    return sends


def fed(meter: FrameMeter, data: bytes, piece: int = 0) -> bool:
    """What the meter says after `data`, given whole or in pieces of `piece` bytes."""
    step = piece or len(data) or 1
    ok = True
    for start in range(0, len(data), step):
        ok = meter.feed(memoryview(data[start : start + step]))
    return ok


def test_a_flood_of_ping_acks_is_cut_after_the_control_burst() -> None:
    meter = FrameMeter(FakeClock())
    assert fed(meter, PREFACE + frame(SETTINGS, 0, 0) + PING_ACK * (CONTROL_BURST - 1))
    assert not fed(meter, PING_ACK * 2)
    assert not fed(meter, frame(DATA, END_STREAM, 1, bytes(5)))  # cut for good


def test_each_kind_of_control_frame_is_counted() -> None:
    for one in (
        frame(PING, 0, 0, bytes(8)),
        frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535)),
        frame(RST_STREAM, 0, 1, struct.pack(">I", 8)),
        frame(9, 0, 1, b"\x00\x01a\x01b"),  # CONTINUATION
        frame(DATA, 0, 1),  # empty, ending nothing
        frame(0x20, 0, 0, bytes(8)),  # unknown type
    ):
        meter = FrameMeter(FakeClock())
        assert fed(meter, PREFACE + one * CONTROL_BURST)
        assert not fed(meter, one)


def test_frames_split_anywhere_between_reads_are_counted_alike() -> None:
    meter = FrameMeter(FakeClock())
    flood = PREFACE + (frame(DATA, 0, 1, b"x" * 20) + PING_ACK) * CONTROL_BURST
    assert fed(meter, flood, piece=7)
    assert not fed(meter, PING_ACK, piece=4)


def test_control_frames_at_their_refill_rate_go_on_for_ever() -> None:
    clock = FakeClock()
    meter = FrameMeter(clock)
    assert fed(meter, PREFACE)
    for _ in range(100):
        clock.advance(1.0)
        assert fed(meter, PING_ACK * int(CONTROL_REFILL))


def test_calls_with_their_window_updates_are_not_cut() -> None:
    """grpcio's client sends HEADERS and DATA for a call, two WINDOW_UPDATEs for its answer."""
    clock = FakeClock()
    meter = FrameMeter(clock)
    call = (
        grpc_call(1, "/grpc.health.v1.Health/Check", b"")
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 5)) * 2
    )
    assert fed(meter, PREFACE)
    for _ in range(20):  # 3,000 calls a second, on one connection
        clock.advance(0.1)
        assert fed(meter, call * 300)


def test_a_flood_of_tiny_data_frames_is_cut() -> None:
    meter = FrameMeter(FakeClock())
    assert not fed(meter, PREFACE + frame(DATA, 0, 1, b"x") * (FRAME_BURST + 1))


def test_large_header_blocks_cost_more() -> None:
    meter = FrameMeter(FakeClock())
    big = grpc_call(1, "/x", b"", (("x-big", "a" * 100),))  # HPACK lengths under 127 only
    padded = frame(1, 4, 1, bytes(16384))  # a 16 KiB header block: five units
    assert fed(meter, PREFACE + big + padded * (FRAME_BURST // 5 - 1))
    assert not fed(meter, padded * 2)


def reset(stream: int) -> bytes:
    return frame(RST_STREAM, 0, stream, struct.pack(">I", 8))


def test_resets_of_the_clients_own_calls_are_part_of_the_calls() -> None:
    """An asyncio app whose calls time out (or are cancelled) resets each: 500 a second."""
    clock = FakeClock()
    meter = FrameMeter(clock)
    assert fed(meter, PREFACE)
    stream = 1
    for _ in range(10):
        clock.advance(1.0)
        calls = b""
        for _ in range(500):
            calls += grpc_call(stream, "/SpiffeWorkloadAPI/FetchJWTSVID", b"") + reset(stream)
            stream += 2
        assert fed(meter, calls)


def test_resets_of_streams_never_opened_or_reset_already_are_control_frames() -> None:
    for resets in (
        b"".join(reset(s) for s in range(3, 3 + 2 * (CONTROL_BURST + 1), 2)),  # never opened
        reset(1) * (CONTROL_BURST + 2),  # the first one is the call's
        reset(2) * (CONTROL_BURST + 1),  # a stream of the server's
    ):
        meter = FrameMeter(FakeClock())
        assert fed(meter, PREFACE + grpc_call(1, "/x", b""))
        assert not fed(meter, resets)


def test_a_stream_opened_long_ago_is_forgotten() -> None:
    meter = FrameMeter(FakeClock())
    opened = b"".join(grpc_call(s, "/x", b"") for s in range(1, 2 * OPEN_STREAMS_KEPT + 3, 2))
    assert fed(meter, PREFACE + opened)
    assert len(meter._open) == OPEN_STREAMS_KEPT  # bounded memory, whatever the client opens
    assert not fed(meter, reset(1) * (CONTROL_BURST + 1))


def test_a_huge_frame_length_holds_no_memory() -> None:
    """A frame's length is skipped over as it comes, never buffered: 16 MiB is read in pieces."""
    meter = FrameMeter(FakeClock())
    huge = b"\xff\xff\xff" + bytes([DATA, 0]) + struct.pack(">I", 1)  # 16 MiB - 1 of payload
    assert fed(meter, PREFACE + huge)
    for _ in range(255):
        assert fed(meter, bytes(65536))
    assert not meter._sent._head  # nothing of the payload is kept
    assert fed(meter, bytes(65535) + PING_ACK * CONTROL_BURST)
    assert not fed(meter, PING_ACK)


def test_a_ping_after_each_data_frame_of_the_agents_is_not_a_control_frame() -> None:
    """grpc-go's BDP estimator pings after a DATA frame it reads, while no such ping is out."""
    clock = FakeClock()
    meter = FrameMeter(clock)
    assert fed(meter, PREFACE)
    agent_sends = _agent(meter)
    answer = frame(HEADERS, 4, 1, b"\x88") + frame(DATA, 0, 1, bytes(100))
    bdp_ping = frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 100)) + frame(PING, 0, 0, bytes(8))
    for stream in range(1, 2001, 2):  # a thousand calls in a second
        clock.advance(0.001)
        assert fed(meter, grpc_call(stream, "/x", b""))
        agent_sends(answer)
        assert fed(meter, bdp_ping)


def test_pings_owed_for_the_agents_data_are_bounded() -> None:
    meter = FrameMeter(FakeClock())
    assert fed(meter, PREFACE)
    agent_sends = _agent(meter)
    agent_sends(frame(DATA, 0, 1, bytes(10)) * 10_000)
    agent_sends(frame(DATA, 0, 1))  # empty: owed nothing
    pings = frame(PING, 0, 0, bytes(8)) * (ANSWERS_OWED + CONTROL_BURST)
    assert fed(meter, pings)
    assert not fed(meter, frame(PING, 0, 0, bytes(8)))


def test_acks_of_the_agents_pings_and_settings_are_not_control_frames() -> None:
    meter = FrameMeter(FakeClock())
    assert fed(meter, PREFACE)
    agent_sends = _agent(meter)
    for _ in range(4 * CONTROL_BURST):
        agent_sends(frame(PING, 0, 0, bytes(8)) + frame(SETTINGS, 0, 0))
        assert fed(meter, PING_ACK + frame(SETTINGS, 1, 0))


def test_the_agents_frames_split_anywhere_are_read_alike() -> None:
    meter = FrameMeter(FakeClock())
    assert fed(meter, PREFACE)
    agent_sends = _agent(meter)
    agent = frame(DATA, 0, 1, bytes(40_000)) + frame(PING, 0, 0, bytes(8))
    for start in range(0, len(agent), 7):
        agent_sends(agent[start : start + 7])
    assert fed(meter, frame(PING, 0, 0, bytes(8)) + PING_ACK)
    assert fed(meter, PING_ACK * CONTROL_BURST)
    assert not fed(meter, PING_ACK)
