"""A real agent listing two real servers on one datastore fails over when its server is killed:
its workloads never lack a valid SVID, its Sync stream is up on the other server within 10 s,
new entries and its own renewal go through the survivor, and it stays there when the killed
server comes back.

Until the shared PostgreSQL backend lands, the two servers share one data directory (the same
SQLite file and keys). The second starts after the agent attested and the entries exist, so it
loads them; nothing is written through the first after that (it would not reach the second).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from svid._der import parse_der_certs
from svid._proto import workload_pb2
from tests.e2e.agent_process import HEADER, AgentProcess, agent_stack, create_entry, new_token
from tests.e2e.conftest import ServerProcess, make_restartable_server, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e
FIRST = "spiffe://example.org/first"
LATER = "spiffe://example.org/later"
# Long enough that the agent renews only once the test has moved it to the second server (a
# renewal through the first would not reach the second's memory without the change feed);
# short enough to see that renewal. Renewal is due at half the back-dated lifetime.
AGENT_TTL = 60
FAILOVER_GOAL = 10.0  # seconds from kill -9 to the Sync stream up on the other server
QUIET = {"audit_checkpoint_interval": 3600.0}  # neither server writes checkpoint files


def addresses(server: ServerProcess) -> tuple[str, str]:
    """A restartable server's fixed (node, attest) addresses, from its config."""
    config = tomllib.loads(server.config_path.read_text())
    return config["bind_address"], config["attest_bind_address"]


def agent_metrics(agent: AgentProcess) -> tuple[int, str, int]:
    """(Sync stream up, current server, moves) from the agent's /metrics."""
    runtime = json.loads((agent.data_dir / "agent.json").read_text())
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


def leaf_not_after(svid: workload_pb2.X509SVID) -> float:
    return parse_der_certs(bytes(svid.x509_svid))[0].not_valid_after_utc.timestamp()


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
    first: ServerProcess
    second: ServerProcess
    root: Path


@pytest.fixture
def pair() -> Iterator[Pair]:
    root = short_tmpdir()
    (root / "a").mkdir()
    (root / "b").mkdir()
    first = make_restartable_server(root / "a", agent_svid_ttl=AGENT_TTL, **QUIET).start()
    second = make_restartable_server(
        root / "b", data_dir=str(first.data_dir), agent_svid_ttl=AGENT_TTL, **QUIET
    )
    second.data_dir = first.data_dir  # where it writes its runtime file
    try:
        yield Pair(first, second, root)
    finally:
        for server in (first, second):
            if server.proc is not None:
                server.stop()
        print("---- second server log ----\n" + second.logs()[-4000:])
        shutil.rmtree(root, ignore_errors=True)


def agent_serial(agent: AgentProcess) -> int:
    return x509.load_der_x509_certificate(
        (agent.data_dir / "agent_svid.der").read_bytes()
    ).serial_number


def test_an_agent_fails_over_when_its_server_is_killed_and_stays_on_the_survivor(
    pair: Pair,
) -> None:
    first, second = addresses(pair.first), addresses(pair.second)
    with agent_stack(
        pair.root / "agent", pair.first, start=False, servers=(first, second)
    ) as agent:
        (pair.root / "agent").mkdir(exist_ok=True)
        agent.start("--metrics-address", "127.0.0.1:0")
        agent_id = agent.agent_id()
        attested = time.time()
        create_entry(pair.first, FIRST, agent_id)
        agent.wait_svid(FIRST)
        # The second server was down: wherever the agent started, it is on the first now.
        wait_for(lambda: agent_metrics(agent)[:2] == (1, first[0]), 30, "the agent on the first")
        workload = Workload(agent).start()
        serial = agent_serial(agent)
        pair.second.start()

        killed = time.monotonic()
        pair.first.kill9()
        wait_for(
            lambda: agent_metrics(agent)[:2] == (1, second[0]),
            30,
            "the agent's Sync stream on the second server",
            interval=0.02,
        )
        took = time.monotonic() - killed
        print(f"failover: Sync stream up on the second server {took:.2f} s after kill -9")
        assert took < FAILOVER_GOAL
        # The renewal is still ahead: it happens on the survivor (see AGENT_TTL).
        assert agent_serial(agent) == serial, "renewed before the failover: raise AGENT_TTL"
        assert "moving to another server" in agent.logs()

        # Written through the survivor, pushed down the stream the workload held throughout.
        create_entry(pair.second, LATER, agent_id)
        wait_for(lambda: any(LATER in ids for ids in workload.stream_ids), 10, "the new entry")

        # The agent SVID is renewed by the survivor, over mTLS with the SVID it had.
        wait_for(lambda: agent_serial(agent) != serial, AGENT_TTL, "the agent SVID renewed")
        assert time.time() - attested < AGENT_TTL
        wait_for(lambda: agent_metrics(agent)[:2] == (1, second[0]), 10, "Sync on the new SVID")
        listed = pair.second.cli_json("agent", "show", "--spiffe-id", agent_id)
        assert int(str(listed.get("agent", listed)["serial"]), 16) == agent_serial(agent)

        # The killed server comes back: the agent stays where it is.
        moves = agent_metrics(agent)[2]
        pair.first.start()
        time.sleep(3)
        assert agent_metrics(agent) == (1, second[0], moves)

        workload.stop.set()
        assert workload.polls > 20
        assert workload.gaps == []


def test_every_agent_of_a_killed_server_is_back_on_another_within_10_s(pair: Pair) -> None:
    """Several agents (SVIDD_FAILOVER_AGENTS, default 4) lose their server at the same instant;
    their jittered reconnects land on the survivor, all within the goal."""
    count = int(os.environ.get("SVIDD_FAILOVER_AGENTS", "4"))
    first, second = addresses(pair.first), addresses(pair.second)
    agents: list[AgentProcess] = []
    try:
        for n in range(count):
            root = pair.root / f"agent{n}"
            root.mkdir()
            agent = AgentProcess(root, pair.first, new_token(pair.first), servers=(first, second))
            agents.append(agent.start("--metrics-address", "127.0.0.1:0"))
        for agent in agents:
            wait_for(lambda a=agent: agent_metrics(a)[:2] == (1, first[0]), 60, "agents on A")
        pair.second.start()

        killed = time.monotonic()
        pair.first.kill9()
        back: dict[int, float] = {}

        def all_back() -> bool:
            for n, agent in enumerate(agents):
                if n not in back and agent_metrics(agent)[:2] == (1, second[0]):
                    back[n] = time.monotonic() - killed
            return len(back) == count

        wait_for(all_back, 60, "every agent on the second server", interval=0.02)
        times = sorted(back.values())
        print(f"failover of {count} agents: first {times[0]:.2f} s, last {times[-1]:.2f} s")
        assert times[-1] < FAILOVER_GOAL
    finally:
        for agent in agents:
            agent.stop()
            if agent.proc is None and agent.log_path.exists() and "Traceback" in agent.logs():
                print(agent.logs()[-3000:])


def test_an_agent_leaves_a_server_that_hangs_without_closing_its_connection(pair: Pair) -> None:
    """A stopped (SIGSTOP) server keeps its connections open and answers nothing: the agent's
    keepalive pings go unanswered, its Sync stream ends and it moves on."""
    first, second = addresses(pair.first), addresses(pair.second)
    with agent_stack(
        pair.root / "agent", pair.first, start=False, servers=(first, second)
    ) as agent:
        (pair.root / "agent").mkdir(exist_ok=True)
        agent.start("--metrics-address", "127.0.0.1:0")
        wait_for(lambda: agent_metrics(agent)[:2] == (1, first[0]), 30, "the agent on the first")
        pair.second.start()
        assert pair.first.proc is not None
        hung = pair.first.proc.pid
        stopped = time.monotonic()
        os.kill(hung, signal.SIGSTOP)
        try:
            wait_for(
                lambda: agent_metrics(agent)[:2] == (1, second[0]),
                60,
                "the agent's Sync stream on the second server",
                interval=0.1,
            )
        finally:
            os.kill(hung, signal.SIGCONT)
        took = time.monotonic() - stopped
        print(f"failover from a hung server: {took:.2f} s after SIGSTOP")
        assert took < 30  # 15 s to the ping, 5 s for its answer, then the jittered reconnect
