"""The agent's keepalive pings and the server's enforcement of them agree, under the channel
argument names grpc reads: a misspelt name is ignored without a word, the server then kept
grpc's default (pings at most every 5 min on a quiet connection) and sent every agent on a
quiet Sync stream GOAWAY too_many_pings after three of its 15 s pings."""

from __future__ import annotations

from agent_attestor.node_client import _OPTIONS as AGENT_OPTIONS
from server.app import KEEPALIVE_OPTIONS

# GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, as grpc_types.h spells its string.
MIN_RECV_PING_INTERVAL = "grpc.http2.min_ping_interval_without_data_ms"


def test_the_server_accepts_the_agents_keepalive_pings_with_room_to_spare() -> None:
    server, agent = dict(KEEPALIVE_OPTIONS), dict(AGENT_OPTIONS)
    assert server["grpc.keepalive_permit_without_calls"] == 1
    # A ping delayed on a busy machine still arrives later than the server's minimum.
    assert server[MIN_RECV_PING_INTERVAL] <= agent["grpc.keepalive_time_ms"] * 2 // 3


def test_every_keepalive_option_is_a_name_grpc_reads() -> None:
    known = {
        "grpc.keepalive_time_ms",
        "grpc.keepalive_timeout_ms",
        "grpc.keepalive_permit_without_calls",
        "grpc.http2.max_pings_without_data",
        "grpc.http2.ping_timeout_ms",
        MIN_RECV_PING_INTERVAL,
    }
    for name, _ in (*KEEPALIVE_OPTIONS, *AGENT_OPTIONS):
        if "ping" in name or "keepalive" in name:
            assert name in known, f"{name} is not a channel argument grpc reads"
