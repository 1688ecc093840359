"""A real agent back from a downtime in which its trust domain's CA was replaced outright: its
saved bundle no longer verifies the server, and the operator's new join token and current
--trust-bundle get it attested again, without deleting anything by hand, whether its saved SVID
expired meanwhile or not. Without a bundle from the operator it trusts nothing it cannot verify;
a server merely out of reach never costs it its saved SVID, nor does an attestation with the
given bundle that fails for any reason but that bundle (a stray server answered first)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization

from svid._clock import SystemClock
from svid._der import certs_to_pem, parse_der_certs
from tests.agent_attestor.pki import LocalCa
from tests.e2e.agent_process import (
    FAST_RETRIES,
    RETRY_ROUNDS,
    AgentProcess,
    agent_ids,
    agent_stack,
    create_entry,
    new_token,
)
from tests.e2e.conftest import (
    TRUST_DOMAIN,
    ServerProcess,
    make_restartable_server,
    make_server,
    short_tmpdir,
    wait_for,
)

pytestmark = pytest.mark.e2e
# The agent's error when nothing it trusts verifies the server.
UNVERIFIED = "no trust bundle this agent has verifies the server"


@dataclass
class Downtime:
    agent: AgentProcess  # stopped, its saved bundle the old CA's
    old_bundle: bytes
    new_server: ServerProcess  # a new CA: none of the old one's roots


@contextmanager
def ca_replaced_while_away(*, svid_expired: bool) -> Iterator[Downtime]:
    root, new_root = short_tmpdir(), short_tmpdir()
    with agent_stack(root, make_server(root).start(), flags=FAST_RETRIES) as agent:
        agent.agent_id()
        bundle = agent.data_dir / "bundle.der"
        wait_for(bundle.exists, 30, "the agent's saved bundle")
        assert agent.stop() == 0
        agent.server.stop()
        new_server = make_server(new_root).start()
        try:
            if svid_expired:
                # Long enough away that its SVID expired: the agent attests again.
                for name in ("agent_svid.der", "agent_key.der"):
                    (agent.data_dir / name).unlink()
            agent.server = new_server
            agent.join_token = new_token(new_server)
            (agent.root / "bundle.pem").unlink()  # bundle_file() writes the new server's
            yield Downtime(agent, bundle.read_bytes(), new_server)
        finally:
            agent.stop()
            new_server.stop()
            shutil.rmtree(new_root, ignore_errors=True)


@pytest.fixture
def downtime() -> Iterator[Downtime]:
    with ca_replaced_while_away(svid_expired=True) as away:
        yield away


@pytest.fixture
def short_downtime() -> Iterator[Downtime]:
    """Back before its saved SVID expired: an SVID the new CA never issued."""
    with ca_replaced_while_away(svid_expired=False) as away:
        yield away


def test_a_new_join_token_and_the_given_bundle_attest_past_a_stale_saved_bundle(
    downtime: Downtime,
) -> None:
    agent = downtime.agent
    agent.start()
    # It attested: the join token is spent on the new server, the saved bundle is its CA's.
    agent.agent_id(timeout=20)
    saved = agent.data_dir / "bundle.der"
    wait_for(lambda: saved.read_bytes() != downtime.old_bundle, 20, "the new bundle saved")
    assert "does not verify the server" in agent.logs()


def test_without_a_given_bundle_a_stale_saved_bundle_is_not_bypassed(
    downtime: Downtime,
) -> None:
    agent = downtime.agent
    agent.use_trust_bundle = False
    agent.start()
    wait_for(lambda: UNVERIFIED in agent.logs(), 20, "a refused attestation")
    token_id = agent.join_token.split(".")[0]
    assert not any(token_id in a for a in agent_ids(downtime.new_server))
    assert (agent.data_dir / "bundle.der").read_bytes() == downtime.old_bundle


def test_a_saved_svid_still_valid_gives_way_to_the_given_bundle_and_a_new_join_token(
    short_downtime: Downtime,
) -> None:
    agent = short_downtime.agent
    saved_svid = (agent.data_dir / "agent_svid.der").read_bytes()
    agent.start()
    # The saved SVID came from a CA the server no longer has: the agent attests again with the
    # operator's bundle and token, and serves workloads under its new ID.
    agent_id = agent.agent_id(timeout=30)
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/after-ca-replaced"
    create_entry(short_downtime.new_server, spiffe_id, agent_id)
    agent.wait_svid(spiffe_id)
    # The new SVID and bundle replaced the saved ones, for the next start.
    assert (agent.data_dir / "agent_svid.der").read_bytes() != saved_svid
    assert (agent.data_dir / "bundle.der").read_bytes() != short_downtime.old_bundle


def test_an_svid_the_disk_refuses_after_the_set_aside_is_served_not_traded_for_the_saved_one(
    short_downtime: Downtime,
) -> None:
    """The new SVID and bundle cannot be saved (a full disk): dropped, the agent went back to its
    saved SVID, which the saved bundle cannot verify the server for, set it aside again and
    attested with the join token it had spent, round and round, serving nothing."""
    agent = short_downtime.agent
    saved = agent.data_dir / "agent_svid.der"
    old_svid = saved.read_bytes()
    blocker = agent.data_dir / "agent_key.der.next"  # the new key's first write fails there
    blocker.mkdir()
    (blocker / "in-the-way").write_text("")
    agent.start()
    agent_id = agent.agent_id(timeout=30)
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/unsaved-agent-svid"
    create_entry(short_downtime.new_server, spiffe_id, agent_id)
    agent.wait_svid(spiffe_id)  # served under the new ID, from memory
    logs = agent.logs()
    assert logs.count("cannot save the attested agent SVID") == 1, logs[-4000:]
    assert "the join token cannot attest this agent" not in logs
    assert saved.read_bytes() == old_svid
    shutil.rmtree(blocker)  # the disk mended: saved at the next retry
    wait_for(lambda: saved.read_bytes() != old_svid, 30, "the new agent SVID saved")


def test_without_a_given_bundle_a_saved_svid_still_valid_is_kept_and_one_error_says_why(
    short_downtime: Downtime,
) -> None:
    agent = short_downtime.agent
    agent.use_trust_bundle = False
    saved_svid = (agent.data_dir / "agent_svid.der").read_bytes()
    agent.start()
    wait_for(lambda: UNVERIFIED in agent.logs(), 20, "the error naming what to do")
    time.sleep(RETRY_ROUNDS)  # several more attempts fail the same way
    logs = agent.logs()
    assert logs.count(UNVERIFIED) == 1, logs[-4000:]
    assert "--trust-bundle FILE" in logs
    token_id = agent.join_token.split(".")[0]
    assert not any(token_id in a for a in agent_ids(short_downtime.new_server))
    assert (agent.data_dir / "bundle.der").read_bytes() == short_downtime.old_bundle
    assert (agent.data_dir / "agent_svid.der").read_bytes() == saved_svid


def test_a_server_out_of_reach_costs_the_agent_nothing_of_its_saved_svid() -> None:
    root = short_tmpdir()
    server = make_restartable_server(root).start()
    with agent_stack(root, server, flags=FAST_RETRIES) as agent:
        old_id = agent.agent_id()
        assert agent.stop() == 0
        # A new token and a given bundle unlike the saved one: all a fallback would need.
        agent.join_token = new_token(server)
        other_ca = LocalCa(SystemClock()).cert.public_bytes(serialization.Encoding.PEM)
        agent.bundle_file().write_bytes(agent.bundle_file().read_bytes() + other_ca)
        server.stop()
        agent.start()
        wait_for(
            lambda: "lost the server" in agent.logs() or "cannot reach" in agent.logs(),
            20,
            "a failed connection",
        )
        time.sleep(RETRY_ROUNDS)  # a few more
        server.start()
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/after-an-outage"
        create_entry(server, spiffe_id, old_id)
        agent.wait_svid(spiffe_id)
        token_id = agent.join_token.split(".")[0]
        assert not any(token_id in a for a in agent_ids(server))


def test_a_given_bundle_that_verifies_no_more_than_the_saved_one_costs_nothing(
    short_downtime: Downtime,
) -> None:
    agent = short_downtime.agent
    # The old CA's roots again, unlike the saved bundle only in bytes: no stand-in at all.
    old_roots = certs_to_pem(parse_der_certs(short_downtime.old_bundle))
    other_ca = LocalCa(SystemClock()).cert.public_bytes(serialization.Encoding.PEM)
    (agent.root / "bundle.pem").write_bytes(old_roots + other_ca)
    saved_svid = (agent.data_dir / "agent_svid.der").read_bytes()
    agent.start()
    wait_for(lambda: UNVERIFIED in agent.logs(), 20, "the error naming what to do")
    time.sleep(RETRY_ROUNDS)  # the saved SVID and the given bundle tried again, and again
    logs = agent.logs()
    assert logs.count("setting the saved agent SVID aside") == 1, logs[-4000:]
    assert logs.count(UNVERIFIED) == 1, logs[-4000:]
    token_id = agent.join_token.split(".")[0]
    assert not any(token_id in a for a in agent_ids(short_downtime.new_server))
    assert (agent.data_dir / "agent_svid.der").read_bytes() == saved_svid
    assert (agent.data_dir / "bundle.der").read_bytes() == short_downtime.old_bundle


@contextmanager
def stray_in_place_of(server: ServerProcess, *, attest: bool) -> Iterator[ServerProcess]:
    """Another server of the trust domain, with a CA of its own, at `server`'s node address
    (and at its Attest address if `attest`) while `server` is down: a DNS name or a load
    balancer pointing at the wrong installation for a while."""
    root = short_tmpdir()
    rt = server.runtime
    stray = make_server(
        root,
        bind_address=rt["node_address"],
        attest_bind_address=rt["attest_address"] if attest else "127.0.0.1:0",
    ).start()
    try:
        yield stray
    finally:
        stray.stop()
        shutil.rmtree(root, ignore_errors=True)


def _set_aside_then(agent: AgentProcess, server: ServerProcess, *, attest: bool) -> None:
    """Start `agent` (stopped, its saved SVID valid) while a stray server stands in for
    `server`, until it has set its saved SVID aside and its attestation failed; then bring
    `server` back."""
    server.stop()
    with stray_in_place_of(server, attest=attest) as stray:
        # The operator's bundle trusts both installations: unlike the saved one in bytes, and
        # a stand-in the agent attests with once the saved bundle fails on the stray.
        stray_roots = stray.bundle_pem().encode()
        agent.bundle_file().write_bytes(agent.bundle_file().read_bytes() + stray_roots)
        agent.start()
        wait_for(lambda: "setting the saved agent SVID aside" in agent.logs(), 30, "a set-aside")
        time.sleep(RETRY_ROUNDS)  # its attestation (at once) and a few more fail on the stray
    # Longer than a backoff (FAST_RETRIES): an attestation that followed a set-aside on the
    # stray has failed by now, and what follows tries only the saved SVID.
    time.sleep(RETRY_ROUNDS)
    server.start()


@pytest.mark.parametrize(
    "attest",
    [
        pytest.param(True, id="the stray refuses the spent join token"),
        pytest.param(False, id="the stray has no Attest listener: unreachable"),
    ],
)
def test_an_attestation_failing_after_the_set_aside_gives_the_saved_svid_back(
    attest: bool,
) -> None:
    root = short_tmpdir()
    server = make_restartable_server(root).start()
    with agent_stack(root, server, flags=FAST_RETRIES) as agent:
        old_id = agent.agent_id()
        wait_for((agent.data_dir / "bundle.der").exists, 30, "the agent's saved bundle")
        assert agent.stop() == 0
        saved_svid = (agent.data_dir / "agent_svid.der").read_bytes()
        saved_bundle = (agent.data_dir / "bundle.der").read_bytes()
        if not attest:
            # A fresh token the real server would take: spending it would trade the agent's
            # ID (and the entries parented to it) for a new one it did not need.
            agent.join_token = new_token(server)
        _set_aside_then(agent, server, attest=attest)
        # The real server is back: the saved SVID, checked against the saved bundle, serves
        # again under the agent's old ID; the join token is not spent on a new one.
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/after-a-stray-server"
        create_entry(server, spiffe_id, old_id)
        agent.wait_svid(spiffe_id)
        assert agent_ids(server) == [old_id]
        assert (agent.data_dir / "agent_svid.der").read_bytes() == saved_svid
        assert (agent.data_dir / "bundle.der").read_bytes() == saved_bundle


def test_a_stray_server_met_after_the_join_token_was_spent_costs_the_running_agent_nothing() -> (
    None
):
    # The agent attested in this run: its join token is spent, so the set-aside can attest
    # with nothing. That refusal, too, gives the saved SVID back.
    root = short_tmpdir()
    server = make_restartable_server(root).start()
    with agent_stack(root, server, start=False, flags=FAST_RETRIES) as agent:
        other_ca = LocalCa(SystemClock()).cert.public_bytes(serialization.Encoding.PEM)
        agent.bundle_file().write_bytes(agent.bundle_file().read_bytes() + other_ca)
        agent.start()
        agent_id = agent.agent_id()
        server.stop()
        with stray_in_place_of(server, attest=True):
            wait_for(
                lambda: "setting the saved agent SVID aside" in agent.logs(), 30, "a set-aside"
            )
            time.sleep(RETRY_ROUNDS)  # a few more rounds on the stray
        time.sleep(RETRY_ROUNDS)  # longer than a backoff: see _set_aside_then
        server.start()
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/after-a-stray-server-met-running"
        create_entry(server, spiffe_id, agent_id)
        agent.wait_svid(spiffe_id)
