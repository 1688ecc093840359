"""A delta split in parts reaches workloads whole or not at all: a Sync stream cut between its
parts (a server restarting, a connection reset) must leave the agent serving the last whole
state until a reconnect brings the run again, not the parts that came before the cut."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache
from agent_attestor.server_identity import SERVER_NAME
from agent_attestor.servers import Target
from agent_attestor.sync import Syncer, SyncSettings
from server.datastore import records
from server.sync_messages import Shared, delta_messages, snapshot_messages
from svid._clock import FakeClock, to_datetime
from svid._proto import common_pb2, node_pb2, node_pb2_grpc
from tests.agent_attestor.pki import LocalCa

AGENT = "spiffe://example.org/svid/agent/join_token/me"


def _entry(name: str) -> records.Entry:
    return records.Entry(
        name, f"spiffe://example.org/w/{name}", AGENT, (records.Selector("unix", f"uid:{name}"),)
    )


def _mtls_server_credentials(ca: LocalCa) -> grpc.ServerCredentials:
    """A server certificate by `ca` for the name the agent dials, asking for the agent's SVID."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = ca.clock.now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(now - 60))
        .not_valid_after(to_datetime(now + 3600))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(f"spiffe://{ca.trust_domain}/svid/server"),
                    x509.DNSName(SERVER_NAME),
                ]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return grpc.ssl_server_credentials(
        [
            (
                key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
                cert.public_bytes(Encoding.PEM),
            )
        ],
        root_certificates=ca.cert.public_bytes(Encoding.PEM),
        require_client_auth=True,
    )


class _CutBetweenParts(node_pb2_grpc.NodeServicer):
    """Sends a snapshot, then the first part of a two-part delta, and fails the stream; the
    reconnect, once `resume` is set, gets the whole delta and stays open."""

    def __init__(
        self,
        snapshot: list[node_pb2.SyncUpdate],
        run: list[node_pb2.SyncUpdate],
        resume: asyncio.Event,
    ) -> None:
        self.snapshot = snapshot
        self.run = run
        self.resume = resume
        self.requests: list[tuple[int, str]] = []

    async def Sync(  # type: ignore[override]
        self, request: node_pb2.SyncRequest, context: Any
    ) -> AsyncIterator[node_pb2.SyncUpdate]:
        self.requests.append((request.since_revision, request.epoch))
        if len(self.requests) == 1:
            for message in self.snapshot:
                yield message
            yield self.run[0]
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server going away")
        await self.resume.wait()
        for message in self.run:
            yield message
        await asyncio.Event().wait()  # held open, as a server's stream is


def _agent(tmp_path: Path, clock: Any) -> tuple[LocalCa, AgentStore, common_pb2.Bundle]:
    """A CA, an agent store holding an SVID it signed, and its bundle (saved too)."""
    ca = LocalCa(clock)
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    key = ec.generate_private_key(ec.SECP256R1())
    store.save_svid(AgentSvid(AGENT, (ca.sign_leaf(key.public_key(), AGENT, ttl=3600),), key))
    bundle = common_pb2.Bundle(
        trust_domain="example.org", x509_authorities=[ca.cert.public_bytes(Encoding.DER)]
    )
    store.save_bundle(tuple(bundle.x509_authorities))
    return ca, store, bundle


async def _sync_until(
    done: asyncio.Event,
    node: node_pb2_grpc.NodeServicer,
    ca: LocalCa,
    *,
    store: AgentStore,
    cache: Cache,
    clock: Any,
    on_change: Callable[[str], None],
) -> Syncer:
    """`node` served over mTLS and a Syncer on it run until `done` is set (20 s at most), then
    both stopped; the Syncer returned for what it holds."""
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServicer_to_server(node, server)
    port = server.add_secure_port("127.0.0.1:0", _mtls_server_credentials(ca))
    await server.start()
    address = f"127.0.0.1:{port}"
    settings = SyncSettings((Target(address, address),), reconnect_min=0.01, reconnect_max=0.02)
    syncer = Syncer(settings, store, cache, clock, on_change)
    task = asyncio.create_task(syncer.run())
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await syncer.close()
        await server.stop(None)
    return syncer


def _events_until_done(
    node: node_pb2_grpc.NodeServicer,
    ca: LocalCa,
    *,
    store: AgentStore,
    clock: Any,
    first_sync: Callable[[asyncio.AbstractEventLoop, asyncio.Event], None],
) -> list[str]:
    """A Syncer's events on `node` until it is disconnected or `done` is set: at its first
    sync, `first_sync(loop, done)` schedules the test's trouble and when to stop looking."""

    async def scenario() -> list[str]:
        cache = Cache(clock)
        events: list[str] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_change(event: str) -> None:
            events.append(event)
            if event == "sync" and events.count("sync") == 1:
                first_sync(loop, done)
            if event == "disconnected":
                done.set()

        await _sync_until(
            done, node, ca, store=store, cache=cache, clock=clock, on_change=on_change
        )
        return events

    return asyncio.run(scenario())


def test_a_delta_cut_between_its_parts_changes_nothing_workloads_see_until_it_comes_whole(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    ca, store, bundle = _agent(tmp_path, clock)
    # The entry "old" is replaced by "new": the server's own packing, one item a message, sends
    # the upsert first and the removal in the second part.
    snapshot = list(
        snapshot_messages(
            [_entry("kept"), _entry("old")], [], Shared(bundle=bundle), revision=5, epoch="ep"
        )
    )
    run = list(
        delta_messages(
            [_entry("new")], ["old"], [], [], Shared(), revision=6, epoch="ep", max_items=1
        )
    )
    assert [m.more for m in run] == [True, False]

    async def scenario() -> tuple[Any, ...]:
        resume = asyncio.Event()
        node = _CutBetweenParts(snapshot, run, resume)
        cache = Cache(clock)
        seen: dict[str, tuple[int, set[str]]] = {}
        resynced = asyncio.Event()

        def on_change(event: str) -> None:
            state = (cache.version, set(cache.entries()))
            if event == "sync" and "synced" not in seen:
                seen["synced"] = state
            elif event == "disconnected" and "cut" not in seen:
                seen["cut"] = state  # before the reconnect: what workloads meanwhile see
                resume.set()
            elif event == "sync" and "cut" in seen:
                resynced.set()

        syncer = await _sync_until(
            resynced,
            node,
            ca,
            store=store,
            cache=cache,
            clock=clock,
            on_change=on_change,
        )
        return seen, set(cache.entries()), syncer.position, node.requests

    seen, held, position, requests = asyncio.run(scenario())
    version, entries = seen["synced"]
    assert entries == {"kept", "old"}
    assert seen["cut"] == (version, entries), "the first part of a cut delta reached workloads"
    assert requests == [(0, ""), (5, "ep")]  # the reconnect resumes from the last whole state
    assert held == {"kept", "new"}
    assert (position.revision, position.epoch) == (6, "ep")


class _NewerServer(node_pb2_grpc.NodeServicer):
    """Sends a snapshot, a message of a kind this agent does not know (a newer server's), then
    a delta, and holds the stream open."""

    def __init__(self, messages: list[node_pb2.SyncUpdate]) -> None:
        self.messages = messages

    async def Sync(  # type: ignore[override]
        self, request: node_pb2.SyncRequest, context: Any
    ) -> AsyncIterator[node_pb2.SyncUpdate]:
        for message in self.messages:
            yield message
        await asyncio.Event().wait()


def test_a_message_of_a_kind_the_agent_does_not_know_is_skipped_not_read_as_a_snapshot(
    tmp_path: Path,
) -> None:
    """Read as a snapshot, as every kind but DELTA was, a newer server's message (HEARTBEAT to
    an agent older than it) emptied the agent's entries, and every workload lost its SVIDs."""
    clock = FakeClock(start=time.time())
    ca, store, bundle = _agent(tmp_path, clock)
    messages = [
        *snapshot_messages([_entry("kept")], [], Shared(bundle=bundle), revision=5, epoch="ep"),
        node_pb2.SyncUpdate(kind=7, revision=6, epoch="ep"),  # a kind yet to come
        *delta_messages([_entry("new")], [], [], [], Shared(), revision=6, epoch="ep"),
    ]

    async def scenario() -> set[str]:
        cache = Cache(clock)
        delta_in = asyncio.Event()

        def on_change(event: str) -> None:
            if event == "sync" and "new" in cache.entries():
                delta_in.set()

        await _sync_until(
            delta_in,
            _NewerServer(messages),
            ca,
            store=store,
            cache=cache,
            clock=clock,
            on_change=on_change,
        )
        return set(cache.entries())

    assert asyncio.run(scenario()) == {"kept", "new"}


class _LongRun(node_pb2_grpc.NodeServicer):
    """A snapshot, a heartbeat promising one every 0.1 s, then a delta whose parts come further
    apart than that (the agent's clock moved on by 0.15 s before each), with no heartbeat between
    them, as a server streams a long run; then the stream is held open."""

    def __init__(
        self, snapshot: list[node_pb2.SyncUpdate], run: list[node_pb2.SyncUpdate], clock: FakeClock
    ) -> None:
        self.snapshot = snapshot
        self.run = run
        self.clock = clock
        self.requests = 0

    async def Sync(  # type: ignore[override]
        self, request: node_pb2.SyncRequest, context: Any
    ) -> AsyncIterator[node_pb2.SyncUpdate]:
        self.requests += 1
        for message in self.snapshot:
            yield message
        yield node_pb2.SyncUpdate(kind=node_pb2.SyncUpdate.HEARTBEAT, heartbeat_interval_ms=100)
        for part in self.run:
            await asyncio.sleep(0.05)
            self.clock.advance(0.15)
            yield part
        await asyncio.Event().wait()


def test_the_parts_of_a_long_run_are_the_server_heard_not_silence(tmp_path: Path) -> None:
    """A stream whose server falls silent past its heartbeats' promise is ended (the agent moves
    on); the parts of a run are messages too. Counted from the last heartbeat alone, a run longer
    than two intervals ended the stream before its last part, and each reconnect asked for the
    same run again."""
    clock = FakeClock(start=time.time())
    ca, store, bundle = _agent(tmp_path, clock)
    snapshot = list(
        snapshot_messages([_entry("kept")], [], Shared(bundle=bundle), revision=5, epoch="ep")
    )
    names = [f"n{i}" for i in range(6)]
    run = list(
        delta_messages(
            [_entry(n) for n in names], [], [], [], Shared(), revision=6, epoch="ep", max_items=1
        )
    )
    assert len(run) == 6  # 0.9 s of the agent's clock from the first part to the last

    async def scenario() -> tuple[list[str], set[str], int]:
        node = _LongRun(snapshot, run, clock)
        cache = Cache(clock)
        events: list[str] = []
        whole = asyncio.Event()

        def on_change(event: str) -> None:
            events.append(event)
            # The run whole, or the stream ended before it: either is the answer.
            if event == "disconnected" or (event == "sync" and set(names) <= set(cache.entries())):
                whole.set()

        await _sync_until(
            whole, node, ca, store=store, cache=cache, clock=clock, on_change=on_change
        )
        return events, set(cache.entries()), node.requests

    events, held, requests = asyncio.run(scenario())
    assert "disconnected" not in events
    assert requests == 1
    assert held == {"kept", *names}


def test_a_message_the_agent_is_slow_to_handle_does_not_end_its_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta whose bundle the agent saves on a stalled disk (its clock 1 s on, five times the
    heartbeats' promise): the agent's own time is no silence of the server's, and the stream is
    not ended for it (the link counts lost meanwhile, for verifiers, as before)."""
    clock = FakeClock(start=time.time())
    ca, store, bundle = _agent(tmp_path, clock)
    messages = [
        *snapshot_messages([_entry("kept")], [], Shared(bundle=bundle), revision=5, epoch="ep"),
        node_pb2.SyncUpdate(kind=node_pb2.SyncUpdate.HEARTBEAT, heartbeat_interval_ms=100),
        *delta_messages([_entry("new")], [], [], [], Shared(bundle=bundle), revision=6, epoch="ep"),
    ]
    saves: list[float] = []
    save = Syncer._save_bundle

    async def stalled(self: Syncer, roots: Any) -> None:
        saves.append(clock.monotonic())
        if len(saves) == 2:  # the delta's: the snapshot's comes before the stream is live
            clock.advance(1.0)
            await asyncio.sleep(0.4)  # past the silence watch's own wake-up (0.2 s)
        await save(self, roots)

    monkeypatch.setattr(Syncer, "_save_bundle", stalled)

    async def scenario() -> list[str]:
        cache = Cache(clock)
        events: list[str] = []
        answered = asyncio.Event()

        def on_change(event: str) -> None:
            events.append(event)
            if event == "disconnected" or (event == "sync" and "new" in cache.entries()):
                answered.set()

        await _sync_until(
            answered,
            _NewerServer(messages),
            ca,
            store=store,
            cache=cache,
            clock=clock,
            on_change=on_change,
        )
        return events

    events = asyncio.run(scenario())
    assert len(saves) == 2
    assert events == ["sync", "sync"]


class _BeatingServer(node_pb2_grpc.NodeServicer):
    """Sends its messages, then a heartbeat every `interval` seconds, as a healthy server does."""

    def __init__(self, messages: list[node_pb2.SyncUpdate], interval: float) -> None:
        self.messages = messages
        self.interval = interval
        self.streams = 0

    async def Sync(  # type: ignore[override]
        self, request: node_pb2.SyncRequest, context: Any
    ) -> AsyncIterator[node_pb2.SyncUpdate]:
        self.streams += 1
        beat = node_pb2.SyncUpdate(
            kind=node_pb2.SyncUpdate.HEARTBEAT,
            heartbeat_interval_ms=round(self.interval * 1000),
        )
        for message in self.messages:
            yield message
        while True:
            yield beat
            await asyncio.sleep(self.interval)


def test_the_agents_own_stalled_loop_is_no_silence_of_its_server(tmp_path: Path) -> None:
    """The agent's loop held up past the heartbeats' promise (a stalled host, a long pause,
    its clock 1 s on, five times the promise) while the server beat all along: the silence
    watch woke first and ended the stream before the agent read what came meanwhile, and the
    agent moved from a healthy server. Its own stall is no silence of the server's: the
    stream ends only if nothing comes within the promise once the loop runs again."""
    clock = FakeClock(start=time.time())
    ca, store, bundle = _agent(tmp_path, clock)
    messages = list(
        snapshot_messages([_entry("kept")], [], Shared(bundle=bundle), revision=5, epoch="ep")
    )
    server = _BeatingServer(messages, 0.1)

    def stall() -> None:
        clock.advance(1.0)
        time.sleep(0.6)  # past the silence watch's wake-up (0.2 s): it is the first to run

    def first_sync(loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
        loop.call_later(0.3, stall)
        loop.call_later(1.5, done.set)

    events = _events_until_done(server, ca, store=store, clock=clock, first_sync=first_sync)
    assert "disconnected" not in events
    assert server.streams == 1


class _HungServer(node_pb2_grpc.NodeServicer):
    """Sends its messages and one heartbeat, then nothing, its stream left open: a server hung
    (stopped, behind a black hole) that does not close it."""

    def __init__(self, messages: list[node_pb2.SyncUpdate], interval: float) -> None:
        self.messages = messages
        self.interval = interval

    async def Sync(  # type: ignore[override]
        self, request: node_pb2.SyncRequest, context: Any
    ) -> AsyncIterator[node_pb2.SyncUpdate]:
        for message in self.messages:
            yield message
        yield node_pb2.SyncUpdate(
            kind=node_pb2.SyncUpdate.HEARTBEAT, heartbeat_interval_ms=round(self.interval * 1000)
        )
        await asyncio.Event().wait()


@pytest.mark.parametrize("hung", [True, False])
def test_a_hung_server_is_noticed_by_an_agent_whose_loop_is_late_at_every_wake(
    tmp_path: Path, hung: bool
) -> None:
    """A loaded host holds the agent's loop up a little past a heartbeat interval again and
    again (0.5 s by its clock every 0.1 s, intervals of 0.1 s). Each late wake of the silence
    watch counted the silence from then, as the agent's own time, though nothing came once the
    stream was read again: a hung server's stream was never ended, the agent served by no
    server for as long as the load lasted. Once the loop ran, a second late wake with nothing
    heard since the first is the server's silence; a server heard in between is kept."""
    clock = FakeClock(start=time.time())
    ca, store, bundle = _agent(tmp_path, clock)
    messages = list(
        snapshot_messages([_entry("kept")], [], Shared(bundle=bundle), revision=5, epoch="ep")
    )
    server: node_pb2_grpc.NodeServicer = (
        _HungServer(messages, 0.1) if hung else _BeatingServer(messages, 0.1)
    )

    def first_sync(loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
        def lag() -> None:
            clock.advance(0.5)
            time.sleep(0.02)
            if not done.is_set():
                loop.call_later(0.1, lag)

        loop.call_soon(lag)
        loop.call_later(3.0, done.set)

    events = _events_until_done(server, ca, store=store, clock=clock, first_sync=first_sync)
    assert ("disconnected" in events) == hung


@pytest.mark.parametrize("interval", [0.1, 1.0])
def test_a_pause_that_hides_a_heartbeat_is_no_silence_however_late_the_watch_wakes(
    tmp_path: Path, interval: float
) -> None:
    """The agent's loop paused 2.8 intervals (a GC, a stalled host) from just after a beat:
    the next two beats came during the pause, unread, and the silence watch, due two intervals
    after the last beat, woke 0.8 of an interval late, under the threshold it took for a
    stalled loop (more than an interval): it ran first and ended a healthy server's stream. Its
    lateness says the loop was held up when it was due, however little it is."""
    clock = FakeClock(start=time.time())
    ca, store, bundle = _agent(tmp_path, clock)
    messages = list(
        snapshot_messages([_entry("kept")], [], Shared(bundle=bundle), revision=5, epoch="ep")
    )
    server = _BeatingServer(messages, interval)
    pause = 2.8 * interval

    def stall() -> None:
        clock.advance(pause)
        time.sleep(pause)

    def first_sync(loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
        loop.call_later(0.1 * interval, stall)
        loop.call_later(pause + 3 * interval, done.set)

    events = _events_until_done(server, ca, store=store, clock=clock, first_sync=first_sync)
    assert "disconnected" not in events
    assert server.streams == 1
