"""The HTTPS listener's own limits, on a real HttpListener over real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from server.oauth import http
from server.oauth.admission import (
    REFUSAL_LOG_INTERVAL,
    Admission,
    ConnectionCaps,
    ConnectionMetrics,
)
from server.oauth.http import (
    ACCEPT_FAILURE_LOG_INTERVAL,
    HttpListener,
    Request,
    Response,
    json_response,
)
from svid._clock import FakeClock
from tests.server.fixtures import short_tmpdir, write_tls_files

WAIT = 15.0  # generous: the machine may be loaded; a lockout still fails after it


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    directory = short_tmpdir("oht")
    try:
        ca_file, cert, key = write_tls_files(directory)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        yield Tls(server, ssl.create_default_context(cafile=str(ca_file)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _listener(
    context: ssl.SSLContext | None, caps: ConnectionCaps, refused: list[str]
) -> HttpListener:
    listener = HttpListener(
        context, caps=caps, name="test", metrics=ConnectionMetrics(refused=refused.append)
    )
    listener.mount("/", _hello)
    return listener


async def _hello(request: Request) -> Response:
    return json_response(200, b'{"hello":"' + request.client_host.encode() + b'"}')


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server ends the connection (EOF or reset) within WAIT, the client silent."""
    try:
        async with asyncio.timeout(WAIT):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def _get(port: int, tls: Tls | None, source: str = "127.0.0.1") -> bytes:
    """One GET / from `source`; the first line of the answer."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=tls.client if tls else None,
            server_hostname="127.0.0.1" if tls else None,
            local_addr=(source, 0),
        )
        try:
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return await reader.readline()
        finally:
            writer.close()


def test_a_client_that_never_starts_its_tls_handshake_is_cut_at_the_handshake_timeout(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "HANDSHAKE_TIMEOUT", 0.5)

    async def main() -> None:
        listener = _listener(tls.server, ConnectionCaps(8, 8), [])
        port = await listener.start("127.0.0.1", 0)
        try:
            # A TCP connection and no ClientHello: asyncio's own default waits 60 s for it.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                assert await _closed_by_server(reader)
            finally:
                writer.close()
            assert (await _get(port, tls)).startswith(b"HTTP/1.1 200 ")
        finally:
            await listener.stop()

    asyncio.run(main())


async def _hold(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An idle TCP connection from `source` (no TLS handshake, no request)."""
    async with asyncio.timeout(WAIT):
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _served_again(port: int, tls: Tls, source: str) -> bool:
    """Whether a GET from `source` is answered within WAIT: a connection closed on the client's
    side is released once the server has seen it go, so a refusal until then is retried."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                if (await _get(port, tls, source)).startswith(b"HTTP/1.1 200 "):
                    return True
            except (ConnectionError, ssl.SSLError):
                pass
            await asyncio.sleep(0.05)


def test_a_connection_past_its_clients_cap_is_closed_before_tls_and_others_are_served(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The held connections must outlast the test, not be cut at the handshake timeout.
    monkeypatch.setattr(http, "HANDSHAKE_TIMEOUT", 120.0)

    async def main() -> None:
        refused: list[str] = []
        listener = _listener(tls.server, ConnectionCaps(total=8, per_host=2), refused)
        port = await listener.start("127.0.0.1", 0)
        held = [await _hold(port, "127.0.0.1") for _ in range(2)]
        try:
            reader, writer = await _hold(port, "127.0.0.1")
            try:
                # Closed unanswered while the client has not sent a ClientHello: no TLS spent.
                assert await _closed_by_server(reader)
            finally:
                writer.close()
            assert refused == ["per_host"]
            assert (await _get(port, tls, "127.0.0.2")).startswith(b"HTTP/1.1 200 ")
            # The client's cap is of connections open: one ended, it may open another.
            held.pop()[1].close()
            assert await _served_again(port, tls, "127.0.0.1")
        finally:
            for _, w in held:
                w.close()
            await listener.stop()

    asyncio.run(main())


def test_a_connection_past_the_listeners_cap_is_closed_whoever_it_is_from() -> None:
    async def main() -> None:
        refused: list[str] = []
        listener = _listener(None, ConnectionCaps(total=3, per_host=2), refused)
        port = await listener.start("127.0.0.1", 0)
        held = [await _hold(port, source) for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2")]
        try:
            reader, writer = await _hold(port, "127.0.0.3")
            try:
                assert await _closed_by_server(reader)
            finally:
                writer.close()
            assert refused == ["total"]
        finally:
            for _, w in held:
                w.close()
            await listener.stop()
        assert listener.admission.total == 0  # every admitted connection released

    asyncio.run(main())


def test_an_ipv6_client_is_capped_by_its_64_not_by_each_address() -> None:
    admission = Admission(ConnectionCaps(total=10, per_host=2), "test", FakeClock())
    assert admission.admit("2001:db8::1") == admission.admit("2001:db8::2") == "2001:db8::/64"
    assert admission.admit("2001:db8::ffff:1") is None  # the same /64: a third
    assert admission.admit("2001:db8:0:1::1") == "2001:db8:0:1::/64"  # another /64
    admission.release("2001:db8::/64")
    assert admission.admit("2001:db8::3") == "2001:db8::/64"


def test_a_flood_of_refusals_logs_one_line_per_interval_and_counts_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    refused: list[str] = []
    admission = Admission(
        ConnectionCaps(total=1, per_host=1),
        "test",
        clock,
        ConnectionMetrics(refused=refused.append),
    )
    assert admission.admit("10.0.0.1") is not None
    with caplog.at_level(logging.WARNING, logger="svid.server.oauth"):
        for _ in range(50):
            assert admission.admit("10.0.0.2") is None
        clock.advance(REFUSAL_LOG_INTERVAL)
        assert admission.admit("10.0.0.2") is None
    assert refused == ["total"] * 51
    lines = [r for r in caplog.records if "refused new HTTP connections" in r.getMessage()]
    # The first refusal at once, then one line for the 50 after it.
    assert [getattr(r, "refused", None) for r in lines] == [1, 50]
    assert {getattr(r, "client", None) for r in lines} == {"10.0.0.2"}


def _open_descriptors() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_stop_closes_connections_whose_task_had_not_started(tls: Tls) -> None:
    async def main() -> None:
        listener = _listener(tls.server, ConnectionCaps(total=16, per_host=16), [])
        before = _open_descriptors()
        port = await listener.start("127.0.0.1", 0)
        # Blocking connects: each is done (in the backlog) before the loop runs again.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(4)]
        try:
            async with asyncio.timeout(WAIT):
                # This step is queued before the accept callback's, so once the count shows
                # the accept, the connections' tasks are queued and have not run: stop() now
                # cancels them before their first step.
                while listener.admission.total == 0:
                    await asyncio.sleep(0)
            await listener.stop()
            assert listener.admission.total == 0  # every admitted connection released
            # Every socket the listener opened (listening and accepted) is closed.
            assert _open_descriptors() - before == {client.fileno() for client in clients}
            for client in clients:
                client.settimeout(WAIT)
                assert client.recv(1) == b""  # closed by the server, not left to a finaliser
        finally:
            for client in clients:
                client.close()

    asyncio.run(main())


async def _until(condition: Callable[[], bool]) -> bool:
    """Whether `condition` holds within WAIT (checked as the loop runs)."""
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        return False
    return True


def test_the_open_connections_gauge_goes_back_down_however_a_connection_ends(tls: Tls) -> None:
    async def main() -> None:
        open_now: list[int] = [0]
        refused: list[str] = []
        listener = HttpListener(
            tls.server,
            caps=ConnectionCaps(total=8, per_host=3),
            name="test",
            metrics=ConnectionMetrics(refused=refused.append, open=open_now.append),
        )
        listener.mount("/", _hello)
        port = await listener.start("127.0.0.1", 0)
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            # Served, then closed.
            assert (await _get(port, tls)).startswith(b"HTTP/1.1 200 ")
            assert await _until(lambda: open_now[-1] == 0)
            # A failed TLS handshake: the client speaks plain HTTP to the TLS port.
            reader, writer = await _hold(port, "127.0.0.1")
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert await _closed_by_server(reader)
            writer.close()
            assert await _until(lambda: open_now[-1] == 0)
            # Held open (no handshake yet), then a refusal, which never counts as open.
            held += [await _hold(port, "127.0.0.1") for _ in range(3)]
            assert await _until(lambda: open_now[-1] == 3)
            reader, writer = await _hold(port, "127.0.0.1")
            assert await _closed_by_server(reader)
            writer.close()
            assert refused == ["per_host"]
            assert open_now[-1] == 3
            assert max(open_now) == 3
        finally:
            await listener.stop()
        # Stopped with connections still open: each is counted out.
        assert open_now[-1] == 0
        for _, w in held:
            w.close()

    asyncio.run(main())


def _lowest_free_descriptor() -> int:
    probe = os.dup(0)
    os.close(probe)
    return probe


ALONE = "SVIDD_TEST_IN_A_PROCESS_OF_ITS_OWN"


def test_accept_failures_out_of_descriptors_log_one_line_per_interval_and_count_each(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if os.environ.get(ALONE) != "1":
        # It takes every new descriptor away from its whole process: a pytest worker's other
        # threads would fail meanwhile, and a leaked socket collected then would free one. So
        # it runs in a pytest process of its own, and this test passes only if it passed there.
        done = subprocess.run(
            [sys.executable, "-m", "pytest", f"{__file__}::{request.node.name}", "-q",
             "-p", "no:xdist", "-p", "no:cacheprovider", "-o", "addopts="],
            env={**os.environ, ALONE: "1"}, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1].startswith("1 passed"), done.stdout
        return
    monkeypatch.setattr(http, "ACCEPT_RETRY_DELAY", 0.01)  # many failures, quickly
    clock = FakeClock()
    failures: list[None] = []
    metrics = ConnectionMetrics(accept_failed=lambda: failures.append(None))

    async def main() -> None:
        listener = HttpListener(
            None, caps=ConnectionCaps(8, 8), name="test", clock=clock, metrics=metrics
        )
        listener.mount("/", _hello)
        port = await listener.start("127.0.0.1", 0)
        client = socket.socket()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            # No descriptor left for this process (its open ones stay usable): each accept
            # fails with EMFILE, retried after ACCEPT_RETRY_DELAY, for as long as it lasts.
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_descriptor(), hard))
            try:
                client.settimeout(WAIT)
                client.connect(("127.0.0.1", port))  # into the backlog: no descriptor of ours
                assert await _until(lambda: len(failures) >= 5)
                clock.advance(ACCEPT_FAILURE_LOG_INTERVAL)
                seen = len(failures)
                assert await _until(lambda: len(failures) > seen)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            # With descriptors back, the waiting connection is accepted and served.
            client.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=client)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            async with asyncio.timeout(WAIT):
                assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
            writer.close()
        finally:
            client.close()
            await listener.stop()
        lines = [
            r for r in caplog.records if r.getMessage() == "accepting an HTTP connection failed"
        ]
        # The first at once, then one for those after it once the interval passed.
        assert [getattr(r, "failures", None) for r in lines] == [1, seen]
        assert {getattr(r, "listener", None) for r in lines} == {"test"}
        assert "Too many open files" in str(getattr(lines[0], "error", ""))

    with caplog.at_level(logging.WARNING, logger="svid.server.oauth"):
        asyncio.run(main())
