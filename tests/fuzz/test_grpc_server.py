"""Fuzz targets: protobuf request fields at the server's node, admin and task APIs.

Real request messages with hypothesis-chosen field values go to one real in-process server over
its real sockets (tests/server/fixtures.py). Property: every answer is OK or a deliberate status
(INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...), never INTERNAL or UNKNOWN (an unhandled
exception) nor DEADLINE_EXCEEDED (a hang); per-item errors of batch replies likewise; and the
server keeps serving.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from server.ca.errors import CsrError
from server.ca.signer import verify_csr
from svid._proto import admin_pb2, common_pb2, node_pb2, task_pb2, task_pb2_grpc
from tests.fuzz._mutate import mutated_bytes
from tests.fuzz._profile import fuzz_settings
from tests.fuzz.test_csr import CSRS
from tests.fuzz.test_x509_der import CHAINS
from tests.server.fixtures import (
    TLS_NAME,
    TRUST_DOMAIN,
    Agent,
    RunningServer,
    der_chain,
    make_csr,
    managed_server,
    short_tmpdir,
)
from tests.svid.certs import make_ca, make_leaf

TD = f"spiffe://{TRUST_DOMAIN}"
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
TIMEOUT = 20

# Protobuf strings are UTF-8: no lone surrogates.
_CHARS = st.characters(exclude_categories=["Cs"])


def _ids(extra: list[str]) -> st.SearchStrategy[str]:
    seeds = [TD, f"{TD}/w", f"{TD}/svid/server", f"{TD}/a/b", "spiffe://other.org/w", *extra]
    return st.one_of(
        st.sampled_from([*seeds, "", f"{TD}/", f"{TD}/../x", "SPIFFE://example.org/w"]),
        st.sampled_from(seeds).flatmap(lambda s: st.text(_CHARS, max_size=6).map(s.__add__)),
        st.text(_CHARS, max_size=20),
    )


texts = st.one_of(
    st.text(_CHARS, max_size=20), st.sampled_from(["", "a", "unix", "uid:0", "x" * 3000])
)
int32s = st.one_of(
    st.sampled_from([0, 1, -1, 60, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
)
int64s = st.one_of(
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 2**40]), st.integers(-(2**63), 2**63 - 1)
)
csrs = st.one_of(st.sampled_from(CSRS), mutated_bytes(CSRS), st.binary(max_size=40))


class World:
    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.admin = server.admin()
        self.agent: Agent = server.attest()
        self.node = server.node_stub(self.agent)
        self.attest = server.attest_stub()
        channel = server._keep(grpc.insecure_channel(f"unix:{server.runtime.admin_socket}"))
        self.task_admin = task_pb2_grpc.TaskAdminStub(channel)
        node_channel = server._keep(
            grpc.secure_channel(server.runtime.node_address, self.agent.credentials(), TLS_NAME)
        )
        self.node_tasks = task_pb2_grpc.NodeTasksStub(node_channel)
        # The signing targets use entry_id; the admin targets update (or delete) the spare only.
        self.entry_id = server.create_entry("/w", self.agent.spiffe_id).id
        self.spare_id = server.create_entry("/spare", self.agent.spiffe_id).id

    def ids(self) -> st.SearchStrategy[str]:
        return _ids([self.agent.spiffe_id])

    def alive(self) -> None:
        self.admin.GetBundle(admin_pb2.GetBundleRequest(), timeout=TIMEOUT)


def _node_pki() -> tuple[bytes, list[bytes]]:
    """(CA PEM, node chains) for x509pop attestation, valid at the real time."""
    now = time.time()
    ca = make_ca("node-ca", spiffe_id=None, not_before=now - 3600, not_after=now + 86400)
    node = make_leaf(ca, uris=[], subject="node-1", eku=None, not_before=now - 60,
                     not_after=now + 7200)  # fmt: skip
    der = [c.public_bytes(serialization.Encoding.DER) for c in (node.cert, ca.cert)]
    return ca.cert.public_bytes(serialization.Encoding.PEM), [der[0], der[0] + der[1]]


NODE_CA_PEM, NODE_CHAINS = _node_pki()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = short_tmpdir()
    ca_file = root / "node-ca.pem"
    ca_file.write_bytes(NODE_CA_PEM)
    try:
        # No rate limits: the fuzzer calls faster than any agent would. A short attestation
        # timeout: a request stream that stops before the challenge answer waits for it.
        with managed_server(
            x509_rate_per_agent=0,
            jwt_rate_per_agent=0,
            attest_rate_per_host=0,
            x509pop_ca_bundle=str(ca_file),
            attest_timeout=0.5,
        ) as server:
            yield World(server)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def _check(world: World, call: Callable[[], Any]) -> Any:
    code, reply = _code(call)
    assert code not in BAD, (code, reply)
    world.alive()
    return reply


def _entries(world: World) -> st.SearchStrategy[common_pb2.Entry]:
    selectors = st.lists(
        st.builds(
            common_pb2.Selector, type=st.sampled_from(["unix", "k8s", ""]) | texts, value=texts
        ),
        max_size=3,
    )
    return st.builds(
        common_pb2.Entry,
        id=st.sampled_from(["", world.spare_id, "e1", "A-z_9"])
        | st.text("abcXYZ019_-", max_size=70)
        | texts,
        spiffe_id=world.ids(),
        parent_id=st.sampled_from([world.agent.spiffe_id]) | world.ids(),
        selectors=selectors,
        x509_svid_ttl=int32s,
        jwt_svid_ttl=int32s,
        dns_names=st.lists(
            st.sampled_from(["a.example", "-x", "a..b", "svid-server"]) | texts, max_size=3
        ),
        hint=texts,
        admin=st.booleans(),
        expires_at=int64s,
        revision=int64s,
        created_at=int64s,
    )


@fuzz_settings(scale=0.5)
@given(st.data())
def test_admin_entries(world: World, data: st.DataObject) -> None:
    entry = data.draw(_entries(world))
    stub = world.admin
    which = data.draw(st.sampled_from(["create", "update", "get", "delete", "list"]))
    if which == "create":
        _check(
            world,
            lambda: stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=TIMEOUT),
        )
    elif which == "update":
        _check(
            world,
            lambda: stub.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=entry), timeout=TIMEOUT),
        )
    elif which == "get":
        _check(
            world, lambda: stub.GetEntry(admin_pb2.GetEntryRequest(id=entry.id), timeout=TIMEOUT)
        )
    elif which == "delete":
        _check(
            world,
            lambda: stub.DeleteEntry(admin_pb2.DeleteEntryRequest(id=entry.id), timeout=TIMEOUT),
        )
    else:
        request = admin_pb2.ListEntriesRequest(spiffe_id=entry.spiffe_id, parent_id=entry.parent_id)
        _check(world, lambda: stub.ListEntries(request, timeout=TIMEOUT))


@fuzz_settings(scale=0.5)
@given(st.data())
def test_admin_agents_tokens_and_tasks(world: World, data: st.DataObject) -> None:
    stub = world.admin
    sid = data.draw(world.ids().filter(lambda s: s != world.agent.spiffe_id))
    text = data.draw(texts)
    which = data.draw(st.sampled_from(["token", "get", "evict", "ban", "tasks", "show", "revoke"]))
    if which == "token":
        request = admin_pb2.CreateJoinTokenRequest(ttl=data.draw(int32s), agent_id=text)
        _check(world, lambda: stub.CreateJoinToken(request, timeout=TIMEOUT))
    elif which == "get":
        _check(
            world, lambda: stub.GetAgent(admin_pb2.GetAgentRequest(spiffe_id=sid), timeout=TIMEOUT)
        )
    elif which == "evict":
        _check(
            world,
            lambda: stub.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=sid), timeout=TIMEOUT),
        )
    elif which == "ban":
        _check(
            world, lambda: stub.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=sid), timeout=TIMEOUT)
        )
    elif which == "tasks":
        request = task_pb2.AdminListTasksRequest(agent_id=sid, state=text)
        _check(world, lambda: world.task_admin.ListTasks(request, timeout=TIMEOUT))
    elif which == "show":
        request = task_pb2.AdminTaskRequest(task_id=text)
        _check(world, lambda: world.task_admin.ShowTask(request, timeout=TIMEOUT))
    else:
        request = task_pb2.AdminTaskRequest(task_id=text, reason=data.draw(texts))
        _check(world, lambda: world.task_admin.RevokeTask(request, timeout=TIMEOUT))


@fuzz_settings(scale=0.5)
@given(
    st.sampled_from(["join_token", "x509pop", "x509pop", "", "tpm"]) | texts,
    st.one_of(
        st.sampled_from(NODE_CHAINS),
        mutated_bytes(NODE_CHAINS),
        mutated_bytes(CHAINS),
        st.binary(max_size=40),
        st.text(_CHARS, max_size=40).map(str.encode),
    ),
    st.sampled_from(CSRS[:3]) | csrs,  # a CSR that passes, so the payload is read
    st.sampled_from(["params", "params", "params+answer", "answer", "empty", "none"]),
    st.binary(max_size=80),
)
def test_node_attest(  # noqa: PLR0917 - one argument per drawn field
    world: World, kind: str, payload: bytes, csr: bytes, shape: str, answer: bytes
) -> None:
    params = node_pb2.AttestRequest(
        params=node_pb2.AttestParams(
            data=node_pb2.AttestationData(type=kind, payload=payload), csr=csr
        )
    )
    requests = {
        "params": [params],
        "params+answer": [params, node_pb2.AttestRequest(challenge_response=answer)],
        "answer": [node_pb2.AttestRequest(challenge_response=answer)],
        "empty": [node_pb2.AttestRequest()],
        "none": [],
    }[shape]
    _check(world, lambda: list(world.attest.Attest(iter(requests), timeout=TIMEOUT)))


def _item_codes(results: Any) -> set[int]:
    return {r.error.code for r in results if r.HasField("error")}


_BAD_ITEM_CODES = {c.value[0] for c in BAD}


@fuzz_settings(scale=0.5)
@given(st.data())
def test_node_signing(world: World, data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["x509", "jwt", "jwts", "renew"]))
    entry_ids = st.sampled_from([world.entry_id, ""]) | texts
    audiences = st.lists(st.sampled_from(["svc", ""]) | texts, max_size=4)
    if which == "x509":
        params = data.draw(
            st.lists(st.builds(node_pb2.X509SVIDParams, entry_id=entry_ids, csr=csrs), max_size=4)
        )
        request = node_pb2.BatchNewX509SVIDRequest(params=params)
        reply = _check(world, lambda: world.node.BatchNewX509SVID(request, timeout=TIMEOUT))
        if not isinstance(reply, str):
            assert not _item_codes(reply.results) & _BAD_ITEM_CODES, reply
    elif which in ("jwt", "jwts"):
        requests = data.draw(
            st.lists(
                st.builds(
                    node_pb2.NewJWTSVIDRequest,
                    spiffe_id=world.ids(),
                    audience=audiences,
                    entry_id=entry_ids,
                ),
                min_size=1,
                max_size=3,
            )
        )
        if which == "jwt":
            _check(world, lambda: world.node.NewJWTSVID(requests[0], timeout=TIMEOUT))
        else:
            batch = node_pb2.BatchNewJWTSVIDRequest(requests=requests)
            reply = _check(world, lambda: world.node.BatchNewJWTSVID(batch, timeout=TIMEOUT))
            if not isinstance(reply, str):
                assert not _item_codes(reply.results) & _BAD_ITEM_CODES, reply
    else:
        # Renewal with a broken CSR only: one that passes (a mutation can leave a CSR valid)
        # would replace the agent's SVID and lock the other targets out.
        csr = data.draw(mutated_bytes(CSRS) | st.binary(max_size=40))
        with contextlib.suppress(CsrError):
            verify_csr(csr)
            return
        _check(
            world,
            lambda: world.node.RenewAgent(node_pb2.RenewAgentRequest(csr=csr), timeout=TIMEOUT),
        )


@fuzz_settings(scale=0.5)
@given(st.data())
def test_node_tasks(world: World, data: st.DataObject) -> None:
    stub = world.node_tasks
    which = data.draw(st.sampled_from(["begin", "end", "list", "report"]))
    runtime_ids = st.lists(world.ids(), max_size=3)
    if which == "begin":
        intent = data.draw(
            st.builds(
                task_pb2.Intent,
                actions=st.lists(
                    st.sampled_from(["read", "write", "export_data"]) | texts, max_size=3
                ),
                resources=st.lists(st.sampled_from(["docs", "svc"]) | texts, max_size=3),
                classification=st.sampled_from(["", "public", "restricted"]) | texts,
                environment=texts,
                on_behalf_of=texts,
                goal=texts,
            )
        )
        request = task_pb2.NodeBeginTaskRequest(
            runtime_id=data.draw(world.ids()),
            intent=intent,
            ttl=data.draw(int32s),
            parent_task_id=data.draw(texts),
            goal_sha256=data.draw(st.sampled_from(["", "00" * 32]) | texts),
        )
        _check(world, lambda: stub.BeginTask(request, timeout=TIMEOUT))
    elif which == "end":
        request = task_pb2.NodeEndTaskRequest(
            task_id=data.draw(texts), runtime_ids=data.draw(runtime_ids), reason=data.draw(texts)
        )
        _check(world, lambda: stub.EndTask(request, timeout=TIMEOUT))
    elif which == "list":
        request = task_pb2.NodeListTasksRequest(runtime_ids=data.draw(runtime_ids))
        _check(world, lambda: stub.ListTasks(request, timeout=TIMEOUT))
    else:
        validations = data.draw(
            st.lists(
                st.builds(
                    task_pb2.Validation,
                    subject=world.ids(),
                    audience=st.lists(texts, max_size=2),
                    ok=st.booleans(),
                    reason=texts,
                    jti=texts,
                    txn=texts,
                    at=int64s,
                    caller_id=world.ids(),
                ),
                max_size=3,
            )
        )
        request = task_pb2.ReportValidationsRequest(validations=validations)
        _check(world, lambda: stub.ReportValidations(request, timeout=TIMEOUT))


def test_the_fuzzed_server_still_signs(world: World) -> None:
    entry = world.server.create_entry("/after-fuzzing", world.agent.spiffe_id)
    _, csr = make_csr()
    params = [node_pb2.X509SVIDParams(entry_id=entry.id, csr=csr)]
    request = node_pb2.BatchNewX509SVIDRequest(params=params)
    reply = world.node.BatchNewX509SVID(request, timeout=TIMEOUT)
    assert not reply.results[0].HasField("error"), reply
    assert der_chain(reply.results[0].cert_chain)[0].public_key() is not None
