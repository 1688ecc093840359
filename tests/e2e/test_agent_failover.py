"""Real agents listing two real servers on one datastore fail over when their server dies:
their workloads never lack a valid SVID, their Sync streams are up on the other server within
10 s of a kill -9, new entries and their own renewals go through the survivor, and they stay
there when the dead server comes back. A server that hangs without closing its connections is
left too, once keepalive pings go unanswered, or sooner, once the agent SVID's renewal sent to
it gets no answer within its deadline: the agent renews at the other server before it lapses.

Both servers run from the start on one data directory (one SQLite file, one CA) and follow each
other through the datastore's change feed: any server serves any agent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from agent_attestor.agent_svid_keeper import SERVER_BACKDATE
from agent_attestor.rotation import jitter_for
from agent_attestor.sync import Arrival, renewal_wait
from svid._der import parse_der_certs
from svid._proto import admin_pb2, workload_pb2
from tests.e2e.agent_process import HEADER, AgentProcess, agent_stack, create_entry, new_token
from tests.e2e.conftest import ServerProcess, make_restartable_server, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e
FIRST = "spiffe://example.org/first"
LATER = "spiffe://example.org/later"
AGENT_TTL = 30  # the agent SVID renews about every 15 s: one renewal falls after the kill
# The kill -9 test's: renewed 2 to 8 s after it is signed (0.4 to 0.6 of its life, its 10 s of
# back-dating included), so the renewal it waits for comes soon.
KILLED_AGENT_TTL = 20
# The hung-at-renewal test's: the server's least. Renewed within 7 s of its arrival; a renewal
# sent to a hung server waited out keepalive (15 s to the ping, 5 s for its answer) and the SVID
# lapsed first. It now waits a third of the life left, then the agent renews at the other server.
HUNG_AGENT_TTL = 11
# The hung-server test's: no renewal falls within it, so only the silence of the server's
# heartbeats can move the agent before keepalive does (20 s).
LONG_AGENT_TTL = 600
SILENT_GOAL = 15.0
FAILOVER_GOAL = 10.0  # seconds from kill -9 to the Sync stream up on the other server
QUIET = {"audit_checkpoint_interval": 3600.0}  # neither server writes checkpoint files


def addresses(server: ServerProcess) -> tuple[str, str]:
    """A restartable server's fixed (node, attest) addresses, from its config."""
    config = tomllib.loads(server.config_path.read_text())
    return config["bind_address"], config["attest_bind_address"]


def agent_metrics(agent: AgentProcess) -> tuple[int, str, int]:
    """(Sync stream up, current server, moves) from the agent's /metrics."""
    runtime = agent.runtime()
    with urllib.request.urlopen(f"http://{runtime['metrics_address']}/metrics", timeout=5) as r:
        text = r.read().decode()
    up, server, moves = 0, "", 0
    for line in text.splitlines():
        if line.startswith("svid_agent_server_connected "):
            up = int(float(line.split()[1]))
        elif line.startswith("svid_agent_server_info{"):
            server = line.split('address="', 1)[1].split('"', 1)[0]
        elif line.startswith("svid_agent_server_moves_total "):
            moves = int(float(line.split()[1]))
    return up, server, moves


def synced_on(agent: AgentProcess) -> str:
    """The server the agent's Sync stream is up on ("" while it is down)."""
    up, server, _ = agent_metrics(agent)
    return server if up else ""


def leaf_not_after(svid: workload_pb2.X509SVID) -> float:
    return parse_der_certs(bytes(svid.x509_svid))[0].not_valid_after_utc.timestamp()


def agent_cert(agent: AgentProcess) -> x509.Certificate:
    return x509.load_der_x509_certificate((agent.data_dir / "agent_svid.der").read_bytes())


def agent_serial(agent: AgentProcess) -> int:
    return agent_cert(agent).serial_number


@dataclass(frozen=True)
class _Serial:
    serial_hex: str


def renewal_due_in(cert: x509.Certificate) -> tuple[float, float]:
    """(seconds since the agent SVID `cert` arrived, seconds until the agent renews it), as
    the agent counts them (sync.renewal_wait); its arrival is taken as its NotBefore plus the
    server's back-dating, on this host's clock, which the agent and the servers share."""
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    arrived = not_before + SERVER_BACKDATE
    now = time.time()
    jitter = jitter_for(_Serial(format(cert.serial_number, "x")))
    due = renewal_wait(not_before, not_after, Arrival(arrived, arrived), now, now, jitter=jitter)
    return now - arrived, due


@dataclass
class Workload:
    """A workload holding an X.509-SVID stream, and another polling for one, all test long."""

    agent: AgentProcess
    stop: threading.Event = field(default_factory=threading.Event)
    stream_ids: list[set[str]] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    polls: int = 0

    def start(self) -> Workload:
        threading.Thread(target=self._stream, daemon=True).start()
        threading.Thread(target=self._poll, daemon=True).start()
        return self

    def _stream(self) -> None:
        try:
            for msg in self.agent.stub().FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=HEADER
            ):
                self.stream_ids.append({s.spiffe_id for s in msg.svids})
                if self.stop.is_set():
                    return
        except grpc.RpcError as exc:
            if not self.stop.is_set():
                self.gaps.append(f"the stream broke: {exc.code()}")  # type: ignore[attr-defined]

    def _poll(self) -> None:
        stub = self.agent.stub()
        while not self.stop.wait(0.1):
            try:
                msg = next(
                    stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5)
                )
            except grpc.RpcError as exc:
                self.gaps.append(f"no SVID: {exc.code()}")  # type: ignore[attr-defined]
                continue
            self.polls += 1
            valid = [
                s for s in msg.svids if s.spiffe_id == FIRST and leaf_not_after(s) > time.time()
            ]
            if not valid:
                self.gaps.append(f"no valid SVID for {FIRST} in {[s.spiffe_id for s in msg.svids]}")


@dataclass
class Pair:
    servers: dict[str, ServerProcess]  # by node address
    root: Path

    def by_address(self, address: str) -> ServerProcess:
        return self.servers[address]

    def other(self, address: str) -> ServerProcess:
        (other,) = (s for a, s in self.servers.items() if a != address)
        return other

    @property
    def addresses(self) -> tuple[tuple[str, str], ...]:
        return tuple(addresses(s) for s in self.servers.values())

    @contextmanager
    def synced_agent(self) -> Iterator[tuple[AgentProcess, str]]:
        """An agent listing both servers (its metrics served), and the node address of the one
        its Sync stream came up on."""
        any_server = next(iter(self.servers.values()))
        root = self.root / "agent"
        with agent_stack(root, any_server, start=False, servers=self.addresses) as agent:
            root.mkdir(exist_ok=True)
            agent.start("--metrics-address", "127.0.0.1:0")
            yield agent, wait_for(lambda: synced_on(agent), 30, "the agent's Sync stream")


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Two servers on one data directory; their agent SVID TTL is the test's indirect
    parameter, AGENT_TTL if it gives none."""
    agent_ttl = getattr(request, "param", AGENT_TTL)
    root = short_tmpdir()
    shared = root / "data"
    servers: dict[str, ServerProcess] = {}
    try:
        for name in ("a", "b"):
            (root / name).mkdir()
            server = make_restartable_server(
                root / name, data_dir=str(shared), agent_svid_ttl=agent_ttl, **QUIET
            )
            server.data_dir = shared  # where it writes its runtime file
            servers[addresses(server)[0]] = server.start()
        yield Pair(servers, root)
    finally:
        for server in servers.values():
            if server.proc is not None:
                server.stop()
            print(f"---- server {server.root.name} log ----\n" + server.logs()[-3000:])
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("pair", [KILLED_AGENT_TTL], indirect=True)
def test_an_agent_fails_over_when_its_server_is_killed_and_stays_on_the_survivor(
    pair: Pair,
) -> None:
    with pair.synced_agent() as (agent, home):
        agent_id = agent.agent_id()
        doomed, survivor = pair.by_address(home), pair.other(home)
        create_entry(doomed, FIRST, agent_id)
        agent.wait_svid(FIRST)
        workload = Workload(agent).start()
        wait_for(lambda: workload.polls > 0, 10, "the workload's first poll")

        killed = time.monotonic()
        serial = agent_serial(agent)
        doomed.kill9()
        survivor_address = addresses(survivor)[0]
        wait_for(
            lambda: synced_on(agent) == survivor_address,
            30,
            "the agent's Sync stream on the surviving server",
            interval=0.02,
        )
        took = time.monotonic() - killed
        print(f"failover: Sync stream up on the other server {took:.2f} s after kill -9")
        assert took < FAILOVER_GOAL
        assert "moving to another server" in agent.logs()

        # Written through the survivor, pushed down the stream the workload held throughout.
        create_entry(survivor, LATER, agent_id)
        wait_for(lambda: any(LATER in ids for ids in workload.stream_ids), 10, "the new entry")

        # The agent SVID is renewed by the survivor, over mTLS with the SVID it had.
        wait_for(lambda: agent_serial(agent) != serial, KILLED_AGENT_TTL, "the agent SVID renewed")
        wait_for(lambda: synced_on(agent) == survivor_address, 10, "Sync on the new SVID")
        shown = survivor.admin("GetAgent", admin_pb2.GetAgentRequest(spiffe_id=agent_id))
        assert int(shown.serial, 16) == agent_serial(agent)

        # The killed server comes back: the agent stays where it is.
        moves = agent_metrics(agent)[2]
        doomed.start()
        time.sleep(3)
        assert agent_metrics(agent) == (1, survivor_address, moves)

        workload.stop.set()
        assert workload.polls > 20
        assert workload.gaps == []


def test_every_agent_of_a_killed_server_is_back_on_another_within_10_s(pair: Pair) -> None:
    """Agents (SVIDD_FAILOVER_AGENTS, default 6) spread over both servers; the ones of the server
    killed lose it at the same instant, and their jittered reconnects all land within the goal."""
    count = int(os.environ.get("SVIDD_FAILOVER_AGENTS", "6"))
    any_server = next(iter(pair.servers.values()))
    agents: list[AgentProcess] = []
    try:
        for n in range(count):
            root = pair.root / f"agent{n}"
            root.mkdir()
            agent = AgentProcess(root, any_server, new_token(any_server), servers=pair.addresses)
            agents.append(agent.start("--metrics-address", "127.0.0.1:0"))
        homes = [wait_for(lambda a=a: synced_on(a), 60, "the agents' Sync streams") for a in agents]
        print(f"initial spread: {sorted(homes.count(a) for a in pair.servers)} agents per server")
        doomed = max(pair.servers, key=homes.count)  # the server holding more of them
        moving = [a for a, home in zip(agents, homes, strict=True) if home == doomed]
        survivor_address = addresses(pair.other(doomed))[0]

        killed = time.monotonic()
        pair.by_address(doomed).kill9()
        back: dict[int, float] = {}

        def all_back() -> bool:
            for n, agent in enumerate(moving):
                if n not in back and synced_on(agent) == survivor_address:
                    back[n] = time.monotonic() - killed
            return len(back) == len(moving)

        wait_for(all_back, 60, "every agent on the surviving server", interval=0.02)
        times = sorted(back.values())
        print(f"failover of {len(moving)} agents: first {times[0]:.2f} s, last {times[-1]:.2f} s")
        assert times[-1] < FAILOVER_GOAL
    finally:
        for agent in agents:  # every one, even when another would not stop in time
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.stop()


@pytest.mark.parametrize("pair", [LONG_AGENT_TTL], indirect=True)
def test_an_agent_leaves_a_server_that_hangs_without_closing_its_connection(pair: Pair) -> None:
    """A stopped (SIGSTOP) server keeps its connections open and answers nothing: its Sync
    stream's heartbeats stop, the agent ends the stream and moves on. It waited for keepalive
    (15 s to the ping, 5 s for its answer) before."""
    with pair.synced_agent() as (agent, home):
        hung = pair.by_address(home).proc
        assert hung is not None
        survivor_address = addresses(pair.other(home))[0]
        stopped = time.monotonic()
        os.kill(hung.pid, signal.SIGSTOP)
        try:
            wait_for(
                lambda: synced_on(agent) == survivor_address,
                60,
                "the agent's Sync stream on the other server",
                interval=0.1,
            )
        finally:
            os.kill(hung.pid, signal.SIGCONT)
        took = time.monotonic() - stopped
        print(f"failover from a hung server: {took:.2f} s after SIGSTOP")
        # Heartbeats every 3 s (the server's default), silent past two, then the jittered
        # reconnect: well before keepalive would have ended the stream.
        assert took < SILENT_GOAL


@pytest.mark.parametrize("pair", [HUNG_AGENT_TTL], indirect=True)
def test_an_agent_whose_server_hangs_before_its_renewal_renews_at_the_other_server(
    pair: Pair,
) -> None:
    """The agent's server is stopped (SIGSTOP) with the agent's Sync stream up on it, before
    the agent SVID's renewal is due: the renewal waited out the keepalive, the 11 s SVID lapsed
    meanwhile, and the agent, its join token spent, could not attest again. It now gives up on
    the renewal within a third of the life left, moves, and renews at the other server: the
    same agent ID, its SVID renewed there, its workloads served all along."""
    with pair.synced_agent() as (agent, home):
        agent_id = agent.agent_id()
        hung, survivor = pair.by_address(home), pair.other(home)
        create_entry(hung, FIRST, agent_id)
        agent.wait_svid(FIRST)
        workload = Workload(agent).start()

        def renewal_next() -> x509.Certificate | None:
            # Its stream up on the SVID in use (a renewal moves it to a new connection at
            # once), whose renewal comes next. As late as that: stopped earlier, keepalive
            # (a ping every 15 s, 5 s for its answer) had more chances to end the connection
            # before the SVID lapsed, and the agent moved before its renewal had to.
            cert = agent_cert(agent)
            since, due = renewal_due_in(cert)
            if since > 0.5 and 0.3 < due <= 1.5 and synced_on(agent) == home:
                return cert
            return None

        cert = wait_for(renewal_next, 3 * HUNG_AGENT_TTL, "the renewal about to be due")
        assert hung.proc is not None
        os.kill(hung.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        survivor_address = addresses(survivor)[0]
        try:
            wait_for(
                lambda: (
                    synced_on(agent) == survivor_address
                    and agent_serial(agent) != cert.serial_number
                ),
                2 * HUNG_AGENT_TTL,
                "the agent on the other server with its SVID renewed",
                interval=0.05,
            )
        finally:
            os.kill(hung.proc.pid, signal.SIGCONT)
        print(f"renewed at the other server {time.monotonic() - stopped:.2f} s after SIGSTOP")
        logs = agent.logs()
        assert logs.count("agent attested") == 1  # renewed, never attested anew
        shown = survivor.admin("GetAgent", admin_pb2.GetAgentRequest(spiffe_id=agent_id))
        assert int(shown.serial, 16) == agent_serial(agent)

        workload.stop.set()
        assert workload.polls > 0
        assert workload.gaps == []
