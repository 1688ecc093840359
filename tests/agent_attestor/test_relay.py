"""The relay as a byte pipe: integrity in both directions, back-pressure, half-close, cleanup.

The internal side here is a plain asyncio echo server (not gRPC), so the bytes can be checked
exactly; the Workload API tests cover the relay carrying real gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent_attestor import relay as relay_module
from agent_attestor.admission import capacity_for
from agent_attestor.errors import ConfigError
from agent_attestor.model import Selector
from agent_attestor.peer import CallerRegistry
from agent_attestor.relay import READ_BUFFER, RelaySettings, WorkloadRelay
from svid._clock import FakeClock
from svid.tasks import TaskClient
from svid.workloadapi import WorkloadApiClient, WorkloadApiUnavailableError
from tests.backlog import fill_backlog
from tests.tmpdirs import short_tmpdir


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir("rl-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()  # half-close: the client still reads what was echoed
    await writer.drain()
    writer.close()


async def _with_relay(
    root: Path,
    handler: Handler,
    body: Callable[[WorkloadRelay, list[str]], Awaitable[None]],
    public: Path | None = None,
    settings: RelaySettings | None = None,
    *,
    attestors: list[_HeldAttestor] | None = None,
) -> WorkloadRelay:
    peers: list[str] = []
    accepted: list[asyncio.StreamWriter] = []

    async def inner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername"))
        accepted.append(writer)
        await handler(reader, writer)

    internal = root / "api.sock"
    server = await asyncio.start_unix_server(inner, str(internal))
    relay = WorkloadRelay(
        public or root / "public.sock",
        internal,
        CallerRegistry(),
        attestors or [],
        settings=settings,
    )
    await relay.start()
    try:
        await asyncio.wait_for(body(relay, peers), 60)
    finally:
        await relay.close()
        server.close()
        # Since Python 3.12.1 wait_closed also waits for the connections the server accepted:
        # a handler that keeps its side open (_echo_ignoring_hang_up) held it for good.
        for writer in accepted:
            writer.close()
        await server.wait_closed()
    return relay


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 5 s")


def test_a_socket_directory_others_may_write_serves_only_when_declared_shared(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Kubernetes emptyDir is 0777 without the sticky bit: the agent refuses it unless the
    operator vouches for its writers (socket_dir_shared), and then serves there, saying so."""
    sockets = root / "sockets"
    sockets.mkdir()
    os.chmod(sockets, 0o777)
    public = sockets / "agent.sock"

    async def echoes(relay: WorkloadRelay, peers: list[str]) -> None:
        reader, writer = await asyncio.open_unix_connection(str(relay.public_path))
        writer.write(b"ping")
        writer.write_eof()
        assert await reader.read(-1) == b"ping"
        writer.close()

    refused = WorkloadRelay(public, root / "api.sock", CallerRegistry(), [])
    with pytest.raises(ConfigError, match=rf"socket_path: directory {sockets} has mode 0777"):
        asyncio.run(refused.start())
    assert not public.exists()
    shared = RelaySettings(socket_dir_shared=True)
    with caplog.at_level(logging.WARNING):
        asyncio.run(_with_relay(root, _echo, echoes, public, shared))
    warned = [r for r in caplog.records if r.getMessage().startswith("socket_dir_shared")]
    assert warned
    assert (warned[0].directory, warned[0].mode) == (str(sockets), "0777")


def test_bytes_cross_intact_both_ways_on_concurrent_connections(root: Path) -> None:
    """Several connections share the relay's read buffer; none may see another's bytes, and
    payloads larger than the buffer and the socket buffers exercise partial writes."""
    size = 3 * READ_BUFFER + 12345

    async def one(relay: WorkloadRelay, seed: int) -> bytes:
        payload = os.urandom(size // 7) * 7 + bytes([seed])
        reader, writer = await asyncio.open_unix_connection(str(relay.public_path))

        async def send() -> None:
            for i in range(0, len(payload), 50_000):
                writer.write(payload[i : i + 50_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = await reader.read(-1)  # until the echo server's EOF
        await sender
        writer.close()
        assert got == payload
        return got

    async def body(relay: WorkloadRelay, peers: list[str]) -> None:
        results = await asyncio.gather(*(one(relay, seed) for seed in range(4)))
        assert len({r[-1] for r in results}) == 4

    asyncio.run(_with_relay(root, _echo, body))


def test_a_slow_reader_pauses_the_writer_instead_of_buffering_everything(root: Path) -> None:
    chunk = b"x" * 65536
    total = 16 * 1024 * 1024

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
        writer.close()

    async def body(relay: WorkloadRelay, peers: list[str]) -> None:
        reader, writer = await asyncio.open_unix_connection(str(relay.public_path))
        first = await reader.readexactly(len(chunk))
        # The workload stops reading; the server keeps writing until the relay stops reading it.
        link = next(iter(relay.links))
        inner, outer = link.inner.transport, link.outer.transport
        assert inner is not None
        assert outer is not None
        await _until(lambda: not inner.is_reading())
        # What the relay holds is bounded by the transport's high-water mark, not the flood.
        assert outer.get_write_buffer_size() < 1024 * 1024
        rest = await reader.read(-1)
        assert len(first) + len(rest) == total
        writer.close()

    asyncio.run(_with_relay(root, flood, body))


def test_each_connection_is_registered_under_its_bound_name_until_it_closes(
    root: Path,
) -> None:
    async def body(relay: WorkloadRelay, peers: list[str]) -> None:
        reader, writer = await asyncio.open_unix_connection(str(relay.public_path))
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert len(peers) == 1
        bound = peers[0]  # asyncio gives an abstract name as bytes with its leading NUL
        assert isinstance(bound, bytes)
        assert bound.startswith(b"\0svid-agent/")
        peer = "unix-abstract:" + bound[1:].decode()
        caller = relay.registry.lookup(peer)
        assert caller is not None
        assert caller.pid == os.getpid()
        assert caller.uid == os.getuid()
        writer.close()
        await _until(lambda: not relay.links)
        assert relay.registry.lookup(peer) is None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(bound)  # the name is free again once the connection is gone

    asyncio.run(_with_relay(root, _echo, body))


def test_a_workload_that_hangs_up_at_once_leaves_nothing_behind(root: Path) -> None:
    async def body(relay: WorkloadRelay, peers: list[str]) -> None:
        for _ in range(20):
            _, writer = await asyncio.open_unix_connection(str(relay.public_path))
            writer.close()
        await _until(lambda: not relay.links and len(relay.registry) == 0)
        assert relay.admission.total == 0

    asyncio.run(_with_relay(root, _echo, body))


class _HeldAttestor:
    """An attestor that holds each identification until the test lets it go."""

    reads_process = True

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def attest(self, pid: int, uid: int, gid: int) -> list[Selector]:
        self.started.set()
        self.release.wait(30)
        self.finished.set()
        return []


async def _close_while_identifying(
    root: Path, attestor: _HeldAttestor, settings: RelaySettings
) -> tuple[float, bool]:
    """Seconds the relay's close took, called while a caller's identification runs, and
    whether that identification had finished when the close returned."""
    internal = root / "api.sock"
    server = await asyncio.start_unix_server(_echo, str(internal))
    relay = WorkloadRelay(
        root / "public.sock", internal, CallerRegistry(), [attestor], settings=settings
    )
    await relay.start()
    try:
        _reader, writer = await asyncio.open_unix_connection(str(root / "public.sock"))
        await asyncio.to_thread(attestor.started.wait, 10)
        assert attestor.started.is_set()
        started = time.monotonic()
        await relay.close()
        took, finished = time.monotonic() - started, attestor.finished.is_set()
        writer.close()
        return took, finished
    finally:
        attestor.release.set()
        server.close()
        await server.wait_closed()


def test_close_waits_for_an_identification_already_running(root: Path) -> None:
    attestor = _HeldAttestor()
    threading.Timer(0.3, attestor.release.set).start()
    took, finished = asyncio.run(_close_while_identifying(root, attestor, RelaySettings()))
    # Nothing of the relay runs once it is closed: the identification ended before close did.
    assert finished
    assert 0.2 <= took < 5


def test_close_does_not_wait_longer_than_a_caller_would_for_a_hung_identification(
    root: Path,
) -> None:
    attestor = _HeldAttestor()
    took, finished = asyncio.run(
        _close_while_identifying(root, attestor, RelaySettings(identify_timeout=0.5))
    )
    assert not finished  # still held: the close gave up on it after identify_timeout
    assert 0.4 <= took < 5


def test_a_stale_socket_is_replaced_and_a_socket_put_in_place_of_ours_is_left_at_close(
    root: Path,
) -> None:
    """A socket no one listens on (left by a killed agent) is taken over at start; one that took
    the relay's path while it ran (its own removed, another agent started there) is that agent's,
    and the relay's close leaves it: it removed whatever socket was at its path."""
    public = root / "public.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(public))
    stale.close()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def replaced(relay: WorkloadRelay, peers: list[str]) -> None:
        public.unlink()
        other.bind(str(public))
        other.listen(1)

    try:
        asyncio.run(_with_relay(root, _echo, replaced, public))
        assert public.exists()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(public))  # still the other's
        probe.close()
    finally:
        other.close()


@pytest.mark.parametrize(("kind", "said"), [("file", "not a socket"), ("dir", "a directory")])
def test_a_socket_path_taken_by_a_file_or_directory_is_refused_naming_it(
    root: Path, kind: str, said: str
) -> None:
    """bind() refused it "Address already in use" (a traceback), as if an agent listened there."""
    public = root / "public.sock"
    if kind == "file":
        public.write_text("")
    else:
        public.mkdir()
    relay = WorkloadRelay(public, root / "api.sock", CallerRegistry(), [])
    with pytest.raises(ConfigError, match=f"^socket_path: {public} exists and is {said}$"):
        asyncio.run(relay.start())
    assert public.exists()


@pytest.mark.parametrize(("limit", "warned"), [(64, True), (100_000, False)])
def test_a_descriptor_limit_too_small_for_one_uids_connections_is_warned_of_at_start(
    root: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    limit: int,
    warned: bool,
) -> None:
    """Under a hard limit of 64 the agent took a capacity of one connection, saying so only as
    it refused the second caller."""
    monkeypatch.setattr(relay_module, "raise_descriptor_limit", lambda: limit)

    async def nothing(relay: WorkloadRelay, peers: list[str]) -> None:
        assert relay.admission.capacity == capacity_for(limit)

    with caplog.at_level(logging.WARNING):
        asyncio.run(_with_relay(root, _echo, nothing))
    lines = [r for r in caplog.records if r.getMessage().startswith("the descriptor limit")]
    assert bool(lines) is warned
    if warned:
        said = lines[0]
        assert (said.max_connections, said.descriptor_limit) == (capacity_for(limit), limit)
        assert said.max_connections_per_uid == 128


def test_a_running_agent_whose_backlog_is_full_is_refused_not_taken_over(root: Path) -> None:
    """A connect to a listener whose backlog is full fails at once with EAGAIN (a Unix socket
    does not wait as TCP does): read as "no one listens", the running agent's socket was
    removed and taken over when its loop was stalled under a burst of callers."""
    public = root / "public.sock"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(public))
    busy.listen(0)  # never accepts: its backlog fills
    callers = fill_backlog(public)
    try:
        before = os.stat(public).st_ino
        relay = WorkloadRelay(public, root / "api.sock", CallerRegistry(), [])
        said = f"^socket_path: another agent is listening on {public}:"
        with pytest.raises(ConfigError, match=said):
            asyncio.run(relay.start())
        assert os.stat(public).st_ino == before  # still the running agent's
    finally:
        for caller in callers:
            caller.close()
        busy.close()


async def _echo_ignoring_hang_up(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Echoes, and keeps its side open after the workload's: as a server still busy (or
    paused) does before it reads the hang-up."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    await asyncio.Event().wait()


async def _echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether a connection through the relay still answers: the echo server sends back."""
    writer.write(b"ping")
    try:
        return await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    except (asyncio.IncompleteReadError, ConnectionError):
        return False


def test_a_uid_at_its_maximum_gets_in_again_in_place_of_connections_it_closed(
    root: Path,
) -> None:
    uid = os.getuid()

    async def body(relay: WorkloadRelay, peers: list[str]) -> None:
        path = str(relay.public_path)
        held = [await asyncio.open_unix_connection(path) for _ in range(3)]
        for reader, writer in held:
            assert await _echoes(reader, writer)
        for _, writer in held[:2]:
            writer.close()  # the internal side never closes these
        # Both admitted at once, the closed ones no longer counted; the open one stays.
        fresh = [await asyncio.open_unix_connection(path) for _ in range(2)]
        for reader, writer in fresh:
            assert await _echoes(reader, writer)
        assert relay.admission.held_by(uid) == 3
        assert await _echoes(*held[2])
        # Open ones are never pushed out: the uid's flood is still refused at its maximum.
        assert not await _echoes(*await asyncio.open_unix_connection(path))
        assert relay.admission.held_by(uid) == 3
        for reader, writer in (held[2], *fresh):
            assert await _echoes(reader, writer)
            writer.close()

    settings = RelaySettings(max_connections_per_uid=3)
    asyncio.run(_with_relay(root, _echo_ignoring_hang_up, body, settings=settings))


@pytest.mark.parametrize("flavor", ["workload", "task"])
def test_a_connection_refused_at_the_uids_maximum_is_said_so_to_the_client(
    root: Path, flavor: str
) -> None:
    async def body(relay: WorkloadRelay, peers: list[str]) -> None:
        reader, writer = await asyncio.open_unix_connection(str(relay.public_path))
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        address = f"unix://{relay.public_path}"

        def call() -> None:
            if flavor == "workload":
                with WorkloadApiClient(address, timeout=5) as client:
                    client.fetch_x509_svids()
            else:
                with TaskClient(address, timeout=5) as tasks:
                    tasks.begin(actions=["read"], resources=["docs"])

        with pytest.raises(WorkloadApiUnavailableError) as raised:
            await asyncio.to_thread(call)
        message = str(raised.value)
        assert "refused the connection" in message, message
        assert "maximum of connections for this user" in message
        assert "is the SPIFFE agent running" not in message
        writer.close()

    settings = RelaySettings(max_connections_per_uid=1)
    asyncio.run(_with_relay(root, _echo, body, settings=settings))


def test_a_uid_flooding_at_its_maximum_is_not_reaped_at_every_connection(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on main: each refused connection of a uid at its maximum polled every connection
    the uid held (~70 us for 256, five times the accept and refusal), so one process connecting
    in a loop kept the agent's event loop busy for every other caller."""
    polls = 0
    real_poll = select.poll

    def counted() -> select.poll:
        nonlocal polls
        polls += 1
        return real_poll()

    monkeypatch.setattr(select, "poll", counted)
    clock = FakeClock()

    async def body(relay: WorkloadRelay, peers: list[str]) -> None:
        relay.clock = clock
        path = str(relay.public_path)
        held = [await asyncio.open_unix_connection(path) for _ in range(2)]
        for reader, writer in held:
            assert await _echoes(reader, writer)
        for _ in range(20):
            reader, writer = await asyncio.open_unix_connection(path)
            assert not await _echoes(reader, writer)
            writer.close()
        assert polls <= 1
        # A connection its workload closed still makes room, once the pause is over.
        held[0][1].close()
        clock.advance(1.0)
        assert await _echoes(*await asyncio.open_unix_connection(path))

    settings = RelaySettings(max_connections_per_uid=2)
    asyncio.run(_with_relay(root, _echo_ignoring_hang_up, body, settings=settings))


def test_connections_closed_while_identified_stay_counted_until_identification_ends(
    root: Path,
) -> None:
    """Fails on main: a uid at its maximum had its connections still waiting for identification
    dropped from its count once their workloads closed them, while each one's duplicate
    descriptor stayed held until its identification ran (up to identify_timeout): a loop of
    connect and close held a descriptor more each time, past the uid's maximum and towards
    the agent's limit."""
    attestor = _HeldAttestor()
    clock = FakeClock()
    uid = os.getuid()

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def body(relay: WorkloadRelay, peers: list[str]) -> None:
        relay.clock = clock
        admitted = relay.admission.admit
        decided = 0

        def counted(who: int) -> bool:
            nonlocal decided
            decided += 1
            return admitted(who)

        relay.admission.admit = counted  # type: ignore[method-assign]
        path = str(relay.public_path)
        _, first = await asyncio.open_unix_connection(path)
        try:
            await asyncio.to_thread(attestor.started.wait, 10)
            assert attestor.started.is_set()
            before = descriptors()
            for tries in range(2, 22):
                _, writer = await asyncio.open_unix_connection(path)
                writer.close()
                await _until(lambda tries=tries: decided >= tries)  # type: ignore[misc]
                clock.advance(1.0)
            assert relay.admission.held_by(uid) == 2
            # The one admitted after the first and the refused ones not yet hung up, at most.
            await _until(lambda: descriptors() <= before + 4)
        finally:
            attestor.release.set()
            first.close()

    settings = RelaySettings(max_connections_per_uid=2, identify_per_uid=1)
    try:
        asyncio.run(
            _with_relay(root, _echo_ignoring_hang_up, body, settings=settings, attestors=[attestor])
        )
    finally:
        attestor.release.set()
