"""Issue 11 items 6 and 7: one uid cannot stall or lock out another uid's callers.

The flooding user is a real process running as `nobody` over real sockets; its identifications
are held at a gate, as slow hashes of huge binaries would hold them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from agent_attestor.admission import Admission, capacity_for
from agent_attestor.identify_pool import IdentifyPool
from agent_attestor.model import Selector
from agent_attestor.relay import RelaySettings
from agent_attestor.workload_attestor import UnixAttestor
from svid._clock import FakeClock
from tests.agent_attestor.harness import Harness, fetch_ids
from tests.users import NOBODY, hold_connections_as_nobody
from tests.waits import wait_for

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")


class _SlowFor:
    """Holds every identification of one uid until opened, and counts them."""

    reads_process = True

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.open = threading.Event()
        self._lock = threading.Lock()
        self.entered = 0

    def attest(self, pid: int, uid: int, gid: int) -> list[Selector]:
        if uid == self.uid:
            with self._lock:
                self.entered += 1
            self.open.wait(60)
        return []


@pytest.fixture
def slowed() -> Iterator[tuple[Harness, _SlowFor]]:
    slow = _SlowFor(NOBODY)
    h = Harness(attestors=[slow, UnixAttestor()])
    os.chmod(h.root, 0o755)
    os.chmod(h.socket_path.parent, 0o755)
    try:
        yield h, slow
    finally:
        slow.open.set()
        h.close()


@as_root
def test_one_uids_slow_identifications_do_not_stall_another_uids_fetch(
    slowed: tuple[Harness, _SlowFor],
) -> None:
    agent, slow = slowed
    agent.add_entry("/root-caller")  # unix:uid:0, this test process
    flood = hold_connections_as_nobody(agent.socket_path, 40)  # more than any default pool
    try:
        assert flood.stdout is not None
        assert int(flood.stdout.readline()) == 40
        wait_for(lambda: slow.entered >= 2, 20, "two of nobody's identifications held")
        # Every one of nobody's identifications is still held: ours must get through anyway.
        assert fetch_ids(f"unix:{agent.socket_path}") == ["spiffe://example.org/root-caller"]
        assert not slow.open.is_set()
        assert slow.entered <= agent.endpoint.relay.settings.identify_per_uid
    finally:
        slow.open.set()
        flood.kill()
        flood.wait(10)


def test_a_connection_not_identified_in_time_is_closed() -> None:
    slow = _SlowFor(os.getuid())
    h = Harness(
        attestors=[slow, UnixAttestor()], relay_settings=RelaySettings(identify_timeout=0.2)
    )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(h.socket_path))
            s.settimeout(30)
            assert s.recv(1) == b""  # closed by the agent while identification still hangs
        assert not slow.open.is_set()
        relay = h.endpoint.relay
        assert h.lt.call(lambda: relay.admission.total) == 0
    finally:
        slow.open.set()
        h.close()


# ---- admission as a pure decision ------------------------------------------------------------


def test_a_uid_at_its_share_is_refused_while_others_come_in() -> None:
    adm = Admission(per_uid=3, capacity=100, clock=FakeClock())
    assert [adm.admit(1000) for _ in range(4)] == [True, True, True, False]
    assert adm.admit(1001)
    adm.release(1000)
    assert adm.admit(1000)


def test_the_reserve_is_kept_for_uids_holding_few_connections() -> None:
    adm = Admission(per_uid=1000, capacity=80, clock=FakeClock())
    assert adm.reserve == 10
    admitted = sum(adm.admit(1000) for _ in range(100))
    assert admitted == 70  # up to the reserve
    assert adm.admit(1001)  # a new caller still gets in
    assert adm.admit(1001)
    assert not adm.admit(1001)  # but cannot take the reserve for itself
    for uid in range(2000, 2008):
        assert adm.admit(uid)
    assert adm.total == 80
    assert not adm.admit(3000)  # full is full
    refusal = adm.decide(3000)
    assert refusal is not None
    assert "maximum of 80" in refusal.reason


def test_capacity_leaves_headroom_and_counts_descriptors_per_connection() -> None:
    assert capacity_for(1024) == (1024 - 128) // 4
    assert capacity_for(10) == 1


# ---- the identify pool's share ---------------------------------------------------------------


def test_a_uid_runs_at_most_its_share_and_a_timed_out_job_keeps_its_slot() -> None:
    pool = IdentifyPool(threads=4, per_uid=1)
    release = threading.Event()

    async def body() -> None:
        first = asyncio.create_task(pool.run(1000, lambda: release.wait(30)))
        while pool.busy(1000) == 0:
            await asyncio.sleep(0.001)
        # The waiter gives up; its job still runs, so the uid's slot stays taken.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(first, 0.05)
        assert pool.busy(1000) == 1
        second = asyncio.create_task(pool.run(1000, lambda: "second"))
        other = await pool.run(1001, lambda: "other uid")  # not behind uid 1000
        assert other == "other uid"
        assert not second.done()
        release.set()
        assert await asyncio.wait_for(second, 30) == "second"
        assert pool.busy(1000) == 0

    try:
        asyncio.run(body())
    finally:
        release.set()
        pool.shutdown()


def test_a_flood_of_callers_without_a_close_on_exec_end_writes_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any local process can connect as fast as it likes holding its end without close-on-exec
    (or exit at once): one info line each filled the agent's log at hundreds of lines a second.
    The first is written, then one a minute saying how many it stands for. (Only where a
    selector depends on the caller's image is its end looked for at all.)"""
    h = Harness(attestors=[UnixAttestor(exe_selectors="always")])
    try:
        caplog.set_level(logging.INFO, logger="agent_attestor")
        for _ in range(30):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.set_inheritable(True)
                s.connect(str(h.socket_path))
            # One at a time, each identified and gone before the next: no refusal in between.
            wait_for(
                lambda: not h.lt.call(lambda: len(h.endpoint.relay.links)),
                20,
                "the connection identified and gone",
                interval=0.01,
            )
        lines = [r for r in caplog.records if "close-on-exec" in r.getMessage()]
        assert len(lines) == 1
    finally:
        h.close()
