"""The OAuth token endpoint (server/oauth) and task end -> exchanged token refused.

Rows:
- RFC 8693 token exchanges per second through the real HTTPS endpoint of an in-process server
  (TLS, h11, JWT-SVID check, jti replay insert, Cedar decision, at+jwt signing, ledger commit),
  CLIENTS keep-alive clients at once in load processes of their own (lean HTTP/1.1 clients
  over TLS, connected once: the load shares the machine's cores with the server), as a ratio
  to raw ES256 signing on one core in the same rounds (goal >= 0.2x), and (shown) to one raw
  ES256 verify + sign, the signature work an exchange cannot skip; the rate itself, and the
  server's CPU per exchange (this process's CPU time over a window: the server runs here);
- one exchange's latency from a client that waits for each answer (p50 / p99), and one RFC 8693
  delegation's (the resource's workload acting for the task towards another resource: two
  token checks, the task decision, signing, commit);
- task end -> the exchanged access token refused by svid.AccessTokenVerifier on a
  WorkloadApiSource fed revocations by a real svid-agent (goal p99 <= 1 s), and refused (401)
  by the example MCP server, a process that verifies with the same class.
Subject tokens are minted before each window (a task JWT-SVID per exchange: jtis are single-use).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from bench.cores import _es256, _es256_verify_sign
from bench.report import Rounds, Row, Table, at_least, at_most, latency_row, rate, rounds, samples
from svid import AccessTokenVerifier, RevokedError, WorkloadApiSource
from svid.tasks import TaskClient
from tests.e2e.test_oauth_mcp import RUNTIME, Stack, oauth_mcp_stack
from tests.server.oauth.conftest import OTHER_RESOURCE, RESOURCE, serving_oauth
from tests.server.oauth.test_token_delegation import ACCESS_TYPE, MCP_ID, actor_token
from tests.server.oauth.test_token_exchange import EXCHANGE, JWT_TYPE, TaskWorld, begin_task

LOAD_PROCESSES = 2
THREADS = 4
CLIENTS = LOAD_PROCESSES * THREADS
WINDOW = 1.0
ROUNDS = rounds(5)
LATENCY_SAMPLES = samples(200)
REVOKE_SAMPLES = samples(100)
GOAL_RATIO = 0.2
GOAL_REVOKE_P99_MS = 1000.0
POLL = 0.005
VERIFIER_POLL = 0.001  # a verify is a cache hit and a set lookup: poll it closely


@pytest.fixture(scope="module")
def world() -> Iterator[TaskWorld]:
    with serving_oauth(
        "oab",
        [RESOURCE, OTHER_RESOURCE],
        signing_processes=0,
        oauth_resource_workloads=[f"{RESOURCE}={MCP_ID}"],
    ) as server:
        yield begin_task(server, ttl=900, resources=(server.issuer, RESOURCE, OTHER_RESOURCE))


def _subject_tokens(world: TaskWorld, n: int) -> list[str]:
    return [world.subject_token() for _ in range(n)]


def _form(subject: str) -> dict[str, str]:
    return {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": JWT_TYPE,
        "resource": RESOURCE,
    }


class _Connection:
    """One HTTP/1.1 keep-alive connection over TLS that posts forms and reads the answers.

    Deliberately lean (a request is a few bytes formatted into a template, an answer is read
    by its Content-Length): on a small machine the load processes share the cores with the
    server, and a heavy client would measure itself. It still speaks real HTTP over real TLS
    and checks every answer."""

    def __init__(self, url: str, cafile: str) -> None:
        import socket
        import ssl
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 443
        context = ssl.create_default_context(cafile=cafile)
        raw = socket.create_connection((host, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=host)
        self.head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: "
        ).encode()
        self.buffer = b""

    def post(self, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in lines[1:]
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            self.buffer = rest
            self._fill()
            rest = self.buffer
        self.buffer = rest[length:]
        return status, rest[:length]

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data


# Per load process: its clients' connections, opened once and kept alive across windows.
_connections: list[_Connection] = []


def _post_all(url: str, cafile: str, subjects: list[str]) -> int:
    """In a load process: post one exchange per subject token from THREADS keep-alive
    clients; returns how many succeeded (answered 200 with an access token)."""
    from urllib.parse import urlencode

    while len(_connections) < THREADS:
        _connections.append(_Connection(url, cafile))
    chunks = [subjects[i::THREADS] for i in range(THREADS)]

    def run(job: tuple[_Connection, list[str]]) -> int:
        connection, chunk = job
        ok = 0
        for subject in chunk:
            status, body = connection.post(urlencode(_form(subject)).encode())
            ok += status == 200 and b'"access_token"' in body
        return ok

    with ThreadPoolExecutor(THREADS) as pool:
        return sum(pool.map(run, zip(_connections, chunks, strict=True)))


class Exchangers:
    """LOAD_PROCESSES processes of THREADS clients each: the load generator holds its own GIL,
    so the rate is the server's, not the client's."""

    def __init__(self, world: TaskWorld) -> None:
        self.world = world
        self.url = world.oauth.issuer + "/token"
        self.cafile = str(world.oauth.ca_file)
        self.pool = ProcessPoolExecutor(LOAD_PROCESSES, mp_context=mp.get_context("spawn"))
        self.client = httpx.Client(verify=world.oauth.ssl_context())
        self.cpu_us: list[float] = []  # server CPU per exchange, one value per window
        # Start the processes (and their imports) before anything is timed.
        self.window(LOAD_PROCESSES * THREADS)

    def one(self, subject: str) -> None:
        reply = self.client.post(self.url, data=_form(subject))
        assert reply.status_code == 200, reply.text

    def window(self, count: int = 600) -> float:
        tokens = _subject_tokens(self.world, count)  # minted before the clock starts
        parts = [tokens[i::LOAD_PROCESSES] for i in range(LOAD_PROCESSES)]
        started, cpu = time.perf_counter(), time.process_time()
        done = sum(
            self.pool.map(
                _post_all, [self.url] * LOAD_PROCESSES, [self.cafile] * LOAD_PROCESSES, parts
            )
        )
        elapsed = time.perf_counter() - started
        # This process holds the server; the load runs in processes of its own.
        self.cpu_us.append((time.process_time() - cpu) / done * 1e6)
        assert done == count, f"{count - done} exchanges refused"
        return done / elapsed

    def close(self) -> None:
        self.client.close()
        self.pool.shutdown()


def test_token_exchange_rate_against_raw_es256(
    benchmark: Any, table: Table, world: TaskWorld
) -> None:
    sign = _es256()
    verify_and_sign = _es256_verify_sign()
    exchangers = Exchangers(world)
    try:
        measured = Rounds(
            {
                "es256": lambda: rate(sign, WINDOW),
                "crypto": lambda: rate(verify_and_sign, WINDOW),
                "exchange": exchangers.window,
            },
            ROUNDS,
        )
        cpu_us = exchangers.cpu_us[1:]  # the first window only started the load processes
        latencies = []
        for subject in _subject_tokens(world, LATENCY_SAMPLES):
            started = time.perf_counter()
            exchangers.one(subject)
            latencies.append(time.perf_counter() - started)
    finally:
        exchangers.close()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    note = f"{CLIENTS} HTTPS keep-alive clients in {LOAD_PROCESSES} processes, SQLite"
    table.add(
        measured.ratio_row(
            "token exchange / raw ES256 sign",
            "exchange",
            "es256",
            goal=at_least(GOAL_RATIO),
            note=note,
        ),
        measured.ratio_row(
            "token exchange / raw ES256 verify + sign, shown (an exchange's own signature work)",
            "exchange",
            "crypto",
            note=note,
        ),
        measured.rate_row("token exchanges", "exchange", note=note),
        measured.rate_row("raw ES256 sign (one core)", "es256"),
        measured.rate_row("raw ES256 verify + sign (one core)", "crypto"),
        Row(
            "server CPU per token exchange (us)",
            statistics.median(cpu_us),
            "",
            per_round=tuple(cpu_us),
            n=len(cpu_us),
            note="process CPU of the in-process server over each window / exchanges",
        ),
        latency_row("one token exchange (client waits)", latencies, note="HTTPS keep-alive"),
    )


def test_delegation_latency(benchmark: Any, table: Table, world: TaskWorld) -> None:
    form = {
        "grant_type": EXCHANGE,
        "subject_token": world.exchange().json()["access_token"],  # what the MCP server got
        "subject_token_type": ACCESS_TYPE,
        "actor_token": actor_token(world.oauth),  # its own JWT-SVID, as its agent caches it
        "actor_token_type": JWT_TYPE,
        "resource": OTHER_RESOURCE,
    }
    latencies = []
    with httpx.Client(verify=world.oauth.ssl_context()) as client:
        for _ in range(LATENCY_SAMPLES):
            started = time.perf_counter()
            reply = client.post(world.oauth.issuer + "/token", data=form)
            latencies.append(time.perf_counter() - started)
            assert reply.status_code == 200, reply.text
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    table.add(
        latency_row("one RFC 8693 delegation (client waits)", latencies, note="HTTPS keep-alive")
    )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with oauth_mcp_stack() as running:
        yield running


def test_task_end_to_exchanged_token_refused_at_mcp_server(
    benchmark: Any, table: Table, stack: Stack
) -> None:
    by_verifier: list[float] = []
    by_mcp: list[float] = []
    headers = {"Accept": "application/json, text/event-stream"}
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    with (
        WorkloadApiSource(stack.socket) as source,
        TaskClient(stack.socket) as tasks,
        httpx.Client(timeout=10) as http,
    ):
        assert source.wait_ready(10)
        verifier = source.access_token_verifier(stack.issuer, stack.mcp_url)
        for _ in range(REVOKE_SAMPLES):
            task = tasks.begin(
                actions=["read"],
                resources=[stack.issuer],
                tools={stack.mcp_url: ["read_ticket"]},
                ttl=120,
                spiffe_id=RUNTIME,
            )
            reply = http.post(
                stack.issuer + "/token",
                data={**_form(task.jwt(stack.issuer)), "resource": stack.mcp_url},
            )
            assert reply.status_code == 200, reply.text
            token = reply.json()["access_token"]
            verifier.verify(token)
            auth = {**headers, "Authorization": f"Bearer {token}"}
            assert http.post(stack.mcp_url, json=ping, headers=auth).status_code != 401
            started = time.perf_counter()
            task.end()
            while not _revoked(verifier, token):
                assert time.perf_counter() - started < 10, "the ended task's token still verifies"
                time.sleep(VERIFIER_POLL)
            by_verifier.append(time.perf_counter() - started)
            # The MCP server's own source hears of it at about the same time: measured from the
            # same start, so at most one HTTP round trip later than its true moment.
            while http.post(stack.mcp_url, json=ping, headers=auth).status_code != 401:
                assert time.perf_counter() - started < 10, "the ended task's token still works"
                time.sleep(POLL)
            by_mcp.append(time.perf_counter() - started)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    table.add(
        latency_row(
            "task end -> exchanged access token refused by svid.AccessTokenVerifier",
            by_verifier,
            goal=at_most(GOAL_REVOKE_P99_MS, "p99"),
            note="svid-server + svid-agent processes; WorkloadApiSource fed by the agent",
        ),
        latency_row(
            "task end -> exchanged access token refused (401) at an MCP server",
            by_mcp,
            note="the example MCP server (svid.AccessTokenVerifier), its own process",
        ),
    )


def _revoked(verifier: AccessTokenVerifier, token: str) -> bool:
    try:
        verifier.verify(token)
    except RevokedError:
        return True
    return False
