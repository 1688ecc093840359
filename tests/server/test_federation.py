"""Federation on real servers: our bundle endpoint over real HTTPS, a foreign bundle fetched,
checked, recorded on the ledger and pushed on the Sync stream; refusals keep the last good."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from server.ca.sealing import KeyEncryptionKey
from server.datastore.records import (
    HTTPS_SPIFFE,
    HTTPS_WEB,
    EventFilter,
    FederationRelationship,
)
from server.federation.errors import FederationError
from server.federation.fetch import (
    MAX_AUTHORITIES,
    MAX_BUNDLE_BYTES,
    check_bundle,
    fetch_bundle,
)
from server.federation.service import BUNDLE_CHANGED, BUNDLE_REFUSED
from svid._bundle import SpiffeBundle
from svid._der import certs_to_pem
from svid._jose import b64url_encode
from svid._jwk import public_key_members
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2
from svid._spiffe_id import TrustDomain
from tests.ports import free_port
from tests.server.fixtures import (
    RunningServer,
    SilentEndpoint,
    managed_server,
    short_tmpdir,
    write_tls_files,
)
from tests.svid.certs import Issued, make_ca, make_leaf, slow_rsa_key
from tests.waits import wait_for

HOME = TrustDomain("example.org")
OTHER = TrustDomain("other.org")


@pytest.fixture
def home() -> Iterator[tuple[RunningServer, int]]:
    """example.org, serving its bundle endpoint (https_spiffe) on a port of its own."""
    port = free_port()
    with managed_server(
        bundle_endpoint_address=f"127.0.0.1:{port}", bundle_endpoint_refresh_hint=7
    ) as server:
        yield server, port


def _relationship(
    port: int, td: str = "example.org", endpoint_id: str = ""
) -> FederationRelationship:
    return FederationRelationship(
        td,
        f"https://127.0.0.1:{port}/",
        HTTPS_SPIFFE,
        endpoint_spiffe_id=endpoint_id or "spiffe://example.org/svid/server",
    )


def _events(server: RunningServer, kind: str) -> list[dict[str, object]]:
    return list(server.server.datastore.audit_rows(EventFilter(kind=kind)))


def test_the_bundle_endpoint_serves_our_bundle_authenticated_by_our_svid(
    home: tuple[RunningServer, int],
) -> None:
    server, port = home
    ours = server.server.state.bundle
    got = fetch_bundle(_relationship(port), ours)
    assert got.x509_authorities == ours.x509_authorities
    assert set(got.jwt_authorities) == set(ours.jwt_authorities)
    assert got.sequence == ours.sequence
    assert got.refresh_hint == 7


def test_an_endpoint_presenting_another_id_or_chain_is_refused(
    home: tuple[RunningServer, int],
) -> None:
    server, port = home
    ours = server.server.state.bundle
    with pytest.raises(FederationError, match=r"presented spiffe://example\.org/svid/server"):
        fetch_bundle(_relationship(port, endpoint_id="spiffe://example.org/other"), ours)
    with managed_server(trust_domain="other.org") as stranger:
        theirs = stranger.server.state.bundle
        with pytest.raises(FederationError, match="not authenticated"):
            fetch_bundle(_relationship(port), SpiffeBundle(HOME, theirs.x509_authorities))
    with pytest.raises(FederationError, match="needs a bundle"):
        fetch_bundle(_relationship(port), None)


def test_a_bundle_of_another_trust_domain_is_refused(home: tuple[RunningServer, int]) -> None:
    server, _ = home
    body = server.server.state.bundle.to_json()
    assert check_bundle(HOME, body).x509_authorities
    with pytest.raises(FederationError, match=r"belongs to spiffe://example\.org"):
        check_bundle(OTHER, body)


def test_a_foreign_jwt_key_with_an_rsa_exponent_near_its_modulus_is_refused() -> None:
    # Each check of any signature naming such a kid would cost ~6 ms (3072 bits): a CPU toll
    # anyone could levy with garbage tokens. SPIRE's Go refuses e > 2**31-1 alike.
    n = slow_rsa_key().public_key().public_numbers().n
    jwk = {"kty": "RSA", "n": _b64uint(n), "e": _b64uint((n - 2) | 1), "kid": "slow"}
    body = json.dumps({"keys": [{**jwk, "use": "jwt-svid"}], "spiffe_sequence": 1}).encode()
    with pytest.raises(FederationError, match=r"kid 'slow'.*2\*\*31-1"):
        check_bundle(OTHER, body)


def _b64uint(value: int) -> str:
    return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def test_a_foreign_bundle_is_fetched_recorded_and_pushed_and_outlives_its_endpoint(
    home: tuple[RunningServer, int],
) -> None:
    server, port = home
    static = f"example.org https_spiffe https://127.0.0.1:{port}/ spiffe://example.org/svid/server"
    with managed_server(trust_domain="other.org", federation_relationships=[static]) as other:
        admin = other.admin()
        listed = admin.ListFederationRelationships(
            admin_pb2.ListFederationRelationshipsRequest(), timeout=10
        ).relationships
        assert [(r.trust_domain, r.static) for r in listed] == [("example.org", True)]
        # Bootstrap: https_spiffe needs the foreign bundle to authenticate the endpoint.
        body = server.server.state.bundle.to_json()
        admin.SetFederatedBundle(
            admin_pb2.SetFederatedBundleRequest(
                bundle=admin_pb2.FederatedBundle(trust_domain="spiffe://example.org", bundle=body)
            ),
            timeout=10,
        )
        agent = other.attest()
        stream = other.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
        first = next(stream)
        # The agent serves no entry federating with example.org: it is not sent that bundle.
        assert dict(first.federated_bundles) == {}
        made = _other_entry(other, agent.spiffe_id, ())
        assert not next(stream).federated_bundles
        # Once an entry of its federates with example.org, the bundle follows on the stream.
        made.federates_with.append("spiffe://example.org")
        admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=made), timeout=10)
        joined = next(stream)
        assert list(joined.entries[0].federates_with) == ["example.org"]
        assert set(joined.federated_bundles) == {"spiffe://example.org"}
        # The home domain rotates: a refresh fetches, records and pushes the new bundle.
        server.clock.advance(43200)
        assert server.call(asyncio.to_thread(server.server.rotator.tick))
        done = admin.RefreshFederatedBundle(
            admin_pb2.RefreshFederatedBundleRequest(trust_domain="example.org"), timeout=30
        )
        # (changed, unless the refresher's own fetch, due at the bootstrap, got there first)
        assert len(SpiffeBundle.parse(HOME, done.bundle.bundle).x509_authorities) == 2
        pushed = next(stream)
        while not pushed.federated_bundles:
            pushed = next(stream)
        assert len(pushed.federated_bundles["spiffe://example.org"].x509_authorities) == 2
        assert pushed.bundle.trust_domain == "other.org"
        changes = _events(other, BUNDLE_CHANGED)
        sources = [json.loads(str(e["extra"]))["source"] for e in changes]
        # Set by hand, then each fetch that changed it (the first also brings the endpoint's
        # refresh hint, which the exported bundle did not carry).
        assert sources[0] == "set"
        assert set(sources[1:]) == {f"https://127.0.0.1:{port}/"}
        # The endpoint goes away: the refresh fails, the last good bundle stays in service.
        federation = server.server.federation
        assert federation is not None
        server.call(federation.stop())
        with pytest.raises(grpc.RpcError) as failed:
            admin.RefreshFederatedBundle(
                admin_pb2.RefreshFederatedBundleRequest(trust_domain="example.org"), timeout=30
            )
        assert failed.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "unreachable" in str(failed.value.details())
        kept = admin.GetFederatedBundle(
            admin_pb2.GetFederatedBundleRequest(trust_domain="example.org"), timeout=10
        )
        assert kept.updated_at == int(other.clock.now())
        assert len(SpiffeBundle.parse(HOME, kept.bundle).x509_authorities) == 2
        assert _events(other, BUNDLE_REFUSED)
        stream.cancel()


def _other_entry(
    server: RunningServer, parent: str, federates_with: tuple[str, ...]
) -> common_pb2.Entry:
    entry = common_pb2.Entry(
        spiffe_id="spiffe://other.org/partner",
        parent_id=parent,
        selectors=[common_pb2.Selector(type="unix", value="uid:1000")],
        federates_with=federates_with,
    )
    return server.admin().CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=10).entry


def test_static_relationships_are_not_changed_through_the_api() -> None:
    static = "example.org https_spiffe https://127.0.0.1:1/ spiffe://example.org/svid/server"
    with managed_server(trust_domain="other.org", federation_relationships=[static]) as other:
        with pytest.raises(grpc.RpcError) as refused:
            other.admin().DeleteFederationRelationship(
                admin_pb2.DeleteFederationRelationshipRequest(trust_domain="example.org"),
                timeout=10,
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_dynamic_relationships_round_trip_and_are_validated() -> None:
    with managed_server(trust_domain="other.org") as other:
        admin = other.admin()
        rel = admin_pb2.FederationRelationship(
            trust_domain="spiffe://example.org",
            bundle_endpoint_url="https://127.0.0.1:1/",
            profile="https_web",
        )
        made = admin.CreateFederationRelationship(
            admin_pb2.CreateFederationRelationshipRequest(relationship=rel), timeout=10
        )
        assert made.trust_domain == "example.org"
        assert not made.static
        for bad, field in (
            ({"profile": "ftp"}, "profile"),
            ({"bundle_endpoint_url": "http://x/"}, "bundle_endpoint_url"),
            ({"bundle_endpoint_url": "https://u:secret@x/"}, "userinfo"),
            ({"trust_domain": "other.org"}, "own trust domain"),
            ({"profile": "https_spiffe", "endpoint_spiffe_id": "nope"}, "endpoint_spiffe_id"),
            # Stored as given, a NUL in ca_file then failed every fetch as an internal error.
            ({"ca_file": "/etc/ca\x00.pem"}, "ca_file: may not contain NUL"),
            ({"bundle_endpoint_url": "https://127.0.0.1\x00:1/"}, "bundle_endpoint_url: may"),
            ({"bundle_endpoint_url": "https://127.0.0.1:1/\n"}, "bundle_endpoint_url: one line"),
            # Read only at the fetch: stored, each failed as an internal error (ValueError).
            ({"bundle_endpoint_url": "https://127.0.0.1:99999/"}, "port not in 1-65535"),
            ({"bundle_endpoint_url": "https://[::1]:https/"}, "port not in 1-65535"),
            ({"bundle_endpoint_url": "https://127.0.0.1:0/"}, "port not in 1-65535"),
        ):
            wrong = admin_pb2.FederationRelationship()
            wrong.CopyFrom(rel)
            for key, value in bad.items():
                setattr(wrong, key, value)
            with pytest.raises(grpc.RpcError) as refused:
                admin.UpdateFederationRelationship(
                    admin_pb2.UpdateFederationRelationshipRequest(relationship=wrong), timeout=10
                )
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert field in str(refused.value.details())
            assert "secret" not in str(refused.value.details())
        # An IPv6 literal and a port, and no port at all, are endpoints like any other.
        for url in ("https://[::1]:8443/bundle", "https://bundle.example.org/"):
            good = admin_pb2.FederationRelationship()
            good.CopyFrom(rel)
            good.bundle_endpoint_url = url
            changed = admin.UpdateFederationRelationship(
                admin_pb2.UpdateFederationRelationshipRequest(relationship=good), timeout=10
            )
            assert changed.bundle_endpoint_url == url
        admin.DeleteFederationRelationship(
            admin_pb2.DeleteFederationRelationshipRequest(trust_domain="example.org"), timeout=10
        )
        with pytest.raises(grpc.RpcError) as gone:
            admin.GetFederationRelationship(
                admin_pb2.GetFederationRelationshipRequest(trust_domain="example.org"), timeout=10
            )
        assert gone.value.code() is grpc.StatusCode.NOT_FOUND


def test_https_web_endpoint_is_checked_by_its_ca_and_a_wrong_trust_domain_refused(
    tmp_path: Path,
) -> None:
    ca_file, cert_file, key_file = write_tls_files(tmp_path)
    port = free_port()
    with managed_server(
        bundle_endpoint_address=f"127.0.0.1:{port}",
        bundle_endpoint_profile="https_web",
        bundle_endpoint_cert=str(cert_file),
        bundle_endpoint_key=str(key_file),
    ) as home:
        url = f"https://127.0.0.1:{port}/"
        rel = FederationRelationship("example.org", url, HTTPS_WEB, ca_file=str(ca_file))
        got = fetch_bundle(rel, None)
        assert got.x509_authorities == home.server.state.bundle.x509_authorities
        with pytest.raises(FederationError, match="not authenticated"):
            fetch_bundle(replace(rel, ca_file=""), None)  # system roots do not know this CA
        # A CA file that cannot be loaded is named so, not the endpoint (it is never asked).
        missing = tmp_path / "missing.pem"
        with pytest.raises(FederationError, match=r"ca_file '.*missing\.pem' cannot be loaded: No"):
            fetch_bundle(replace(rel, ca_file=str(missing)), None)
        with pytest.raises(FederationError, match=r"ca_file '.*key.*' cannot be loaded: NO_CERT"):
            fetch_bundle(replace(rel, ca_file=str(key_file)), None)
        # An endpoint that serves another trust domain's bundle than the relationship names.
        with pytest.raises(FederationError, match=r"belongs to spiffe://example\.org"):
            fetch_bundle(replace(rel, trust_domain="other.org"), None)


def test_a_stored_endpoint_url_with_a_port_past_65535_fails_its_fetch_by_name() -> None:
    """One stored before relationships were checked for it: each fetch raised ValueError, an
    unknown error to `federation refresh` and a traceback at every retry."""
    for url in ("https://127.0.0.1:99999/", "https://127.0.0.1:x/"):
        rel = FederationRelationship("example.org", url, HTTPS_WEB)
        with pytest.raises(FederationError, match="has no valid port"):
            fetch_bundle(rel, None)


def test_a_bootstrapped_relationship_fetches_at_once(home: tuple[RunningServer, int]) -> None:
    server, port = home
    # Exported with the CA's refresh hint: the endpoint's copy announces its own (7 s).
    exported = server.server.state.bundle.to_json()
    assert server.server.state.bundle.refresh_hint != 7
    static = f"example.org https_spiffe https://127.0.0.1:{port}/ spiffe://example.org/svid/server"
    with managed_server(trust_domain="other.org", federation_relationships=[static]) as other:
        other.admin().SetFederatedBundle(
            admin_pb2.SetFederatedBundleRequest(
                bundle=admin_pb2.FederatedBundle(trust_domain="example.org", bundle=exported)
            ),
            timeout=10,
        )

        def fetched() -> bool:
            got = other.admin().GetFederatedBundle(
                admin_pb2.GetFederatedBundleRequest(trust_domain="example.org"), timeout=10
            )
            return SpiffeBundle.parse(HOME, got.bundle).refresh_hint == 7

        wait_for(fetched, 5, "the bootstrap to trigger a fetch")


def test_a_relationship_whose_endpoint_never_answers_does_not_hold_up_another_ones_refresh(
    home: tuple[RunningServer, int],
) -> None:
    # hang.org comes first: fetched one after the other, example.org's fetch waited out
    # hang.org's whole deadline (10 s) on every round, and its asked-for fetch too.
    server, port = home
    silent = SilentEndpoint()
    relationships = [
        f"hang.org https_web {silent.url}",
        f"example.org https_spiffe https://127.0.0.1:{port}/ spiffe://example.org/svid/server",
    ]
    try:
        with managed_server(
            trust_domain="other.org", federation_relationships=relationships
        ) as other:
            assert silent.held.wait(10), "hang.org's endpoint was never fetched"
            exported = server.server.state.bundle.to_json()
            assert server.server.state.bundle.refresh_hint != 7
            other.admin().SetFederatedBundle(
                admin_pb2.SetFederatedBundleRequest(
                    bundle=admin_pb2.FederatedBundle(trust_domain="example.org", bundle=exported)
                ),
                timeout=10,
            )
            asked = time.monotonic()

            def fetched() -> bool:
                got = other.admin().GetFederatedBundle(
                    admin_pb2.GetFederatedBundleRequest(trust_domain="example.org"), timeout=10
                )
                return SpiffeBundle.parse(HOME, got.bundle).refresh_hint == 7

            while not fetched():
                assert time.monotonic() < asked + 4, "example.org waited for hang.org's fetch"
                time.sleep(0.05)
    finally:
        silent.close()


@pytest.mark.parametrize(("floor", "wait"), [({}, 60), ({"federation_min_refresh": 5}, 7)])
def test_the_refresh_hint_of_an_endpoint_is_floored_as_configured(
    home: tuple[RunningServer, int], floor: dict[str, int], wait: int
) -> None:
    # The endpoint announces 7 s: below the default floor (a minute) it is fetched a minute on.
    server, port = home
    static = f"example.org https_spiffe https://127.0.0.1:{port}/ spiffe://example.org/svid/server"
    with managed_server(
        trust_domain="other.org", federation_relationships=[static], **floor
    ) as other:
        service = other.server.federation.service  # type: ignore[union-attr]
        other.admin().SetFederatedBundle(
            admin_pb2.SetFederatedBundleRequest(
                bundle=admin_pb2.FederatedBundle(
                    trust_domain="example.org", bundle=server.server.state.bundle.to_json()
                )
            ),
            timeout=10,
        )
        done = other.admin().RefreshFederatedBundle(
            admin_pb2.RefreshFederatedBundleRequest(trust_domain="example.org"), timeout=30
        )
        assert SpiffeBundle.parse(HOME, done.bundle.bundle).refresh_hint == 7
        due = service.next_fetch("example.org")
        assert due is not None
        assert due == other.clock.now() + wait


@pytest.mark.parametrize("member", ["spiffe_sequence", "spiffe_refresh_hint"])
def test_a_bundle_whose_numbers_outgrow_the_sync_protocol_is_refused(member: str) -> None:
    """The agents are sent a foreign bundle's sequence and refresh hint as int64: a bundle past
    that is refused when set (or fetched), and the agents' Sync goes on."""
    with managed_server() as home, managed_server(trust_domain="other.org") as other:
        doc = json.loads(home.server.state.bundle.to_json())
        doc[member] = 2**63
        with pytest.raises(FederationError, match=member):
            check_bundle(HOME, json.dumps(doc).encode())
        admin = other.admin()
        with pytest.raises(grpc.RpcError) as refused:
            admin.SetFederatedBundle(
                admin_pb2.SetFederatedBundleRequest(
                    bundle=admin_pb2.FederatedBundle(
                        trust_domain="example.org", bundle=json.dumps(doc).encode()
                    )
                ),
                timeout=10,
            )
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert member in str(refused.value.details())
        agent = other.attest()
        _other_entry(other, agent.spiffe_id, ("spiffe://example.org",))
        stream = other.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
        assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
        stream.cancel()


class SvidEndpoint:
    """A bundle endpoint of our own making: presents `leaf` (an X.509-SVID) and answers every
    GET with `body`, until closed."""

    def __init__(self, leaf: Issued, issuer: Issued, body: bytes, *, raw: bool = False) -> None:
        """`raw`: `body` is the whole answer, status line and headers too."""
        tmp = short_tmpdir("fed")
        (tmp / "chain.pem").write_bytes(certs_to_pem([leaf.cert, issuer.cert]))
        (tmp / "key.pem").write_bytes(
            leaf.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp / "chain.pem", tmp / "key.pem")
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}/"
        answer = (
            body
            if raw
            else b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
            % (
                len(body),
                body,
            )
        )

        def serve() -> None:
            while True:
                try:
                    raw, _ = self._listener.accept()
                except OSError:  # closed
                    return
                try:
                    with context.wrap_socket(raw, server_side=True) as conn:
                        conn.recv(65536)
                        conn.sendall(answer)
                except OSError:  # a client that refused us
                    pass

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        # Closing alone does not wake the accept() blocked in the thread; a shutdown does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(10)


def _now_ca(name: str) -> Issued:
    return make_ca(name, not_before=time.time() - 60, not_after=time.time() + 3600)


def _now_leaf(issuer: Issued, spiffe_id: str) -> Issued:
    now = time.time()
    return make_leaf(issuer, uris=[spiffe_id], not_before=now - 60, not_after=now + 3600)


def _fetch_refused(answer: bytes, match: str, *, raw: bool = False) -> None:
    """Fetches example.org's bundle from an endpoint of hub.org answering `answer` (the body,
    or with `raw` the whole HTTP response): the fetch must be refused with `match`."""
    hub = _now_ca("hub.org")
    endpoint_id = "spiffe://hub.org/bundle-server"
    endpoint = SvidEndpoint(_now_leaf(hub, endpoint_id), hub, answer, raw=raw)
    try:
        rel = FederationRelationship(
            "example.org", endpoint.url, HTTPS_SPIFFE, endpoint_spiffe_id=endpoint_id
        )
        with pytest.raises(FederationError, match=match):
            fetch_bundle(rel, SpiffeBundle(TrustDomain("hub.org"), (hub.cert,)), timeout=5)
    finally:
        endpoint.close()


def _set_bundle(admin: admin_pb2_grpc.AdminStub, td: str, *authorities: Issued) -> None:
    bundle = SpiffeBundle(TrustDomain(td), tuple(a.cert for a in authorities), sequence=1)
    admin.SetFederatedBundle(
        admin_pb2.SetFederatedBundleRequest(
            bundle=admin_pb2.FederatedBundle(trust_domain=td, bundle=bundle.to_json())
        ),
        timeout=10,
    )


def test_a_non_self_serving_endpoint_is_authenticated_by_its_own_trust_domains_bundle() -> None:
    """example.org's bundle is served by hub.org's endpoint (SPIFFE Federation 5.2.2.4): the
    endpoint's SVID is checked against hub.org's bundle, whatever example.org's holds."""
    hub, home = _now_ca("hub.org"), _now_ca("example.org")
    endpoint_id = "spiffe://hub.org/bundle-server"
    served = SpiffeBundle(HOME, (home.cert,), sequence=2).to_json()
    genuine = SvidEndpoint(_now_leaf(hub, endpoint_id), hub, served)
    # example.org's CA names an endpoint of hub.org: not hub.org's to trust.
    forged = SvidEndpoint(_now_leaf(home, endpoint_id), home, served)
    try:
        with managed_server(trust_domain="other.org") as other:
            admin = other.admin()
            _set_bundle(admin, "hub.org", hub)

            def relate(url: str) -> None:
                rel = admin_pb2.FederationRelationship(
                    trust_domain="example.org",
                    bundle_endpoint_url=url,
                    profile=HTTPS_SPIFFE,
                    endpoint_spiffe_id=endpoint_id,
                )
                admin.CreateFederationRelationship(
                    admin_pb2.CreateFederationRelationshipRequest(relationship=rel), timeout=10
                )

            def refresh() -> admin_pb2.RefreshFederatedBundleResponse:
                return admin.RefreshFederatedBundle(  # type: ignore[no-any-return]
                    admin_pb2.RefreshFederatedBundleRequest(trust_domain="example.org"),
                    timeout=30,
                )

            relate(genuine.url)
            got = SpiffeBundle.parse(HOME, refresh().bundle.bundle)
            assert got.x509_authorities == (home.cert,)
            admin.DeleteFederationRelationship(
                admin_pb2.DeleteFederationRelationshipRequest(trust_domain="example.org"),
                timeout=10,
            )
            relate(forged.url)
            with pytest.raises(grpc.RpcError) as refused:
                refresh()
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "not authenticated" in str(refused.value.details())
    finally:
        genuine.close()
        forged.close()


# What a hostile endpoint writes where svidd quotes it: a terminal title and a cleared screen
# (ESC sequences), a NUL (PostgreSQL text takes none), a forged line.
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x00\r\nbundle accepted"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_refusal_quoting_the_endpoint_reaches_operator_and_ledger_as_printable_text(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """The status line a hostile endpoint answers is quoted in the refusal: raw, its escape
    sequences reached the operator's terminal (`federation refresh`), the logs and the
    ledger; its NUL made PostgreSQL refuse the ledger row, so the refusal went unrecorded."""
    overrides: dict[str, Any] = {"trust_domain": "other.org"}
    if backend == "postgresql":
        kek = short_tmpdir("fpk") / "kek"
        KeyEncryptionKey.generate().write_new(kek)
        overrides["datastore"] = request.getfixturevalue("postgres_dsn")
        overrides["key_encryption_key_file"] = str(kek)
    hub = _now_ca("hub.org")
    endpoint_id = "spiffe://hub.org/bundle-server"
    hostile = SvidEndpoint(
        _now_leaf(hub, endpoint_id), hub, HOSTILE.encode("latin-1") + b"\r\n\r\n", raw=True
    )
    try:
        with managed_server(**overrides) as other:
            admin = other.admin()
            _set_bundle(admin, "hub.org", hub)
            rel = admin_pb2.FederationRelationship(
                trust_domain="example.org",
                bundle_endpoint_url=hostile.url,
                profile=HTTPS_SPIFFE,
                endpoint_spiffe_id=endpoint_id,
            )
            admin.CreateFederationRelationship(
                admin_pb2.CreateFederationRelationshipRequest(relationship=rel), timeout=10
            )
            with pytest.raises(grpc.RpcError) as refused:
                admin.RefreshFederatedBundle(
                    admin_pb2.RefreshFederatedBundleRequest(trust_domain="example.org"),
                    timeout=30,
                )
            details = str(refused.value.details())
            assert "unreachable" in details
            assert details.isprintable()
            assert "\\x1b]0;owned\\x07" in details  # shown, escaped
            reasons = [str(e["reason"]) for e in _events(other, BUNDLE_REFUSED)]
            assert reasons, "no refusal on the ledger"
            assert all(r.isprintable() for r in reasons)
    finally:
        hostile.close()


def test_a_redirect_to_this_hosts_own_services_is_not_followed() -> None:
    """A bundle endpoint answering 302 to a local service (a metadata address, an admin
    port): refused as the answer it is, the place it names never asked."""
    victim = socket.create_server(("127.0.0.1", 0))
    location = f"http://127.0.0.1:{victim.getsockname()[1]}/latest/meta-data/"
    answer = f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
    try:
        _fetch_refused(answer.encode(), "answered HTTP 302", raw=True)
        victim.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            victim.accept()
    finally:
        victim.close()


def test_an_endpoint_svid_whose_san_does_not_parse_is_a_refusal() -> None:
    """A leaf the endpoint trust domain's CA signed (OpenSSL chains it) whose URI SAN is no
    IA5String: reading its SPIFFE ID raised X509SvidError out of the fetch, an unknown error
    to `federation refresh`, retried every 5 s with a traceback and never put on the ledger."""
    hub = _now_ca("hub.org")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    garbled = x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x86\x01\xff"
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(hub.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(garbled, critical=True)
        .sign(hub.key, hashes.SHA256())
    )
    endpoint = SvidEndpoint(Issued(leaf, key), hub, SpiffeBundle(HOME).to_json())
    try:
        rel = FederationRelationship(
            "example.org", endpoint.url, HTTPS_SPIFFE, endpoint_spiffe_id="spiffe://hub.org/b"
        )
        with pytest.raises(FederationError, match="names do not parse"):
            fetch_bundle(rel, SpiffeBundle(TrustDomain("hub.org"), (hub.cert,)), timeout=5)
    finally:
        endpoint.close()


def test_a_bundle_past_its_size_limit_is_refused_unread() -> None:
    """An endpoint announcing 100 MiB: read up to the limit and a byte, then refused."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 << 20)
    answer = head + b" " * (MAX_BUNDLE_BYTES + 2)
    _fetch_refused(answer, f"larger than {MAX_BUNDLE_BYTES} bytes", raw=True)


def test_a_refused_authority_s_uri_is_quoted_as_printable_text() -> None:
    ca = make_ca("example.org", spiffe_id=f"spiffe://evil.org/{HOSTILE}")
    body = SpiffeBundle(HOME, (ca.cert,)).to_json()
    with pytest.raises(FederationError, match=r"belongs to spiffe://evil\.org") as refused:
        check_bundle(HOME, body)
    assert str(refused.value).isprintable()


@pytest.mark.parametrize(
    ("twice", "member"),
    [
        # Another reader keeping the first value reads an X.509 authority, this one a JWT key.
        (lambda key: key.replace('"use":"x509-svid"', '"use":"jwt-svid","use":"x509-svid"'), "use"),
        (
            lambda doc: doc.replace(
                '"spiffe_sequence":2', '"spiffe_sequence":1,"spiffe_sequence":2'
            ),
            "spiffe_sequence",
        ),
        (lambda doc: doc.replace('{"keys":', '{"keys":[],"keys":'), "keys"),
    ],
)
def test_a_bundle_naming_a_member_twice_is_refused(twice: Any, member: str) -> None:
    """RFC 8259 leaves a member named twice to the reader: Python and Go keep the last,
    others the first. Such a bundle is refused, fetched or set by hand, not read our way."""
    served = twice(
        SpiffeBundle(HOME, (_now_ca("example.org").cert,), sequence=2).to_json().decode()
    )
    assert served.count(f'"{member}"') == 2
    _fetch_refused(served.encode(), f"names '{member}' twice")
    with pytest.raises(FederationError, match=f"names '{member}' twice"):
        check_bundle(HOME, served.encode())


@pytest.mark.parametrize(
    ("spelled", "member"),
    [
        # go-spiffe reads the top level with Go's encoding/json, which matches a member to
        # its field ignoring case and keeps the last: a SPIRE server reads no authorities.
        (lambda doc: doc.replace('{"keys":', '{"keys":[],"KEYS":', 1), "KEYS"),
        (
            lambda doc: doc.replace(
                '"spiffe_sequence":2', '"spiffe_sequence":2,"SPIFFE_Sequence":9'
            ),
            "SPIFFE_Sequence",
        ),
        # The Kelvin sign, which Go folds to k as well.
        (lambda doc: doc.replace('{"keys":', '{"keys":[],"\u212aeys":', 1), "\u212aeys"),
        # An escape spells the very name it decodes to: a plain repeat.
        (
            lambda doc: doc.replace(
                '"use":"x509-svid"', '"use":"jwt-svid","\\u0075se":"x509-svid"'
            ),
            "use",
        ),
    ],
)
def test_a_bundle_naming_a_member_twice_in_another_case_or_spelling_is_refused(
    spelled: Any, member: str
) -> None:
    served = spelled(
        SpiffeBundle(HOME, (_now_ca("example.org").cert,), sequence=2).to_json().decode()
    )
    with pytest.raises(FederationError, match=re.escape(repr(member))):
        check_bundle(HOME, served.encode())


def test_a_bundle_spelling_a_name_with_an_escape_once_is_read() -> None:
    """Valid JSON an honest writer may produce (escaped names, SPIRE's numbers) is no repeat."""
    served = (
        SpiffeBundle(HOME, (_now_ca("example.org").cert,), sequence=2, refresh_hint=300)
        .to_json()
        .decode()
        .replace('"use":', '"\\u0075se":')
        .replace('{"keys":', '{"k\\u0065ys":', 1)
    )
    bundle = check_bundle(HOME, served.encode())
    assert (len(bundle.x509_authorities), bundle.sequence, bundle.refresh_hint) == (1, 2, 300)


def test_a_bundle_of_more_authorities_than_a_trust_domain_rotates_through_is_refused() -> None:
    """A megabyte of CA certificates under one subject name: each of our workloads accepting
    the trust domain tried every one against any chain naming that issuer (a signature check
    each, for whoever connects), and every agent federating with it was sent them all."""
    # make_ca names every one "CA example.org": the same subject.
    cas = tuple(_now_ca("example.org").cert for _ in range(MAX_AUTHORITIES + 1))
    served = SpiffeBundle(HOME, cas, sequence=2).to_json()
    _fetch_refused(served, f"{MAX_AUTHORITIES + 1} X.509 authorities, at most {MAX_AUTHORITIES}")
    assert (
        len(
            check_bundle(HOME, SpiffeBundle(HOME, cas[:MAX_AUTHORITIES]).to_json()).x509_authorities
        )
        == MAX_AUTHORITIES
    )
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwt_keys = {f"k{i}": key for i in range(MAX_AUTHORITIES + 1)}
    with pytest.raises(FederationError, match=f"{MAX_AUTHORITIES + 1} JWT authorities"):
        check_bundle(HOME, SpiffeBundle(HOME, (), jwt_keys).to_json())


def test_a_spire_trust_domain_with_a_short_ca_ttl_is_not_refused_for_its_authorities() -> None:
    """SPIRE makes a CA and a JWT key every half ca_ttl and keeps each in its bundle 24 h past
    expiry: three HA servers at a ca_ttl of 2 h publish 3 * (2 + 48 / 2) = 78 of each, all
    under one subject (ca_subject). An honest bundle, refused when the cap was 64."""
    issued = time.time() - 60
    cas = tuple(
        make_ca("example.org", not_before=issued, not_after=issued + 7200).cert for _ in range(78)
    )
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwt_keys = {f"server{i % 3}-{i}": key for i in range(78)}
    body = SpiffeBundle(HOME, cas, jwt_keys, sequence=1234, refresh_hint=300).to_json()
    bundle = check_bundle(HOME, body)
    assert (len(bundle.x509_authorities), len(bundle.jwt_authorities)) == (78, 78)


def _set_refused(body: bytes) -> grpc.RpcError:
    """Sets `body` as example.org's bundle on a server of other.org; returns its refusal, which
    must be INVALID_ARGUMENT (a bundle it cannot read is the caller's fault, not an unknown
    error)."""
    with (
        managed_server(trust_domain="other.org") as other,
        pytest.raises(grpc.RpcError) as refused,
    ):
        other.admin().SetFederatedBundle(
            admin_pb2.SetFederatedBundleRequest(
                bundle=admin_pb2.FederatedBundle(trust_domain="example.org", bundle=body)
            ),
            timeout=10,
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    return refused.value


def test_a_bundle_whose_authority_has_a_malformed_san_is_refused() -> None:
    """A foreign CA certificate whose SAN does not parse: the bundle is refused as any other
    bad one is (an invalid argument when set), not an internal error."""
    ca = _now_ca("example.org")
    garbled = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x04\x00junk")
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.cert.not_valid_before_utc)
        .not_valid_after(ca.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(garbled, critical=False)
    )
    body = SpiffeBundle(HOME, (builder.sign(ca.key, hashes.SHA256()),)).to_json()
    with pytest.raises(FederationError, match="malformed extensions"):
        check_bundle(HOME, body)
    assert "malformed extensions" in str(_set_refused(body).details())


@pytest.mark.parametrize("san", ["spiffe://evil.org", "spiffe://example.org"])
def test_a_bundle_whose_authority_has_a_subject_that_does_not_parse_is_refused(san: str) -> None:
    """A CA certificate whose subject is a UTF8String of invalid UTF-8 (its signature is no
    matter: a root's is not checked): cryptography reads the name lazily, and the ValueError
    came from the refusal's own message (another trust domain's URI SAN), an unknown error;
    its URI SAN matching, it was installed with names nothing here can read."""
    ca = make_ca("zzzz.org", spiffe_id=san)
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    assert der.count(b"CA zzzz.org") == 2  # issuer and subject
    garbled = der.replace(b"CA zzzz.org", b"\xff" * len("CA zzzz.org"))
    key = {
        **public_key_members(ca.key.public_key()),
        "use": "x509-svid",
        "x5c": [base64.b64encode(garbled).decode()],
    }
    body = json.dumps({"keys": [key]}).encode()
    with pytest.raises(FederationError, match="names do not parse"):
        check_bundle(HOME, body)
    _set_refused(body)


def test_an_entry_that_moves_to_an_agent_brings_its_foreign_bundles_on_the_stream() -> None:
    # The entry's foreign trust domains did not change, but the agent's set did: it must be
    # sent the bundles the entry's workloads are to be given.
    now = time.time()
    foreign = make_ca("example.org", not_before=now - 3600, not_after=now + 86400)
    with managed_server(trust_domain="other.org") as other:
        admin = other.admin()
        _set_bundle(admin, "example.org", foreign)
        agent = other.attest()
        made = _other_entry(other, other.attest().spiffe_id, ("example.org",))
        stream = other.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
        assert dict(next(stream).federated_bundles) == {}
        made.parent_id = agent.spiffe_id
        admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=made), timeout=10)
        moved = next(stream)
        assert [e.id for e in moved.entries] == [made.id]
        assert set(moved.federated_bundles) == {"spiffe://example.org"}
        stream.cancel()


def test_an_entry_that_leaves_an_agent_takes_its_foreign_bundles_off_the_stream() -> None:
    # Kept, the agent went on validating the foreign domain's JWTs (ValidateJWTSVID) for
    # workloads none of whose entries federate with it.
    now = time.time()
    foreign = make_ca("example.org", not_before=now - 3600, not_after=now + 86400)
    with managed_server(trust_domain="other.org") as other:
        admin = other.admin()
        _set_bundle(admin, "example.org", foreign)
        agent = other.attest()
        made = _other_entry(other, agent.spiffe_id, ("example.org",))
        stream = other.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
        assert set(next(stream).federated_bundles) == {"spiffe://example.org"}
        made.parent_id = other.attest().spiffe_id
        admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=made), timeout=10)
        moved = next(stream)
        assert list(moved.removed_entry_ids) == [made.id]
        assert moved.HasField("bundle")
        assert dict(moved.federated_bundles) == {}
        stream.cancel()


SVID_LOAD_THEN_DIE = """
import os, signal, ssl, sys
from pathlib import Path
from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.datastore.sqlite import SqliteDataStore
from server.federation.endpoint import SvidContext
from svid._clock import SystemClock

root = Path(sys.argv[1])
clock = SystemClock()
ca = CaManager(
    CaConfig("example.org"), SqliteDataStore(root / "ds.sqlite3", clock), KeyStore(root / "keys"),
    clock,
)
ca.initialize()

def killed(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

ssl.SSLContext.load_cert_chain = killed  # the server SVID's key is handed to ssl here
SvidContext(ca, clock, 3600).maybe_renew()
"""


def test_a_server_killed_while_loading_its_endpoint_svid_leaves_no_key_file(
    tmp_path: Path,
) -> None:
    """ssl reads a key from a path only: the bundle endpoint's server SVID key must not sit in a
    file a kill at that moment leaves behind (in the temp directory, for good)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    died = subprocess.run(
        [sys.executable, "-c", SVID_LOAD_THEN_DIE, str(tmp_path)],
        capture_output=True,
        check=False,
        timeout=60,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert list(temp.rglob("*")) == []
