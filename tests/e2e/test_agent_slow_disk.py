"""A real agent on a slow disk (every fsync delayed, as on a saturated volume): the files it
keeps (the trust bundle, its copy of the audit checkpoints, its own SVID and key) are written
beside serving, so the Workload API answers at its usual speed while they wait on the disk."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from svid._proto import workload_pb2, workload_pb2_grpc
from tests.e2e.agent_process import HEADER, AgentProcess, agent_stack, create_entry
from tests.e2e.conftest import ServerProcess, make_restartable_server, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e
SLOW_FSYNC_US = 1_000_000  # each fsync and fdatasync of the agent's waits this long
RENEWED_EVERY = 6  # seconds: the agent SVID renewed at half its life
REQUEST = workload_pb2.JWTSVIDRequest(audience=["svc"])


@contextmanager
def slow_fsyncs(pid: int) -> Iterator[None]:
    """Every fsync of process `pid` (all its threads) delayed by SLOW_FSYNC_US, until the block
    ends."""
    with injected_fsyncs(pid, f"delay_enter={SLOW_FSYNC_US}"):
        yield


@contextmanager
def injected_fsyncs(pid: int, fault: str) -> Iterator[None]:
    """`fault` (strace's inject= action: a delay, or error=EIO) done to every fsync and
    fdatasync of process `pid` (all its threads) until the block ends: strace attached."""
    if shutil.which("strace") is None:
        pytest.skip("no strace here to fault the process's fsyncs")
    tracer = subprocess.Popen(
        [
            "strace",
            "-f",
            "-p",
            str(pid),
            "-e",
            "trace=fsync,fdatasync",
            "-e",
            f"inject=fsync:{fault}",
            "-e",
            f"inject=fdatasync:{fault}",
            "-o",
            "/dev/null",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    # strace says "Process N attached [with M threads]" once it holds every thread of the
    # process (each stopped until then, so none makes a call untraced), where a fixed second
    # was waited; one that cannot attach says why and exits.
    stderr = tracer.stderr
    assert stderr is not None
    said: list[str] = []
    while not (said and "attached" in said[-1]):
        line = stderr.readline()
        if not line:
            tracer.wait(10)
            pytest.skip(f"cannot attach strace here: {''.join(said)}")
        said.append(line)
    # It goes on to name each thread started later: read, or a full pipe would stop strace,
    # and with it the process it traces.
    threading.Thread(target=stderr.read, daemon=True).start()
    try:
        yield
    finally:
        if tracer.poll() is None:  # not gone with its process
            tracer.send_signal(signal.SIGINT)
        tracer.wait(10)


@contextmanager
def fetching(stub: workload_pb2_grpc.SpiffeWorkloadAPIStub) -> Iterator[list[float]]:
    """REQUEST's FetchJWTSVID asked over and over beside the block; yields the list of how
    long each call waited, complete once the block ends."""
    waits: list[float] = []
    done = threading.Event()

    def fetch() -> None:
        while not done.is_set():
            started = time.monotonic()
            stub.FetchJWTSVID(REQUEST, metadata=HEADER, timeout=30)
            waits.append(time.monotonic() - started)
            time.sleep(0.02)

    fetcher = threading.Thread(target=fetch)
    fetcher.start()
    try:
        yield waits
    finally:
        done.set()
        fetcher.join(60)


@contextmanager
def _agent_with_a_jwt_minted(
    root: Path, server: ServerProcess
) -> Iterator[tuple[AgentProcess, workload_pb2_grpc.SpiffeWorkloadAPIStub]]:
    """A real agent for `server` with a workload entry, and a stub through which REQUEST's
    JWT-SVID was minted, so the next asks are answered from its cache."""
    with agent_stack(root, server) as agent:
        agent_id = agent.agent_id()
        create_entry(server, "spiffe://example.org/slow", agent_id)
        agent.wait_svid("spiffe://example.org/slow")
        stub = agent.stub()
        stub.FetchJWTSVID(REQUEST, metadata=HEADER, timeout=10)  # minted: answered from cache
        yield agent, stub


def test_the_workload_api_answers_while_the_agent_saves_its_files_on_a_slow_disk() -> None:
    root = short_tmpdir()
    server = make_restartable_server(root).start()
    with _agent_with_a_jwt_minted(root, server) as (agent, stub):
        bundle = agent.data_dir / "bundle.der"
        saved_at = bundle.stat().st_mtime_ns
        assert agent.proc is not None
        with slow_fsyncs(agent.proc.pid), fetching(stub) as waits:
            # A new server process: the agent's Sync stream comes back with a snapshot,
            # whose trust bundle it saves, and the audit checkpoint the start signed.
            server.stop()
            server.start()
            wait_for(lambda: bundle.stat().st_mtime_ns != saved_at, 30, "the bundle saved")
            time.sleep(2 * SLOW_FSYNC_US / 1e6)  # what else the reconnect writes
        assert waits
        worst = max(waits)
        # Answered from memory: a wait of a whole fsync is the event loop blocked on the disk.
        assert worst < SLOW_FSYNC_US / 1e6 / 2, f"a FetchJWTSVID waited {worst:.2f} s"


def test_the_workload_api_answers_while_the_agent_saves_its_renewed_svid_on_a_slow_disk() -> None:
    root = short_tmpdir()
    # Renewed every few seconds (at half its life), so the test sees a renewal soon.
    server = make_restartable_server(root, agent_svid_ttl=RENEWED_EVERY * 2).start()
    with _agent_with_a_jwt_minted(root, server) as (agent, stub):
        assert agent.proc is not None
        with slow_fsyncs(agent.proc.pid):
            renewed = agent.logs().count("agent SVID renewed")
            with fetching(stub) as waits:
                wait_for(
                    lambda: agent.logs().count("agent SVID renewed") > renewed,
                    3 * RENEWED_EVERY,
                    "a renewal",
                )
        assert waits
        worst = max(waits)
        assert worst < SLOW_FSYNC_US / 1e6 / 2, f"a FetchJWTSVID waited {worst:.2f} s"
