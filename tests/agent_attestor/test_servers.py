"""The choice of server: initial spread, failover order, DNS answers, and the reconnect backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache
from agent_attestor.errors import ChannelNotVerifiedError
from agent_attestor.node_client import NodeClient, wait_connected
from agent_attestor.servers import (
    Server,
    ServerChooser,
    Target,
    expand,
    first_pick,
    join_host_port,
    next_pick,
    pair_targets,
    should_move,
    split_host_port,
)
from agent_attestor.sync import Syncer, SyncSettings
from svid._backoff import backoff_delay
from svid._clock import FakeClock, SystemClock
from svid._der import certs_to_pem
from tests.agent_attestor.pki import LocalCa

A, B, C = (Server(f"10.0.0.{n}:8081", f"10.0.0.{n}:8082") for n in (1, 2, 3))
AGENTS = 1000


def test_host_and_port_split_and_join_with_ipv6_brackets() -> None:
    assert split_host_port("svid.example:8081") == ("svid.example", "8081")
    assert split_host_port("[::1]:8081") == ("::1", "8081")
    assert join_host_port("::1", "8081") == "[::1]:8081"
    assert join_host_port("10.0.0.1", "8081") == "10.0.0.1:8081"


def test_attest_addresses_pair_one_for_all_or_one_per_server() -> None:
    assert pair_targets(["a:1", "b:1"], ["x:2"]) == (Target("a:1", "x:2"), Target("b:1", "x:2"))
    assert pair_targets(["a:1", "b:1"], ["a:2", "b:2"]) == (
        Target("a:1", "a:2"),
        Target("b:1", "b:2"),
    )
    with pytest.raises(ValueError, match="3 server addresses but 2 attest"):
        pair_targets(["a:1", "b:1", "c:1"], ["a:2", "b:2"])


def test_a_name_with_several_addresses_is_several_servers() -> None:
    targets = [Target("svid.internal:8081", "svid.internal:8082"), Target("10.9.9.9:1", "lb:2")]
    answers = {"svid.internal": ["10.0.0.2", "10.0.0.1", "10.0.0.2", "fd00::1"]}
    assert expand(targets, answers) == (
        Server("10.0.0.1:8081", "10.0.0.1:8082"),  # attest follows to the same machine
        Server("10.0.0.2:8081", "10.0.0.2:8082"),
        Server("[fd00::1]:8081", "[fd00::1]:8082"),
        Server("10.9.9.9:1", "lb:2"),  # another host's attest address is dialled as written
    )
    # Without an answer the name is dialled as written (gRPC resolves it itself).
    assert expand(targets[:1], {}) == (Server("svid.internal:8081", "svid.internal:8082"),)
    # A different attest host stays as written even when the node name resolves.
    other = [Target("svid.internal:8081", "attest.internal:8082")]
    assert expand(other, answers)[0] == Server("10.0.0.1:8081", "attest.internal:8082")


def test_initial_picks_spread_over_the_list() -> None:
    servers = [A, B, C]
    picks = Counter(first_pick(servers, random.Random(agent)) for agent in range(AGENTS))
    assert set(picks) == set(servers)
    # Expected 333 each, standard deviation ~15: 250..420 is over five deviations either side.
    assert all(250 <= n <= 420 for n in picks.values()), picks


def test_a_dead_servers_agents_spread_over_the_survivors() -> None:
    moved = Counter(
        next_pick([A, B, C], A, frozenset({A}), random.Random(agent))[0] for agent in range(AGENTS)
    )
    assert set(moved) == {B, C}  # never back to the server that failed
    assert all(400 <= n <= 600 for n in moved.values()), moved


def test_failover_tries_every_server_once_per_round_then_starts_again() -> None:
    rand = random.Random(3)
    current, tried = A, frozenset({A})
    seen = [current]
    for _ in range(2):
        current, tried = next_pick([A, B, C], current, tried, rand)
        seen.append(current)
    assert sorted(seen) == [A, B, C]  # a round: each server once
    for _ in range(20):
        previous = current
        current, tried = next_pick([A, B, C], current, tried, rand)
        assert current != previous  # a new round still moves away from the one that failed
    # Alone in the list, the server is retried.
    assert next_pick([A], A, frozenset({A}), rand)[0] == A


@pytest.mark.parametrize(
    ("code", "move"),
    [
        (None, True),  # refused, reset, timed out
        ("UNAVAILABLE", True),
        ("DEADLINE_EXCEEDED", True),
        ("RESOURCE_EXHAUSTED", True),
        ("INTERNAL", True),
        ("PERMISSION_DENIED", False),  # the shared datastore's answer: the same everywhere
        ("UNAUTHENTICATED", False),
        ("INVALID_ARGUMENT", False),
    ],
)
def test_only_a_server_failure_moves_the_agent(code: str | None, move: bool) -> None:
    assert should_move(code) is move


def test_first_reconnects_of_a_thousand_agents_are_spread_not_at_once() -> None:
    """Agents that lost the same server at the same instant come back over the whole window."""
    low = 1.0
    delays = [backoff_delay(0, low, 10.0, random.Random(agent)) for agent in range(AGENTS)]
    assert all(0.0 <= d <= low for d in delays)
    # Ten 100 ms slots, 100 agents expected in each (deviation ~9.5): none holds more than 150.
    slots = Counter(min(int(d / (low / 10)), 9) for d in delays)
    assert len(slots) == 10
    assert max(slots.values()) <= 150, slots
    assert len(set(delays)) == AGENTS


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 10.0), (500, 10.0)]:
        delays = [backoff_delay(attempt, 0.5, 10.0, random.Random(n)) for n in range(200)]
        assert max(delays) <= ceiling
        assert max(delays) > ceiling * 0.9  # full jitter reaches the ceiling
        assert min(delays) < ceiling * 0.1  # and starts from zero


class _Dns:
    def __init__(self, answer: list[str]) -> None:
        self.answer = answer
        self.asked = 0

    async def __call__(self, host: str) -> list[str]:
        self.asked += 1
        if not self.answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.answer)


def test_the_name_is_resolved_at_every_pick_and_a_new_answer_is_followed() -> None:
    dns = _Dns(["10.0.0.1", "10.0.0.2"])
    chooser = ServerChooser(
        [Target("svid.internal:8081", "svid.internal:8082")], random.Random(1), dns
    )

    async def scenario() -> None:
        first = await chooser.first()
        assert first in {A, B}
        dns.answer = ["10.0.0.3"]  # the operator replaced both servers
        assert await chooser.next() == C
        assert dns.asked == 2
        dns.answer = []  # DNS is down: the last answer is used
        assert await chooser.next() == C

    asyncio.run(scenario())


def test_a_move_has_somewhere_to_go_when_the_last_answer_named_another_server() -> None:
    """What a renewal that failed asks before it ends the connection (Syncer._renew_loop): a
    name is as many servers as its addresses, one address is the only server there is."""
    dns = _Dns(["10.0.0.1", "10.0.0.2"])
    chooser = ServerChooser(
        [Target("svid.internal:8081", "svid.internal:8082")], random.Random(1), dns
    )

    async def scenario() -> list[bool]:
        seen = [chooser.has_others()]  # nothing picked, nothing resolved yet
        await chooser.first()
        seen.append(chooser.has_others())
        dns.answer = ["10.0.0.3"]
        await chooser.next()
        seen.append(chooser.has_others())
        return seen

    assert asyncio.run(scenario()) == [False, True, False]


def test_the_chooser_stays_until_told_its_server_failed() -> None:
    chooser = ServerChooser(
        [Target(s.node, s.attest) for s in (A, B, C)], random.Random(5), _Dns([])
    )

    async def scenario() -> list[Server]:
        start = await chooser.first()
        chooser.connected()
        after_failure = await chooser.next()
        chooser.connected()
        return [start, after_failure, chooser.current or A]

    start, after_failure, still = asyncio.run(scenario())
    assert after_failure != start
    assert still == after_failure


def test_a_refused_connection_fails_at_once_and_a_silent_server_after_the_timeout() -> None:
    async def attempt(address: str, timeout: float) -> tuple[str, float]:
        started = time.monotonic()
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await wait_connected(channel, address, timeout)
            except ConnectionError as exc:
                return str(exc), time.monotonic() - started
            # Settled on a failure: the call fails at once, with gRPC's reason.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary("/x.Y/Z")(b"", timeout=timeout)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            return err.value.details() or "", time.monotonic() - started

    # Bound and not listening: refused, and the port stays ours. Closed first, the port was
    # free for any other test's bind(0) (or an outgoing connection) before the attempt.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"
        reason, took = asyncio.run(attempt(refused, 5.0))
    assert took < 2.0
    assert "onnection refused" in reason

    # Accepts TCP and never speaks HTTP/2: the connection never becomes ready.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        reason, took = asyncio.run(attempt(address, 0.5))
    finally:
        silent.close()
    assert 0.4 < took < 3.0
    assert reason == f"no connection to {address} within 0.5 s"


def test_a_connection_given_less_than_connect_timeout_to_a_silent_server_ends_then() -> None:
    """A server that accepts TCP and never answers TLS (stopped) held a connection for
    connect_timeout at each of its steps, whatever the agent SVID had left (Syncer passes a
    share of it: _connect_within)."""
    ca = LocalCa(SystemClock())
    key = ec.generate_private_key(ec.SECP256R1())
    agent = "spiffe://example.org/svid/agent/join_token/t"
    svid = AgentSvid(agent, (ca.sign_leaf(key.public_key(), agent),), key)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    address = f"127.0.0.1:{silent.getsockname()[1]}"

    async def attempt() -> tuple[str, float]:
        client = NodeClient(address, address, certs_to_pem([ca.cert]), svid, 5.0)
        started = time.monotonic()
        try:
            with pytest.raises(ConnectionError) as failed:
                await client.connect(0.5)
            return str(failed.value), time.monotonic() - started
        finally:
            await client.close()

    try:
        reason, took = asyncio.run(attempt())
    finally:
        silent.close()
    assert took < 3.0  # 0.5 s, on a loaded host a little more; never connect_timeout (5 s)
    assert reason == f"no connection to {address} within 0.5 s"


def _syncer(*servers: Server) -> tuple[Syncer, list[str]]:
    events: list[str] = []
    settings = SyncSettings(tuple(Target(s.node, s.attest) for s in servers), rand=random.Random(2))
    store = AgentStore(Path("/nonexistent/svid"), Path("/nonexistent/key"), Path("/nonexistent/b"))
    return Syncer(settings, store, Cache(), FakeClock(), events.append), events


def test_the_syncer_moves_on_a_failure_but_not_on_the_servers_decision() -> None:
    syncer, events = _syncer(A, B, C)

    async def scenario() -> list[str]:
        await syncer._servers.first()
        seen = [syncer.server]
        await syncer._after_failure("PERMISSION_DENIED", "PERMISSION_DENIED")
        seen.append(syncer.server)  # refused by the shared datastore: stays
        await syncer._after_failure("UNAVAILABLE", "UNAVAILABLE")
        seen.append(syncer.server)
        await syncer._after_failure(None, "cannot connect")
        seen.append(syncer.server)
        return seen

    start, refused, moved, again = asyncio.run(scenario())
    assert refused == start
    assert len({start, moved, again}) == 3  # each failure: a server not tried yet
    assert events == ["moved", "moved"]
    assert syncer.moves == 2


def test_a_single_server_is_reconnected_without_a_move() -> None:
    syncer, events = _syncer(A)

    async def scenario() -> None:
        await syncer._servers.first()
        await syncer._after_failure("UNAVAILABLE", "UNAVAILABLE")

    asyncio.run(scenario())
    assert syncer.server == A.node
    assert events == []
    assert syncer.moves == 0


def test_a_server_name_the_resolver_cannot_encode_is_retried_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An empty label (a typo) fails IDNA encoding with UnicodeError, not OSError: it ended the
    # Sync task for good, and the agent ran on serving nothing, with no word as to why.
    bad = Target("svid..example.org:8081", "svid..example.org:8082")
    settings = SyncSettings((bad,), reconnect_min=0.01, reconnect_max=0.01)
    store = AgentStore(Path("/nonexistent/svid"), Path("/nonexistent/key"), Path("/nonexistent/b"))
    syncer = Syncer(settings, store, Cache(), FakeClock())

    async def scenario() -> bool:
        task = asyncio.create_task(syncer.run())
        await asyncio.sleep(0.3)
        alive = not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return alive

    with caplog.at_level(logging.WARNING, logger="agent_attestor"):
        assert asyncio.run(scenario())
    assert "cannot resolve the server name" in caplog.text
    assert syncer.server == bad.node  # dialled as written, as with any name that fails


class _Longest(random.Random):
    """Jitter that always picks the longest wait allowed."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_a_saved_svid_set_aside_again_and_again_backs_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server whose own bundle does not verify its certificate: each attestation with the
    # given bundle succeeds, each stream then fails verification, and the saved SVID is set
    # aside again. Only the first set-aside may skip the backoff, or the agent spins.
    # Each backoff its longest (0.1 s): about 5 streams in 0.5 s, where the jitter's shortest
    # waits could make an honest loop count past the limit below now and then.
    settings = SyncSettings((A,), reconnect_min=0.1, reconnect_max=0.1, rand=_Longest())
    store = AgentStore(Path("/nonexistent/svid"), Path("/nonexistent/key"), Path("/nonexistent/b"))
    syncer = Syncer(settings, store, Cache(), FakeClock())
    calls = 0

    async def sync_once() -> None:
        nonlocal calls
        calls += 1
        if calls > 1000:  # a loop that never awaits never lets the test's timer fire
            raise asyncio.CancelledError
        # What the agent SVID's channel raises when its roots refuse the server's certificate.
        raise ChannelNotVerifiedError("CERTIFICATE_VERIFY_FAILED: unable to get local issuer")

    monkeypatch.setattr(syncer, "_sync_once", sync_once)
    monkeypatch.setattr(syncer, "_set_aside_saved_svid", lambda details: True)

    async def scenario() -> None:
        await syncer._servers.first()
        task = asyncio.create_task(syncer.run())
        await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert calls <= 10, f"{calls} streams in 0.5 s: the set-aside skipped every backoff"


@pytest.mark.parametrize("attestor", ["join_token", "x509pop"])
def test_a_refused_agent_is_told_how_its_own_attestor_comes_back(
    attestor: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An x509pop agent attests again by itself with its certificate; only a join-token agent
    # needs a new token from the operator.
    pop = ([], ec.generate_private_key(ec.SECP256R1())) if attestor == "x509pop" else None
    settings = SyncSettings((A,), join_token="t.s" if pop is None else "", x509pop=pop)
    store = AgentStore(tmp_path / "svid", tmp_path / "key", tmp_path / "bundle")
    syncer = Syncer(settings, store, Cache(), FakeClock())
    with caplog.at_level(logging.ERROR, logger="agent_attestor.sync"):
        asyncio.run(syncer._refused(grpc.StatusCode.PERMISSION_DENIED, "agent evicted"))
    (line,) = [r.getMessage() for r in caplog.records if "evicted or banned" in r.getMessage()]
    if attestor == "x509pop":
        assert "join token" not in line
        assert "attests again with its x509pop certificate" in line
    else:
        assert "--join-token-file" in line
