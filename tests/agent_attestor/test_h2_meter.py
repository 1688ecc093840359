"""The relay's budgets of HTTP/2 frames (h2_meter.py): floods of frames grpc-core answers or
drops for ever are cut, a gRPC client's calls are not."""

from __future__ import annotations

import struct

from agent_attestor.h2_meter import CONTROL_BURST, CONTROL_REFILL, FRAME_BURST, PREFACE, FrameMeter
from svid._clock import FakeClock
from tests.agent_attestor.raw_h2 import DATA, END_STREAM, PING, SETTINGS, frame, grpc_call

WINDOW_UPDATE, RST_STREAM = 8, 3
PING_ACK = frame(PING, 1, 0, bytes(8))


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
