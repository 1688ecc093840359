"""The agent's pinned channel behind a balancer over several servers of its trust domain (one
PostgreSQL, one CA). A CA rotation under an upstream root is not seen by every server at once:
each presents a certificate of the new CA only from its next server-SVID renewal (half its
life), so for a while one server of the trust domain presents the old CA's certificate and
another the new one's. Both are the agent's servers: a connection that lands on either must be
taken, as it was when the channel trusted the bundle's root."""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.rotation import activate_at, prepare_at
from server.ca.sealing import KeyEncryptionKey
from tests.agent_attestor.harness import LoopThread
from tests.agent_attestor.test_channel_pin import (
    NOT_OURS,
    _agent,
    _port,
    _Relay,
    _server_ca,
)
from tests.server.fixtures import PEM, short_tmpdir, start_server
from tests.server.shared_root import corporate_ca, upstream_intermediate
from tests.server.test_replication_servers import wait_until
from tests.waits import wait_for


class _RoundRobin(_Relay):
    """A balancer handing each new connection to the next of its backends in turn."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(ports[0])
        self._turn = itertools.cycle(ports)

    @property  # type: ignore[override]
    def port(self) -> int:
        return next(self._turn)

    @port.setter
    def port(self, value: int) -> None:
        pass


def test_an_agent_behind_a_balancer_syncs_while_its_servers_present_two_cas_of_a_rotation(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent_attestor")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (corporate_ca("Corporate Root", root_key, None), root_key)
    files = short_tmpdir()
    upstream, _ = upstream_intermediate(files, "ours", root)
    KeyEncryptionKey.generate().write_new(files / "kek")
    shared = {
        "datastore": postgres_dsn,
        "key_encryption_key_file": str(files / "kek"),
        "ca_ttl": 3600,
        "agent_svid_ttl": 3600,
        **upstream,
    }
    a = start_server(files, lag=3300, admin_socket=str(files / "a" / "admin.sock"), **shared)
    b = start_server(files, lag=3300, admin_socket=str(files / "b" / "admin.sock"), **shared)
    loop = LoopThread()
    root_pem = root[0].public_bytes(PEM)
    relay = _RoundRobin([_port(a.runtime.node_address), _port(b.runtime.node_address)])
    try:
        address = loop.run(relay.start())
        assert _server_ca(a, root_pem) == _server_ca(b, root_pem)  # one CA, shared
        with _agent(loop, a, address, root_pem, a.clock) as (syncer, cache, _store):
            agent_id = syncer.agent_id
            entry = a.create_entry("/before", agent_id)
            wait_for(lambda: entry.id in cache.entries(), 20, "an entry before the rotation")
            wait_until(lambda: agent_id in b.server.state.agents, 5, "B to learn the agent")

            # The rotation through A; A renews its server SVID first, B not yet (its half life
            # is later): A presents the new CA's certificate, B the old one's.
            slot = a.server.ca.key_slots("x509")[0]
            for when in (prepare_at, activate_at):
                a.clock.set(when(slot.not_before, slot.not_after) + 1)
                a.call(asyncio.to_thread(a.server.rotator.tick))
            a.call(asyncio.to_thread(a.server.tls.renew))
            assert _server_ca(a, root_pem) != _server_ca(b, root_pem), "no mixed window"

            loop.call(relay.cut)  # its next connections land on A and B in turn
            after = a.create_entry("/after", agent_id)
            wait_for(lambda: after.id in cache.entries(), 20, "an entry after the rotation")
            assert NOT_OURS not in caplog.text, "its own trust domain's server taken for another"
    finally:
        loop.run(relay.close())
        loop.stop()
        b.stop()
        a.stop()
        shutil.rmtree(files, ignore_errors=True)
