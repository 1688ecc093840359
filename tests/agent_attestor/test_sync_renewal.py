"""When the agent renews its own SVID (Syncer._renew_loop) under a wall clock skewed from the
server's, how long a renewal waits for its answer, and what a renewal that fails leads to: a
retry after a backoff, or a move to another server. The renewals are the Syncer's own
(renew_once, saving and installing what came); only the server's answer is stood in for, signed
by a CA that dates the SVIDs by the server's clock."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor import sync
from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache
from agent_attestor.cancel import cancel_all
from agent_attestor.errors import RenewalFailedError
from agent_attestor.model import TrustBundle
from agent_attestor.node_client import Heartbeat, NodeClient
from agent_attestor.rotation import JITTER
from agent_attestor.servers import Target
from agent_attestor.sync import Syncer, SyncSettings, failure_code
from svid._clock import FakeClock
from svid._der import certs_to_pem, parse_der_certs
from svid._errors import SvidParseError
from tests.agent_attestor.harness import LoopThread
from tests.agent_attestor.pki import LocalCa
from tests.clocks import SteppedClock
from tests.e2e.attestation_retries import running, until
from tests.e2e.conftest import wait_for
from tests.rpc_errors import rpc_error
from tests.server.fixtures import TRUST_DOMAIN, bundle_pem, managed_server, short_tmpdir

AGENT = "spiffe://example.org/svid/agent/join_token/t"
TTL = 3600  # the server's agent_svid_ttl
SKEW = 1800.0  # half the TTL: the agent's clock this far from the server's


class _Server:
    """The servers' side of RenewAgent: a fresh agent SVID of TTL seconds, dated by their clock;
    first, `hangs` renewals that get no answer (their deadline passes on the clock), then the
    failures queued in `failures`. `asked`: the address and deadline of every renewal."""

    def __init__(self, clock: FakeClock) -> None:
        self.ca = LocalCa(clock, ttl=TTL)
        self.renewals = 0
        self.hangs = 0
        self.slow = 0.0  # seconds each renewal takes to be answered (on the clock)
        self.failures: list[Exception] = []
        self.asked: list[tuple[str, float]] = []

    def svid(self) -> AgentSvid:
        key = ec.generate_private_key(ec.SECP256R1())
        return AgentSvid(AGENT, (self.ca.sign_leaf(key.public_key(), AGENT),), key)

    async def renew(self, address: str, timeout: float) -> tuple[AgentSvid, TrustBundle]:
        self.asked.append((address, timeout))
        if self.hangs:
            self.hangs -= 1
            clock = self.ca.clock
            assert isinstance(clock, FakeClock)
            clock.advance(timeout)
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if self.failures:
            raise self.failures.pop(0)
        if self.slow:
            clock = self.ca.clock
            assert isinstance(clock, FakeClock)
            clock.advance(min(self.slow, timeout))
            if timeout < self.slow:
                raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        self.renewals += 1
        return self.svid(), self.ca.bundle()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> _Server:
    # Seconds between readings of the clocks while a renewal waits: the test moves them.
    monkeypatch.setattr(sync, "RECHECK", 0.01)
    # At half the life exactly: these are about the clocks, and each SVID's own jitter would
    # move the points the tests step to (it is test_renewal_wait.py's).
    monkeypatch.setattr(sync, "jitter_for", lambda _svid: 0.0)
    # On a whole second: a certificate's validity is in whole seconds, and the life an SVID has
    # left (the deadlines of its renewals) is then what a test steps to.
    srv = _Server(FakeClock(start=float(int(time.time()))))

    async def renew(client: NodeClient, timeout: float = 30.0) -> tuple[AgentSvid, TrustBundle]:
        return await srv.renew(client.server_address, timeout)

    monkeypatch.setattr(NodeClient, "renew", renew)
    return srv


ONE = (Target("127.0.0.1:1", "127.0.0.1:1"),)
TWO = (*ONE, Target("127.0.0.1:2", "127.0.0.1:2"))


def _syncer(
    tmp_path: Path,
    server: _Server,
    skew: float = 0.0,
    servers: tuple[Target, ...] = ONE,
    rand: random.Random | None = None,
) -> tuple[FakeClock, Syncer]:
    """The servers' clock, and an agent of `servers` whose clock is `skew` s from it and whose
    data_dir holds an agent SVID the server issued just now. With `rand`, the agent's waits
    are the defaults' (reconnect_min 1 s, reconnect_max 10 s), drawn by it."""
    base = server.ca.clock
    assert isinstance(base, FakeClock)
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    store.save_svid(server.svid())
    clock = SteppedClock(base, skew)
    if rand is None:
        settings = SyncSettings(servers, reconnect_min=0.01, reconnect_max=0.01)
    else:
        settings = SyncSettings(servers, reconnect_min=1.0, reconnect_max=10.0, rand=rand)
    syncer = Syncer(settings, store, Cache(), clock)
    syncer.set_bootstrap_roots(certs_to_pem([server.ca.cert]))
    return base, syncer


async def _not_renewed(syncer: Syncer, server: _Server) -> asyncio.Task[None]:
    """The renewal loop of the agent SVID in use, once it has read the clocks a few times
    without renewing it."""
    before = server.renewals
    loop = asyncio.create_task(syncer._renew_loop(syncer.agent_svid))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    assert not loop.done()
    assert server.renewals == before
    return loop


def test_a_clock_ahead_by_half_the_ttl_renews_once_not_in_a_loop(
    tmp_path: Path, server: _Server
) -> None:
    """30 min ahead of the server's, with a 1 h TTL, the agent's clock read every SVID the
    server handed it as past its rotation point (half the life from a NotBefore the server
    dated): each renewal moved the Sync stream to a new connection, whose loop renewed again
    at once, hammering the server until it refused the agent's streams. The SVID on disk at
    the start, which came no one knows when, is still renewed at once: by this clock it is
    overdue."""
    base, syncer = _syncer(tmp_path, server, SKEW)

    async def scenario() -> None:
        loaded = await syncer.ensure_identity()
        await asyncio.wait_for(syncer._renew_loop(loaded), 5)
        assert server.renewals == 1
        loop = await _not_renewed(syncer, server)
        # Half of what the SVID has left by this clock (1800 s), counted from its arrival.
        base.advance(901)
        await asyncio.wait_for(loop, 5)
        assert server.renewals == 2
        await syncer.close()

    asyncio.run(scenario())


def test_a_clock_behind_by_half_the_ttl_renews_before_the_svid_lapses(
    tmp_path: Path, server: _Server
) -> None:
    """30 min behind the server's, the agent's clock came to the rotation point 5 s before
    NotAfter: a renewal that failed then, or a clock a little further behind, let the agent
    SVID lapse (with a join token spent, the node could not attest again). Half the SVID's life
    after it arrived, on the elapsed clock, it is renewed whatever the wall clock says."""
    base, syncer = _syncer(tmp_path, server, -SKEW)

    async def scenario() -> None:
        await syncer.ensure_identity()
        await syncer.renew_once()  # an SVID arrives: its life is counted from now
        loop = await _not_renewed(syncer, server)
        base.advance(TTL / 2 + 6)  # NotBefore is back-dated 10 s
        await asyncio.wait_for(loop, 5)
        assert server.renewals == 2
        await syncer.close()

    asyncio.run(scenario())


def test_a_clock_behind_by_half_the_ttl_renews_an_svid_loaded_at_start_before_it_lapses(
    tmp_path: Path, server: _Server
) -> None:
    """The agent restarted just after its SVID arrived, its clock 30 min behind the server's:
    the SVID on disk came no one knows when, and by its validity alone this clock came to its
    rotation point 5 s before NotAfter (a renewal failing then, and the SVID lapsed). It came
    before the load at the latest: half its life after the load, on the elapsed clock, it is
    renewed, never before its rotation point whatever the skew."""
    base, syncer = _syncer(tmp_path, server, -SKEW)

    async def scenario() -> None:
        loaded = await syncer.ensure_identity()
        loop = await _not_renewed(syncer, server)
        base.advance(TTL / 2 - 20)  # before its rotation point: not yet
        await asyncio.sleep(0.1)
        assert not loop.done()
        assert server.renewals == 0
        base.advance(26)  # half its life (NotBefore back-dated 10 s) after the load
        await asyncio.wait_for(loop, 5)
        assert server.renewals == 1
        assert syncer.agent_svid is not loaded
        await syncer.close()

    asyncio.run(scenario())


def test_the_renewal_waits_for_the_point_its_svids_jitter_moves_it_to(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents whose SVIDs arrived at one instant renewed at one instant: each SVID's jitter
    (rotation.jitter_for, here its largest) moves the point past half its life."""
    monkeypatch.setattr(sync, "jitter_for", lambda _svid: JITTER)
    base, syncer = _syncer(tmp_path, server)

    async def scenario() -> None:
        await syncer.ensure_identity()
        await syncer.renew_once()  # an SVID arrives: its life is counted from now
        loop = await _not_renewed(syncer, server)
        base.advance(TTL / 2 + 6)  # past half its life (NotBefore is back-dated 10 s)
        await asyncio.sleep(0.1)
        assert not loop.done()
        assert server.renewals == 1
        base.advance((TTL + 10) * JITTER)  # and past the jitter
        await asyncio.wait_for(loop, 5)
        assert server.renewals == 2
        await syncer.close()

    asyncio.run(scenario())


def test_an_overdue_svid_loaded_at_start_is_renewed_at_once(
    tmp_path: Path, server: _Server
) -> None:
    """The agent SVID on disk is past its rotation point (the agent was stopped for 40 min):
    it is renewed at once, not half its remaining life after the start, as if it had just
    arrived."""
    base, syncer = _syncer(tmp_path, server)
    base.advance(2400)

    async def scenario() -> None:
        loaded = await syncer.ensure_identity()
        await asyncio.wait_for(syncer._renew_loop(loaded), 5)
        assert server.renewals == 1
        await syncer.close()

    asyncio.run(scenario())


def _unavailable() -> Exception:
    return rpc_error(grpc.StatusCode.UNAVAILABLE, "server gone")


@pytest.mark.parametrize(
    ("failure", "servers"),
    [
        (_unavailable, ONE),
        (lambda: ConnectionError("no connection to 127.0.0.1:1 within 5 s"), ONE),
        (lambda: SvidParseError("SVID for entry 'agent' has no SPIFFE ID"), ONE),
        (lambda: rpc_error(grpc.StatusCode.PERMISSION_DENIED, "agent banned"), TWO),
    ],
    ids=["rpc", "connection", "unusable", "decision"],
)
def test_a_renewal_that_fails_is_retried_after_a_backoff(
    tmp_path: Path,
    server: _Server,
    monkeypatch: pytest.MonkeyPatch,
    failure: object,
    servers: tuple[Target, ...],
) -> None:
    """A failed renewal the agent does not move for (the only server there is, or the server's
    decision about it, which any other would make alike) is retried on its connection, each
    time after a growing backoff. A failure other than a gRPC error or an attestation error
    (the server check found no connection, the server sent an SVID that does not parse) ended
    the renewal loop with no word: nothing renewed the agent SVID on that connection again, and
    it lapsed."""
    assert callable(failure)
    server.failures = [failure(), failure()]
    waited: list[int] = []

    def backoff(attempt: int, low: float, high: float, rand: object, **_kwargs: object) -> float:
        waited.append(attempt)
        return 0.0

    monkeypatch.setattr(sync, "reconnect_delay", backoff)
    base, syncer = _syncer(tmp_path, server, servers=servers)
    base.advance(2400)

    async def scenario() -> None:
        loaded = await syncer.ensure_identity()
        await asyncio.wait_for(syncer._renew_loop(loaded), 5)
        await syncer.close()

    asyncio.run(scenario())
    assert waited == [0, 1]  # one backoff before each retry, growing
    assert server.renewals == 1
    assert len({address for address, _ in server.asked}) == 1
    assert syncer.moves == 0


@pytest.fixture
def hung_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every server's Sync stream as a hung server's: connected at once (its check passed),
    open, and silent."""

    async def connect(client: NodeClient, within: float | None = None) -> None:
        return None

    async def sync(
        client: NodeClient, since_revision: int = 0, epoch: str = ""
    ) -> AsyncIterator[Heartbeat]:
        await asyncio.Event().wait()
        yield Heartbeat(5.0)  # never: the generator only has to be one

    monkeypatch.setattr(NodeClient, "connect", connect)
    monkeypatch.setattr(NodeClient, "sync", sync)


@pytest.mark.usefixtures("hung_streams")
@pytest.mark.parametrize(
    "failure",
    [
        "hang",
        _unavailable,
        lambda: ConnectionError("no connection to 127.0.0.1:1 within 5 s"),
    ],
    ids=["deadline", "unavailable", "connection"],
)
def test_a_renewal_its_server_fails_is_made_at_another_server_before_the_svid_lapses(
    tmp_path: Path, server: _Server, failure: object
) -> None:
    """A renewal its server did not answer (hung without closing the connection, whose Sync
    stream stays open: SIGSTOP, a network black hole), or failed for a reason that is not its
    decision about the agent, was retried with backoff on the same server until the SVID
    lapsed: each try waited 30 s, or until keepalive gave up on the connection (~20 s), and
    only then did the agent move. An agent attested by join token had no SVID left to move
    with, and no token either. The renewal's deadline is a third of the life the SVID has left,
    and its failure moves the agent to the other server, where it renews at once."""
    if failure == "hang":
        server.hangs = 1
    else:
        assert callable(failure)
        server.failures = [failure()]
    base, syncer = _syncer(tmp_path, server, servers=TWO)
    base.advance(TTL - 45)  # overdue, 45 s of its life left

    async def scenario() -> None:
        loaded = await syncer.ensure_identity()
        async with running(syncer):
            await until(lambda: syncer.agent_svid is not loaded, "the agent SVID renewed")
            assert syncer.agent_svid is not None
            assert syncer.agent_svid.spiffe_id == loaded.spiffe_id

    asyncio.run(scenario())
    assert syncer.moves == 1
    assert server.renewals == 1
    (first, deadline), (second, _) = server.asked
    assert first != second
    assert syncer.server == second
    assert deadline == pytest.approx(15.0)  # a third of the 45 s left, not 30 s


class _LongestWaits(random.Random):
    """The agent's random source, drawing every wait at its longest, which passes on the
    servers' clock instead of being slept (the agent sleeps 0): `waits` holds each, with the
    time it began."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(7)
        self.clock = clock
        self.waits: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.waits.append((self.clock.now(), b))
        self.clock.advance(b)
        return 0.0


@pytest.mark.usefixtures("hung_streams")
@pytest.mark.parametrize(
    ("servers", "failure", "tries"),
    [(TWO, "hang", 4), (ONE, _unavailable, 8)],
    ids=["two-slow-servers", "only-server-unavailable"],
)
def test_an_agent_bouncing_between_slow_servers_renews_before_its_short_svid_lapses(
    tmp_path: Path, server: _Server, servers: tuple[Target, ...], failure: object, tries: int
) -> None:
    """A short agent_svid_ttl (90 s), its renewal due with 45 s left, and two servers too slow
    to answer (each renewal waits out its deadline, a third of what is left, and the agent
    moves to the other, as slow), or the only one failing it `tries` times: the waits between
    tries grew as the backoff does (1, 2, 4, 8, 10 s at the longest) whatever the SVID had
    left, and one outlasted it: the agent was left with no SVID to renew with, and a join
    token agent with none ever again. Each wait is now within a third of what the SVID has
    left (reconnect.py), and the server that answers at the next try renews it in time."""
    server.ca.ttl = 90
    if failure == "hang":
        server.hangs = tries
    else:
        assert callable(failure)
        server.failures = [failure() for _ in range(tries)]
    clock = server.ca.clock
    assert isinstance(clock, FakeClock)
    rand = _LongestWaits(clock)
    base, syncer = _syncer(tmp_path, server, servers=servers, rand=rand)
    base.advance(45)  # past its renewal point (half of its 100 s from NotBefore), 45 s left

    async def scenario() -> AgentSvid:
        loaded = await syncer.ensure_identity()
        lapsed = loaded.not_after

        def over() -> bool:
            return syncer.agent_svid is not loaded or base.now() >= lapsed

        async with running(syncer):
            await until(over, "the agent SVID renewed, or lapsed")
        return loaded

    loaded = asyncio.run(scenario())
    waits = [(round(at - loaded.not_after, 2), longest) for at, longest in rand.waits]
    assert all(at + longest < 0 for at, longest in waits), waits
    assert server.renewals == 1
    assert syncer.agent_svid is not loaded


@pytest.mark.usefixtures("hung_streams")
def test_a_server_hung_at_the_connection_leaves_the_time_to_renew_at_the_other(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shortest agent_svid_ttl (11 s), its renewal due with 6 s left: the agent's server
    hangs the renewal (its deadline, 2 s, passes), the agent moves to the other, which hangs
    the connection (stopped: TCP accepted by the kernel, no TLS). The connection waited
    connect_timeout (5 s) there, past what the SVID had left, where the first server, back,
    would have renewed it. It waits a third of what is left, as a renewal does."""
    server.ca.ttl = 11
    server.hangs = 1
    clock = server.ca.clock
    assert isinstance(clock, FakeClock)
    rand = _LongestWaits(clock)
    base, syncer = _syncer(tmp_path, server, servers=TWO, rand=rand)
    hung = ""  # the server the agent does not start on
    connects: list[tuple[str, float]] = []

    async def connect(client: NodeClient, within: float | None = None) -> None:
        took = client._connect_timeout if within is None else min(within, client._connect_timeout)
        connects.append((client.server_address, took))
        if client.server_address == hung:
            base.advance(took)
            raise ConnectionError(f"no connection to {hung} within {took:g} s")

    monkeypatch.setattr(NodeClient, "connect", connect)
    base.advance(5)  # past its renewal point (half of its 21 s from NotBefore), 6 s left

    async def scenario() -> tuple[AgentSvid, str]:
        nonlocal hung
        loaded = await syncer.ensure_identity()
        first = syncer.server
        hung = next(t.node for t in TWO if t.node != first)
        lapsed = loaded.not_after

        def over() -> bool:
            return syncer.agent_svid is not loaded or base.now() >= lapsed

        async with running(syncer):
            await until(over, "the agent SVID renewed, or lapsed")
        return loaded, first

    loaded, first = asyncio.run(scenario())
    assert syncer.agent_svid is not loaded, (connects, rand.waits)
    assert server.renewals == 1
    # The renewal made at the first server, back (the stream moves to the new SVID after it).
    assert [address for address, _ in connects][:3] == [first, hung, first]
    assert connects[1][1] < 5.0


def test_renewals_at_the_only_server_wait_within_the_life_left_then_fail_once_it_lapsed(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no other server to move to, a renewal that hangs is retried on the same connection
    (a reconnect would only dial the same server again), each waiting what is left (never
    under RENEW_FLOOR): no share of it is kept for a move. Once the SVID has lapsed the
    connection ends as a failure: it was a clean reconnect, and the next connection came with
    no backoff."""
    monkeypatch.setattr(sync, "reconnect_delay", lambda *_args, **_kwargs: 0.0)
    server.hangs = 100
    base, syncer = _syncer(tmp_path, server)
    base.advance(TTL - 9)  # overdue, 9 s of its life left

    async def scenario() -> None:
        loaded = await syncer.ensure_identity()
        with pytest.raises(RenewalFailedError) as failed:
            await asyncio.wait_for(syncer._renew_loop(loaded), 5)
        assert failure_code(failed.value) == "DEADLINE_EXCEEDED"
        await syncer.close()

    asyncio.run(scenario())
    deadlines = [deadline for _, deadline in server.asked]
    assert deadlines == pytest.approx([9.0])
    assert len({address for address, _ in server.asked}) == 1
    assert server.renewals == 0


def test_a_renewal_at_the_only_server_waits_what_its_svid_has_left_for_a_slow_answer(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third of the life left is the time a renewal leaves for another server. With none to
    move to it cut short what the only server would have answered (busy: 4 s to sign and
    record, with 9 s left), each retry there had less, and the SVID lapsed where one renewal
    waiting up to 30 s had renewed it."""
    monkeypatch.setattr(sync, "reconnect_delay", lambda *_args, **_kwargs: 0.0)
    server.slow = 4.0
    base, syncer = _syncer(tmp_path, server)
    base.advance(TTL - 9)  # overdue, 9 s of its life left

    async def scenario() -> None:
        loaded = await syncer.ensure_identity()
        await asyncio.wait_for(syncer._renew_loop(loaded), 5)
        assert syncer.agent_svid is not loaded
        await syncer.close()

    asyncio.run(scenario())
    assert server.renewals == 1
    assert [deadline for _, deadline in server.asked] == pytest.approx([9.0])


def test_a_renewal_waits_a_third_of_the_life_left_between_a_floor_and_the_old_cap() -> None:
    assert sync.renewal_timeout(3600.0) == 30.0
    assert sync.renewal_timeout(45.0) == pytest.approx(15.0)
    assert sync.renewal_timeout(1.5) == 1.0
    assert sync.renewal_timeout(-2.0) == 1.0
    assert sync.renewal_timeout(9.0, elsewhere=False) == 9.0
    assert sync.renewal_timeout(3600.0, elsewhere=False) == 30.0


def test_an_agent_ahead_of_a_real_server_by_half_the_ttl_keeps_its_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole Sync loop against a real server, the agent's clock half an hour ahead of the
    server's: attested, it serves entries on one stream, where it renewed its SVID at once,
    moved its stream to the new one, renewed again, dozens of times a second."""
    monkeypatch.setattr(sync, "RECHECK", 0.01)
    changes: list[str] = []
    loop = LoopThread()
    with managed_server() as srv:
        data = short_tmpdir()
        settings = SyncSettings(
            (Target(srv.runtime.node_address, srv.runtime.attest_address),),
            trust_domain=TRUST_DOMAIN,
            join_token=srv.join_token(),
            bootstrap_root_pem=bundle_pem(srv.bundle()),
            bootstrap_given=True,
            reconnect_min=0.1,
            reconnect_max=0.3,
        )
        store = AgentStore(data / "svid.der", data / "key.der", data / "bundle.der")
        cache = Cache()
        clock = SteppedClock(FakeClock(start=srv.clock.now()), SKEW + 1)
        syncer = Syncer(settings, store, cache, clock, changes.append)
        running = loop.call(lambda: asyncio.ensure_future(syncer.run()))
        try:
            wait_for(lambda: syncer.connected, 20, "the agent's Sync stream")
            entry = srv.create_entry("/web", syncer.agent_id)
            wait_for(lambda: entry.id in cache.entries(), 20, "the entry in the agent's cache")
            # Nothing to await: what went wrong came at once, ~15 renewals in the next 0.3 s.
            time.sleep(0.3)
            assert changes.count("renewed") == 0, changes
            assert changes.count("attested") == 1
        finally:
            loop.run(cancel_all([running]))
            loop.run(syncer.close())
            loop.stop()
            shutil.rmtree(data, ignore_errors=True)


def _disk_refuses(tmp_path: Path) -> None:
    """A directory stands where a save writes the new key first, as a full disk refuses it (the
    tests run as root, whom a read-only chmod does not stop)."""
    (tmp_path / "key.der.next").mkdir()
    (tmp_path / "key.der.next" / "in-the-way").write_text("")


def _disk_mended(tmp_path: Path) -> None:
    shutil.rmtree(tmp_path / "key.der.next")


async def _renewal_held(
    syncer: Syncer, base: FakeClock, server: _Server, tmp_path: Path
) -> tuple[AgentSvid, asyncio.Task[None]]:
    """The agent SVID loaded from disk, and its renewal loop once it renewed it with the disk
    refusing the new one (held unused: Syncer._adopt)."""
    loaded = await syncer.ensure_identity()
    _disk_refuses(tmp_path)
    loop = asyncio.create_task(syncer._renew_loop(loaded))
    base.advance(TTL / 2)
    await until(lambda: server.renewals == 1, "the renewal")
    # Answered is not yet held: its save, in a thread, comes first (_adopt).
    await until(lambda: syncer._adopting is not None and syncer._adopting.done(), "its save")
    return loaded, loop


def test_a_renewal_the_disk_refuses_keeps_the_saved_svid_in_use_until_it_is_saved(
    tmp_path: Path, server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The server drops the SVID an agent renewed with at its first call with the new one: used
    from memory while the disk refused it, the new one superseded the one on disk, and a
    restart before the save loaded that one, was refused and attested again (a join-token agent
    out for good). Held unused while the one on disk has life left, the renewal is not asked
    again meanwhile, and the new one is used once saved."""
    base, syncer = _syncer(tmp_path, server)
    store = syncer._store
    syncer._s.save_retry_first = 0.01

    async def scenario() -> None:
        loaded, loop = await _renewal_held(syncer, base, server, tmp_path)
        await asyncio.sleep(0.2)  # the loop reads the clocks many times meanwhile
        assert not loop.done()
        assert server.renewals == 1  # held, not renewed again and again
        assert syncer.agent_svid is loaded  # the one on disk, which the server still takes
        saved = store.load_svid()
        assert saved is not None
        assert saved.chain == loaded.chain
        _disk_mended(tmp_path)
        saver = asyncio.create_task(syncer._save_loop())
        await asyncio.wait_for(loop, 5)  # saved: the stream moves to the new one
        renewed = syncer.agent_svid
        assert renewed is not None
        assert renewed is not loaded
        saved = store.load_svid()
        assert saved is not None
        assert saved.chain == renewed.chain
        assert server.renewals == 1
        await cancel_all([saver])
        await syncer.close()

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert "going on with the one saved before it" in caplog.text
    assert "saved the agent SVID the disk refused before" in caplog.text


def test_a_renewal_the_disk_refuses_is_used_once_the_saved_svid_runs_short(
    tmp_path: Path, server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Held for as long as the SVID on disk has more than a quarter of its life left: past that
    it would be of no use to a restart for long, and the renewed one, used from memory, is the
    one the agent goes on with."""
    base, syncer = _syncer(tmp_path, server)

    async def scenario() -> None:
        loaded, loop = await _renewal_held(syncer, base, server, tmp_path)
        await asyncio.sleep(0.1)
        assert not loop.done()
        assert syncer.agent_svid is loaded
        base.advance(TTL / 4)  # NotBefore back-dated 10 s: under a quarter left
        await asyncio.wait_for(loop, 5)
        assert syncer.agent_svid is not loaded
        assert server.renewals == 1
        await syncer.close()

    with caplog.at_level(logging.ERROR, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert "runs short and the disk still refuses the renewed one" in caplog.text


def test_a_restart_with_a_held_renewal_unsaved_loads_the_svid_saved_before_it(
    tmp_path: Path, server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop while the renewed SVID is held and the disk still refuses it: what is on disk is
    the SVID in use, which the server still takes (the renewed one was never used), and the
    stop says so rather than that the next start cannot use it."""
    base, syncer = _syncer(tmp_path, server)

    async def scenario() -> None:
        loaded, loop = await _renewal_held(syncer, base, server, tmp_path)
        await cancel_all([loop])
        await syncer.settle(1)
        await syncer.close()
        assert syncer.agent_svid is loaded

    with caplog.at_level(logging.WARNING, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert "the next start uses the one saved before it" in caplog.text
    assert "cannot use it" not in caplog.text


def test_an_attestation_while_a_renewal_is_held_drops_the_held_one(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved SVID set aside (its bundle no longer verifies the server) while a renewal of it
    is held: the agent attests anew, and the SVID it bought is the one in use. The held one,
    renewed from the SVID set aside, was put in use over it by the next renewal loop (and by
    the next ensure_identity once the one in use ran short): the attestation's SVID, the one
    saved now, superseded by a stale one from memory."""
    base, syncer = _syncer(tmp_path, server)
    attested: list[AgentSvid] = []

    async def attest(client: NodeClient, **_kw: object) -> tuple[AgentSvid, TrustBundle]:
        attested.append(server.svid())
        return attested[-1], server.ca.bundle()

    monkeypatch.setattr(NodeClient, "attest", attest)

    async def scenario() -> None:
        loaded, loop = await _renewal_held(syncer, base, server, tmp_path)
        await cancel_all([loop])  # a reconnect
        assert syncer.agent_svid is loaded
        # As _set_aside_saved_svid does: the given bundle, to attest with.
        syncer._fallback = certs_to_pem([server.ca.cert])
        _disk_mended(tmp_path)
        svid = await syncer.ensure_identity()
        assert attested == [svid]
        loop = asyncio.create_task(syncer._renew_loop(svid))
        await asyncio.sleep(0.1)
        assert syncer.agent_svid is svid  # not the renewal held
        saved = syncer._store.load_svid()
        assert saved is not None
        assert saved.chain == svid.chain
        base.advance(TTL / 4 + 20)  # the SVID loaded at the start would run short now
        assert await syncer.ensure_identity() is svid
        await cancel_all([loop])
        await syncer.close()

    asyncio.run(scenario())


def test_a_held_renewal_put_in_use_keeps_the_bundle_the_sync_brought_meanwhile(
    tmp_path: Path, server: _Server
) -> None:
    """The roots that came with a held renewal are set at once; the Sync stream, still on the
    SVID in use, may bring newer ones meanwhile (a CA rotation's next root). Put in use once
    saved, the held one set its own roots again, and workloads were handed the older bundle,
    without the next root, until the bundle changed again (a delta brings it only then)."""
    base, syncer = _syncer(tmp_path, server)
    syncer._s.save_retry_first = 0.01

    async def scenario() -> None:
        loaded, loop = await _renewal_held(syncer, base, server, tmp_path)
        came = syncer._cache.snapshot().bundle
        assert came is not None
        next_root = LocalCa(base, ttl=TTL).cert.public_bytes(serialization.Encoding.DER)
        newer = replace(
            came, x509_authorities=(*came.x509_authorities, next_root), sequence=came.sequence + 1
        )
        syncer._cache.set_bundle(newer)  # as a Sync message applied sets it
        _disk_mended(tmp_path)
        saver = asyncio.create_task(syncer._save_loop())
        await asyncio.wait_for(loop, 5)
        assert syncer.agent_svid is not loaded  # the renewal, saved, in use
        assert syncer._cache.snapshot().bundle == newer
        await cancel_all([saver])
        await syncer.close()

    asyncio.run(scenario())


def test_a_reconnect_while_a_held_renewal_is_unsaved_verifies_the_server_with_the_newest_roots(
    tmp_path: Path, server: _Server
) -> None:
    """The disk refuses the held renewal, so neither the roots it came with nor newer ones a
    Sync message brings meanwhile (a CA rotation's next root) reach it: a reconnect's channel
    verifies the server with the newest of them, not with what the disk holds."""
    base, syncer = _syncer(tmp_path, server)
    bundle_file = tmp_path / "bundle"
    bundle_file.write_bytes(LocalCa(base, ttl=TTL).cert.public_bytes(serialization.Encoding.DER))

    async def scenario() -> None:
        loaded, loop = await _renewal_held(syncer, base, server, tmp_path)
        assert syncer._keeper.holding
        came = syncer._cache.snapshot().bundle
        assert came is not None
        next_root = LocalCa(base, ttl=TTL).cert.public_bytes(serialization.Encoding.DER)
        newer = replace(
            came, x509_authorities=(*came.x509_authorities, next_root), sequence=came.sequence + 1
        )
        await syncer._save_bundle(newer)  # as a Sync message brings it: refused behind the SVID
        syncer._install(loaded, None)  # a reconnect's fresh channel (_after_failure)
        assert syncer._client is not None
        assert syncer._client.root_pem == certs_to_pem(
            parse_der_certs(b"".join(newer.x509_authorities))
        )
        await cancel_all([loop])
        await syncer.close()

    on_disk = bundle_file.read_bytes()
    asyncio.run(scenario())
    assert bundle_file.read_bytes() == on_disk  # the disk took none of them
