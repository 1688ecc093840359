"""The agent's long-lived mTLS channel (Sync, agent SVID renewals, minting) reaches its own trust
domain's server only, as its attestation does (test_server_identity): under an upstream root the
bundle is that root alone, and another trust domain's server chains to it with the same DNS name.
A real agent (Syncer) against real servers under one corporate root, its server address a relay
that a DNS answer or a balancer may point elsewhere after the agent attested."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentStore
from agent_attestor.cache import Cache
from agent_attestor.server_identity import expected_server_id, server_anchors
from agent_attestor.servers import Target
from agent_attestor.sync import Syncer, SyncSettings
from server.ca.rotation import activate_at, prepare_at
from server.ca.server_svid import server_svid
from svid._clock import Clock, SystemClock
from svid._proto import common_pb2, node_pb2, node_pb2_grpc
from tests.agent_attestor.harness import LoopThread
from tests.server.fixtures import (
    PEM,
    TRUST_DOMAIN,
    RunningServer,
    bundle_pem,
    short_tmpdir,
    start_server,
)
from tests.server.shared_root import corporate_ca, two_trust_domains, upstream_intermediate
from tests.waits import wait_for

# What the agent says when the server at its address is another trust domain's.
NOT_OURS = "is not its trust domain's server"


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class _Relay:
    """The agent's server address: each new connection goes to the backend `port` names now
    (a DNS answer, a balancer), and cut() ends those open, as a network change does."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._open: set[asyncio.StreamWriter] = set()
        self._serving: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        ends = {writer, up_writer}
        self._open |= ends
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._open -= ends

    def cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._serving):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Foreign(node_pb2_grpc.NodeServicer):
    """Another trust domain's server (its own certificate, by its own CA under the shared root)
    that serves whichever agent reaches it what it likes: its entries, its bundle."""

    def __init__(self, entry: common_pb2.Entry, bundle: common_pb2.Bundle) -> None:
        self.entry, self.bundle = entry, bundle
        self.heard: list[str] = []

    async def Sync(  # type: ignore[override]
        self, request: node_pb2.SyncRequest, context: Any
    ) -> AsyncIterator[node_pb2.SyncUpdate]:
        self.heard.append("Sync")
        yield node_pb2.SyncUpdate(entries=[self.entry], bundle=self.bundle, revision=1, epoch="x")
        await asyncio.sleep(3600)

    async def RenewAgent(  # type: ignore[override]
        self, request: node_pb2.RenewAgentRequest, context: Any
    ) -> node_pb2.RenewAgentResponse:
        self.heard.append("RenewAgent")
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        raise AssertionError("unreachable")


async def _serve_foreign(
    servicer: _Foreign, theirs: RunningServer, root_pem: bytes
) -> tuple[grpc.aio.Server, int]:
    svid = server_svid(theirs.server.ca.x509_signer(), 3600)
    tls = grpc.ssl_server_credentials(
        [(svid.key_pem(), svid.chain_pem())], root_certificates=root_pem, require_client_auth=True
    )
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls)
    await server.start()
    return server, port


@contextlib.contextmanager
def _agent(
    loop: LoopThread, server: RunningServer, address: str, root_pem: bytes, clock: Clock
) -> Iterator[tuple[Syncer, Cache, AgentStore]]:
    """A running agent of example.org, its server at `address`, attested with a join token and
    the shared root as its trust bundle."""
    data = short_tmpdir()
    store = AgentStore(data / "svid.der", data / "key.der", data / "bundle.der")
    cache = Cache()
    settings = SyncSettings(
        (Target(address, server.runtime.attest_address),),
        trust_domain=TRUST_DOMAIN,
        join_token=server.join_token(),
        bootstrap_root_pem=root_pem,
        bootstrap_given=True,
        reconnect_min=0.1,
        reconnect_max=0.3,
    )
    syncer = Syncer(settings, store, cache, clock)
    running = loop.submit(syncer.run())
    try:
        wait_for(lambda: syncer.connected, 30, "the agent's Sync stream")
        yield syncer, cache, store
    finally:
        running.cancel()
        with contextlib.suppress(Exception):
            loop.run(syncer.close())
        shutil.rmtree(data, ignore_errors=True)


def test_an_agent_takes_nothing_from_another_trust_domains_server_met_at_its_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attested to its own server, the agent later meets another trust domain's server at its
    server address (the name now answered with that server's, a balancer misconfigured). Its
    certificate chains to the agent's bundle, the shared root, and carries `svid-server`: the
    agent must check it is its trust domain's server before it takes a Sync update from it, or
    that server feeds it entries (and bundles) of its choosing and issues its workloads'
    SVIDs."""
    caplog.set_level(logging.INFO, logger="agent_attestor")
    loop = LoopThread()
    with two_trust_domains() as shared:
        root_pem = bundle_pem(shared.ours.bundle())
        relay = _Relay(_port(shared.ours.runtime.node_address))
        foreign = _Foreign(
            common_pb2.Entry(
                id="planted",
                spiffe_id=f"spiffe://{TRUST_DOMAIN}/planted",
                parent_id=f"spiffe://{TRUST_DOMAIN}/svid/agent/x",
                selectors=[common_pb2.Selector(type="unix", value="uid:0")],
            ),
            shared.theirs.bundle(),
        )
        address = loop.run(relay.start())
        grpc_server, foreign_port = loop.run(_serve_foreign(foreign, shared.theirs, root_pem))
        try:
            with _agent(loop, shared.ours, address, root_pem, SystemClock()) as (
                syncer,
                cache,
                store,
            ):
                agent_id = syncer.agent_id
                entry = shared.ours.create_entry("/web", agent_id)
                wait_for(lambda: entry.id in cache.entries(), 20, "our entry in the agent's cache")

                # The other trust domain's server answers at the agent's server address now.
                relay.port = foreign_port
                loop.call(relay.cut)
                wait_for(
                    lambda: NOT_OURS in caplog.text or foreign.heard,
                    20,
                    "the agent's next connection",
                )
                time.sleep(1.5)  # reconnect_max 0.3 s: several more attempts meet it
                assert foreign.heard == [], "the agent called another trust domain's server"
                assert set(cache.entries()) == {entry.id}
                assert "planted" not in cache.entries()
                assert syncer.agent_id == agent_id
                assert store.load_svid() is not None
                said = [r for r in caplog.records if NOT_OURS in r.getMessage()]
                assert len(said) == 1, "said once per interval, not at every retry"
                assert "carries spiffe://other.example/svid/server" in said[0].error

                # Its own server back at the address: the agent carries on where it was.
                relay.port = _port(shared.ours.runtime.node_address)
                later = shared.ours.create_entry("/api", agent_id)
                wait_for(lambda: later.id in cache.entries(), 20, "the next entry after it")
                assert foreign.heard == []
        finally:
            loop.run(grpc_server.stop(None))
            loop.run(relay.close())
            loop.stop()


def _server_ca(server: RunningServer, root_pem: bytes) -> bytes:
    """The PEM of the CA that signed the certificate the server presents now."""
    expected = expected_server_id(TRUST_DOMAIN, root_pem)

    async def probe() -> bytes:
        return await server_anchors(server.runtime.node_address, root_pem, expected, 5)

    return asyncio.run(probe())


def test_an_agent_follows_its_trust_domains_ca_rotated_under_the_upstream_root(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent's channel trusts its trust domain's CA that signed the server's certificate.
    Under an upstream root a rotation brings a CA the bundle never names (the bundle stays the
    root): once the server presents a certificate of the new CA, the agent's next connection
    must check the server again and trust the new CA, not refuse its own server."""
    caplog.set_level(logging.INFO, logger="agent_attestor")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (corporate_ca("Corporate Root", root_key, None), root_key)
    files, data = short_tmpdir(), short_tmpdir()
    upstream, _ = upstream_intermediate(files, "ours", root)
    # A CA of an hour, its clock far enough behind the wall clock that what it issues at the
    # rotation (5/6 of the CA's life on) is valid by the wall clock already.
    server = start_server(data, lag=3300, ca_ttl=3600, agent_svid_ttl=3600, **upstream)
    loop = LoopThread()
    relay = _Relay(_port(server.runtime.node_address))
    try:
        root_pem = root[0].public_bytes(PEM)
        assert bundle_pem(server.bundle()) == root_pem
        address = loop.run(relay.start())
        first_ca = _server_ca(server, root_pem)
        # The agent reads the server's clock, as if they ran in step.
        with _agent(loop, server, address, root_pem, server.clock) as (syncer, cache, _store):
            agent_id = syncer.agent_id
            entry = server.create_entry("/before", agent_id)
            wait_for(lambda: entry.id in cache.entries(), 20, "an entry before the rotation")

            slot = server.server.ca.key_slots("x509")[0]
            for when in (prepare_at, activate_at):
                server.clock.set(when(slot.not_before, slot.not_after) + 1)
                server.call(asyncio.to_thread(server.server.rotator.tick))
            server.call(asyncio.to_thread(server.server.tls.renew))
            assert _server_ca(server, root_pem) != first_ca, "the CA did not rotate"
            assert bundle_pem(server.bundle()) == root_pem  # the bundle does not tell

            loop.call(relay.cut)  # its next connection meets the new CA's certificate
            after = server.create_entry("/after", agent_id)
            wait_for(lambda: after.id in cache.entries(), 30, "an entry after the rotation")
            assert syncer.agent_id == agent_id
            assert NOT_OURS not in caplog.text
            assert "no trust bundle this agent has verifies" not in caplog.text
    finally:
        loop.run(relay.close())
        loop.stop()
        server.stop()
        shutil.rmtree(files, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
