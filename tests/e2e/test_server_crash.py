"""kill -9 under issuance load: everything acknowledged survives, no serial is reused."""

from __future__ import annotations

import shutil
import threading

import grpc
import pytest

from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc
from tests.e2e.agent_process import create_entry, list_agents, new_token
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.test_server_cli import attest, node_channel
from tests.server.fixtures import der_chain, make_csr

pytestmark = pytest.mark.e2e
TD = f"spiffe://{TRUST_DOMAIN}"
# Acknowledged before the crash, at the least: each kind of write under way, not a fixed
# time of load (the writes in flight when it lands are as many either way).
ENTRIES, AGENTS, SIGNED = 6, 3, 30


def stored_entry_ids(server: ServerProcess) -> set[str]:
    """Every entry the server lists (`svid-server entry show`), page after page: the set-up
    and the checks go through the admin API, the CLI having tests of its own, and each of its
    calls a Python start on a machine the other tests share."""
    ids: set[str] = set()
    request = admin_pb2.ListEntriesRequest(page_size=5000)
    while True:
        reply = server.admin("ListEntries", request)
        ids.update(e.id for e in reply.entries)
        if not reply.next_page_token:
            return ids
        request.page_token = reply.next_page_token


def test_kill9_under_load_loses_nothing_acknowledged() -> None:
    root = short_tmpdir()
    server = make_server(root)
    server.start()
    try:
        pem = server.bundle_pem().encode()
        anchor = attest(server, new_token(server), pem)
        anchor_entry = create_entry(server, f"{TD}/crash/anchor", anchor.spiffe_id, "unix:uid:1")
        entries: list[str] = [anchor_entry]
        agents: list[str] = [anchor.spiffe_id]
        serials: set[int] = {anchor.chain[0].serial_number}
        stop = threading.Event()
        admin_channel = grpc.insecure_channel(f"unix:{server.admin_socket}")
        admin = admin_pb2_grpc.AdminStub(admin_channel)

        def create_entries() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                entry = common_pb2.Entry(
                    spiffe_id=f"{TD}/crash/w{n}",
                    parent_id=anchor.spiffe_id,
                    selectors=[common_pb2.Selector(type="unix", value=f"uid:{n}")],
                )
                try:
                    created = admin.CreateEntry(
                        admin_pb2.CreateEntryRequest(entry=entry), timeout=5
                    )
                except grpc.RpcError:
                    return
                entries.append(created.entry.id)

        def attest_agents() -> None:
            while not stop.is_set():
                try:
                    token = admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=5)
                    agent = attest(server, token.token, pem)
                except grpc.RpcError:
                    return
                agents.append(agent.spiffe_id)
                serials.add(agent.chain[0].serial_number)

        def sign() -> None:
            with node_channel(server, anchor) as channel:
                stub = node_pb2_grpc.NodeStub(channel)
                while not stop.is_set():
                    request = node_pb2.BatchNewX509SVIDRequest(
                        params=[
                            node_pb2.X509SVIDParams(entry_id=anchor_entry, csr=make_csr()[1])
                            for _ in range(10)
                        ]
                    )
                    try:
                        results = stub.BatchNewX509SVID(request, timeout=5).results
                    except grpc.RpcError:
                        return
                    serials.update(der_chain(r.cert_chain)[0].serial_number for r in results)

        workers = [threading.Thread(target=f) for f in (create_entries, attest_agents, sign)]
        for w in workers:
            w.start()
        # Load built up, every kind under way: the crash must land mid-stream.
        wait_for(
            lambda: len(entries) >= ENTRIES and len(agents) >= AGENTS and len(serials) > SIGNED,
            30,
            "entries, agents and SVIDs acknowledged under load",
            interval=0.01,
        )
        server.kill9()
        stop.set()
        for w in workers:
            w.join(10)
        admin_channel.close()
        assert len(entries) >= ENTRIES
        assert len(agents) >= AGENTS

        server.start()
        missing = set(entries) - stored_entry_ids(server)
        assert not missing, f"{len(missing)} acknowledged entries lost"
        stored_agents = {a.spiffe_id for a in list_agents(server)}
        assert set(agents) <= stored_agents

        # The same CA keeps issuing (pre-crash certificates still verify) and serials are fresh.
        new_pem = server.bundle_pem().encode()
        assert pem.strip() in new_pem
        fresh = attest(server, new_token(server), new_pem)
        with node_channel(server, anchor) as channel:
            results = (
                node_pb2_grpc.NodeStub(channel)
                .BatchNewX509SVID(
                    node_pb2.BatchNewX509SVIDRequest(
                        params=[
                            node_pb2.X509SVIDParams(entry_id=anchor_entry, csr=make_csr()[1])
                            for _ in range(20)
                        ]
                    ),
                    timeout=10,
                )
                .results
            )
        after = {der_chain(r.cert_chain)[0].serial_number for r in results}
        after.add(fresh.chain[0].serial_number)
        assert len(after) == 21
        assert not after & serials
        assert server.stop() == 0
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
