"""The Workload API over a real socket and relay, fed by a test cache (SPIFFE.md §1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent_attestor.endpoint import MAX_MESSAGE, MAX_STREAMS_PER_CONNECTION
from agent_attestor.h2_settings import STREAMS_ALLOWED
from agent_attestor.model import Selector
from agent_attestor.relay import RelaySettings
from agent_attestor.stream_budget import MAX_STREAMS_PER_UID
from agent_attestor.tasks.reporter import ValidationReporter
from svid._der import parse_der_certs
from svid._jose import b64url_decode, b64url_encode, sign_jws
from svid._jwt import MAX_TOKEN_BYTES
from svid._limits import MAX_AUDIENCE_BYTES
from svid._proto import task_pb2, workload_pb2, workload_pb2_grpc
from svid._verify_jwt import DEFAULT_LEEWAY
from svid._workload_client import WorkloadApiClient
from svid._workload_source import X509Source
from svid._x509 import spiffe_id_from_cert
from tests.agent_attestor.harness import HEADER, Harness
from tests.waits import wait_for

BAD_HEADERS = [
    (),
    (("workload.spiffe.io", "false"),),
    (("other", "true"),),
    # Exactly one value, as SPIRE asks: a second one, whatever it says, is refused.
    (("workload.spiffe.io", "true"), ("workload.spiffe.io", "false")),
    (("workload.spiffe.io", "true"), ("workload.spiffe.io", "true")),
]


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[attr-defined]


# ---- the header rule ------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", BAD_HEADERS)
def test_every_rpc_requires_the_security_header(agent: Harness, metadata: tuple) -> None:
    agent.add_entry("/w")
    stub = agent.stub()
    calls = [
        lambda: next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata)),
        lambda: next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=metadata)),
        lambda: next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=metadata)),
        lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=metadata),
        lambda: stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="x.y.z"), metadata=metadata
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header" in exc.value.details()  # type: ignore[attr-defined]


# ---- readiness and identity -----------------------------------------------------------------


def test_not_ready_before_first_sync_is_unavailable(agent: Harness) -> None:
    stub = agent.stub()
    with pytest.raises(grpc.RpcError) as exc:
        next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as exc:
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE


def test_entry_without_svid_yet_is_unavailable(agent: Harness) -> None:
    agent.add_entry("/w", issue=False)
    with pytest.raises(grpc.RpcError) as exc:
        next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE


def test_caller_with_no_identity_is_denied_everywhere(agent: Harness) -> None:
    agent.add_entry("/other", frozenset({Selector("unix", "uid:999999")}))
    stub = agent.stub()
    for call in (
        lambda: next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)),
        lambda: next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER)),
        lambda: next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER)),
        lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER),
        lambda: stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="x"), metadata=HEADER
        ),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED


def test_entry_needs_all_its_selectors(agent: Harness) -> None:
    mine = Selector("unix", f"uid:{os.getuid()}")
    agent.add_entry("/both", frozenset({mine, Selector("unix", "gid:424242")}))
    with pytest.raises(grpc.RpcError) as exc:
        next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    agent.add_entry("/exe", frozenset({mine, Selector("unix", f"gid:{os.getgid()}")}))
    msg = next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert [s.spiffe_id for s in msg.svids] == ["spiffe://example.org/exe"]


# ---- FetchX509SVID --------------------------------------------------------------------------


def test_first_message_carries_a_usable_svid_and_bundle(agent: Harness) -> None:
    agent.add_entry("/w")
    msg = next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert len(msg.svids) == 1
    svid = msg.svids[0]
    assert svid.spiffe_id == "spiffe://example.org/w"
    leaf = parse_der_certs(svid.x509_svid)[0]
    assert str(spiffe_id_from_cert(leaf)) == svid.spiffe_id
    key = serialization.load_der_private_key(svid.x509_svid_key, None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)
    assert svid.bundle == agent.ca.cert.public_bytes(der)
    leaf.verify_directly_issued_by(agent.ca.cert)


def test_stream_sends_full_state_on_change_default_first(agent: Harness) -> None:
    agent.add_entry("/first", created_at=1)
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    assert [s.spiffe_id for s in next(stream).svids] == ["spiffe://example.org/first"]
    agent.add_entry("/second", created_at=2)
    msg = next(stream)
    assert [s.spiffe_id for s in msg.svids] == [
        "spiffe://example.org/first",
        "spiffe://example.org/second",
    ]
    stream.cancel()


def test_rotation_pushes_a_new_svid_on_the_open_stream(agent: Harness) -> None:
    agent.add_entry("/w")
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    first = next(stream).svids[0].x509_svid
    agent.clock.advance(agent.ca.ttl * 0.61)  # past half life plus the largest jitter
    agent.lt.run(agent.rotator.tick())
    second = next(stream).svids[0].x509_svid
    assert second != first
    stream.cancel()


def test_hints_are_unique_the_oldest_entry_wins(agent: Harness) -> None:
    agent.add_entry("/a", hint="db", created_at=1)
    agent.add_entry("/b", hint="db", created_at=2)
    agent.add_entry("/c", hint="cache", created_at=3)
    msg = next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert [(s.spiffe_id, s.hint) for s in msg.svids] == [
        ("spiffe://example.org/a", "db"),
        ("spiffe://example.org/c", "cache"),
    ]


def test_crl_is_sent(agent: Harness) -> None:
    agent.crl = (b"crl-bytes",)
    agent.add_entry("/w")
    msg = next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert list(msg.crl) == [b"crl-bytes"]


def test_stream_ends_with_permission_denied_when_identity_removed(agent: Harness) -> None:
    entry = agent.add_entry("/w")
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    next(stream)
    agent.remove_entry(entry.id)
    with pytest.raises(grpc.RpcError) as exc:
        next(stream)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED


def test_stream_ends_with_permission_denied_when_every_svid_is_revoked(agent: Harness) -> None:
    entry = agent.add_entry("/w")
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    next(stream)
    serial = agent.lt.call(lambda: agent.cache.svids()[entry.id].serial_hex)
    agent.revoked = frozenset({serial})
    agent.sync()
    with pytest.raises(grpc.RpcError) as exc:
        next(stream)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED


# ---- bundles --------------------------------------------------------------------------------


def test_a_refused_agent_ends_every_stream_and_refuses_every_call_until_synced_again(
    agent: Harness,
) -> None:
    agent.add_entry("/w")
    stub = agent.stub()
    streams = [
        stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=10),
        stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=10),
        stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=10),
    ]
    for stream in streams:
        next(stream)
    agent.lt.call(lambda: agent.cache.refuse("evicted or banned: re-attest"))
    for stream in streams:
        with pytest.raises(grpc.RpcError) as exc:
            next(stream)
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
        assert exc.value.details() == "evicted or banned: re-attest"  # type: ignore[attr-defined]
    assert agent.cache.svids() == {}
    with pytest.raises(grpc.RpcError) as exc:
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    agent.sync()  # attested again: the server's next Sync message
    assert next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)).svids


def test_x509_bundles_stream(agent: Harness) -> None:
    agent.add_entry("/w")
    stream = agent.stub().FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER)
    msg = next(stream)
    der = serialization.Encoding.DER
    assert dict(msg.bundles) == {"spiffe://example.org": agent.ca.cert.public_bytes(der)}
    stream.cancel()


def test_jwt_bundles_hold_only_jwt_keys_with_kid(agent: Harness) -> None:
    agent.add_entry("/w")
    msg = next(agent.stub().FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER))
    jwks = json.loads(msg.bundles["spiffe://example.org"])
    assert [k["kid"] for k in jwks["keys"]] == [agent.ca.jwt_kid]
    assert all(k["use"] == "jwt-svid" and "x5c" not in k for k in jwks["keys"])


# ---- JWT ------------------------------------------------------------------------------------


def test_fetch_jwt_requires_audience(agent: Harness) -> None:
    agent.add_entry("/w")
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("audience", "message"),
    [
        # Issue 11's 1 MB audience no longer fits endpoint.MAX_MESSAGE (RESOURCE_EXHAUSTED
        # before any handler): the largest that does is refused here, never echoed.
        (["a" * 64 * 1024], "at most 1024 bytes"),
        (["é" * 513], "at most 1024 bytes"),  # 1,026 bytes of UTF-8 in 513 characters
        ([f"a{i}" for i in range(33)], "at most 32"),
        (["a" * 1000] * 5, "at most 4096 bytes"),
        # The audit log joins audiences with commas: "a,b" would read as "a" and "b".
        (["a", "b,c"], "audience[1]: holds a comma"),
        (["x" * 1000 + ","], "audience[0]: holds a comma"),
    ],
)
def test_fetch_jwt_audience_size_is_capped_before_anything_is_minted(
    agent: Harness, audience: list[str], message: str
) -> None:
    agent.add_entry("/w")
    stub = agent.stub()
    with pytest.raises(grpc.RpcError) as exc:
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=audience), metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    details = exc.value.details()  # type: ignore[attr-defined]
    assert message in details
    assert len(details) < 200  # names the limit; never echoes the value
    assert agent.signer.jwt_calls == 0
    ok = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["é" * 512]), metadata=HEADER)
    assert ok.svids[0].svid  # 1,024 bytes exactly is within the cap


def test_validate_jwt_audience_size_is_capped(agent: Harness) -> None:
    agent.add_entry("/w")
    stub = agent.stub()
    token = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    request = workload_pb2.ValidateJWTSVIDRequest(audience="a" * 1025, svid=token.svids[0].svid)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ValidateJWTSVID(request, metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1024 bytes" in exc.value.details()  # type: ignore[attr-defined]


def test_fetch_jwt_for_an_id_not_entitled_is_denied(agent: Harness) -> None:
    agent.add_entry("/w")
    req = workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id="spiffe://example.org/nope")
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().FetchJWTSVID(req, metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "not-an-id",
        "spiffe://EXAMPLE.org/w",
        "spiffe://example.org/w/",
        # Answered as the code, not a too-big status: the details must not quote it whole. (As
        # large as endpoint.MAX_MESSAGE lets through.)
        "spiffe://example.org/" + "a" * 64 * 1024,
        "spiffe://example.org/w" + "é" * 5_000,  # its error quotes the ID; percent-encoded x6
    ],
)
def test_fetch_jwt_for_an_invalid_spiffe_id_is_invalid_argument(
    agent: Harness, spiffe_id: str
) -> None:
    # As SPIRE: a malformed ID is the request's fault (INVALID_ARGUMENT, not retried by
    # clients), not a question of entitlement; and the details stay small enough for gRPC to
    # carry (over 16 KiB the client hears RESOURCE_EXHAUSTED instead).
    agent.add_entry("/w")
    req = workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id=spiffe_id)
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().FetchJWTSVID(req, metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "spiffe_id" in (exc.value.details() or "")  # type: ignore[attr-defined]
    assert agent.signer.jwt_calls == 0


def test_fetch_jwt_one_per_identity_or_the_named_one(agent: Harness) -> None:
    agent.add_entry("/a", created_at=1)
    agent.add_entry("/b", created_at=2)
    stub = agent.stub()
    resp = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER)
    assert [s.spiffe_id for s in resp.svids] == ["spiffe://example.org/a", "spiffe://example.org/b"]
    req = workload_pb2.JWTSVIDRequest(audience=["x"], spiffe_id="spiffe://example.org/b")
    resp = stub.FetchJWTSVID(req, metadata=HEADER)
    assert [s.spiffe_id for s in resp.svids] == ["spiffe://example.org/b"]


def test_fetch_jwt_without_spiffe_id_never_mints_for_a_task_identity(agent: Harness) -> None:
    agent.add_entry("/bot", created_at=1)
    agent.add_entry("/bot/task/t1", created_at=2)
    stub = agent.stub()
    resp = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER)
    assert [s.spiffe_id for s in resp.svids] == ["spiffe://example.org/bot"]
    assert agent.signer.jwt_calls == 1
    named = workload_pb2.JWTSVIDRequest(
        audience=["x"], spiffe_id="spiffe://example.org/bot/task/t1"
    )
    resp = stub.FetchJWTSVID(named, metadata=HEADER)
    assert [s.spiffe_id for s in resp.svids] == ["spiffe://example.org/bot/task/t1"]


def test_fetch_jwt_without_spiffe_id_and_only_task_identities_is_denied(agent: Harness) -> None:
    agent.add_entry("/bot/task/t1")
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe_id" in (exc.value.details() or "")  # type: ignore[attr-defined]
    assert agent.signer.jwt_calls == 0


def test_jwt_cached_per_id_and_sorted_audiences_until_half_life(agent: Harness) -> None:
    agent.add_entry("/w")
    stub = agent.stub()

    def fetch(*aud: str) -> str:
        resp = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=aud), metadata=HEADER)
        return resp.svids[0].svid

    first = fetch("a", "b")
    assert fetch("b", "a") == first
    assert agent.signer.jwt_calls == 1
    assert fetch("c") != first
    agent.clock.advance(agent.ca.jwt_ttl / 2 - 1)
    assert fetch("a", "b") == first
    agent.clock.advance(2)
    assert fetch("a", "b") != first


def test_fetch_jwt_with_server_down_and_nothing_cached_is_unavailable(agent: Harness) -> None:
    agent.add_entry("/w")
    agent.signer.fail = True
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE


def test_validate_jwt_accepts_a_good_token_and_returns_claims(agent: Harness) -> None:
    agent.add_entry("/w")
    stub = agent.stub()
    token = (
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["svc"]), metadata=HEADER)
        .svids[0]
        .svid
    )
    resp = stub.ValidateJWTSVID(
        workload_pb2.ValidateJWTSVIDRequest(audience="svc", svid=token), metadata=HEADER
    )
    assert resp.spiffe_id == "spiffe://example.org/w"
    assert resp.claims["sub"] == "spiffe://example.org/w"
    assert list(resp.claims["aud"]) == ["svc"]


def test_validate_jwt_refuses_claims_a_struct_cannot_carry(agent: Harness) -> None:
    # Found by tests/fuzz: Struct.update raised OverflowError, answered as UNKNOWN.
    agent.add_entry("/w")
    seen: list[dict[str, object]] = []
    agent.api._on_validate = lambda **kw: seen.append(kw)
    ca = agent.ca
    claims = {"sub": "spiffe://example.org/w", "aud": "svc", "exp": int(agent.clock.now()) + 60}
    token = sign_jws({"kid": ca.jwt_kid}, {**claims, "n": 10**400}, ca.jwt_key)
    stub = agent.stub()
    with pytest.raises(grpc.RpcError) as exc:
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="svc", svid=token), metadata=HEADER
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "Struct" in (exc.value.details() or "")
    assert seen[-1]["ok"] is False
    stub.ValidateJWTSVID(  # the agent still serves
        workload_pb2.ValidateJWTSVIDRequest(
            audience="svc", svid=sign_jws({"kid": ca.jwt_kid}, claims, ca.jwt_key)
        ),
        metadata=HEADER,
    )


@pytest.mark.parametrize("case", ["wrong-audience", "garbage", "expired", "tampered", "no-aud"])
def test_validate_jwt_rejects_bad_tokens(agent: Harness, case: str) -> None:
    agent.add_entry("/w")
    stub = agent.stub()
    token = agent.ca.mint_jwt("spiffe://example.org/w", ["svc"]).token
    audience = "svc"
    if case == "wrong-audience":
        audience = "other"
    elif case == "garbage":
        token = "not-a-token"
    elif case == "expired":
        agent.clock.advance(agent.ca.jwt_ttl + DEFAULT_LEEWAY + 1)
    elif case == "tampered":
        head, body, sig = token.split(".")
        claims = json.loads(b64url_decode(body))
        claims["sub"] = "spiffe://example.org/admin"
        token = ".".join([head, b64url_encode(json.dumps(claims).encode()), sig])
    elif case == "no-aud":
        audience = ""
    with pytest.raises(grpc.RpcError) as exc:
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token), metadata=HEADER
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("header", [{"kid": "k" * 30_000}, {"typ": "t" * 30_000}])
def test_validate_jwt_refusal_of_a_token_with_a_huge_header_value_is_invalid_argument(
    agent: Harness, header: dict[str, str]
) -> None:
    # The refusal quotes the token's kid or typ; quoted whole (up to the 64 KiB token limit)
    # it overran gRPC's 16 KiB status message and the client heard RESOURCE_EXHAUSTED.
    agent.add_entry("/w")
    ca = agent.ca
    claims = {"sub": "spiffe://example.org/w", "aud": "svc", "exp": int(agent.clock.now()) + 60}
    token = sign_jws({"kid": ca.jwt_kid, **header}, claims, ca.jwt_key)
    stub = agent.stub()
    with pytest.raises(grpc.RpcError) as exc:
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="svc", svid=token), metadata=HEADER
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert (exc.value.details() or "").startswith("token is invalid: ")  # type: ignore[attr-defined]


def test_validate_jwt_refuses_a_token_whose_jti_the_server_revoked(agent: Harness) -> None:
    seen: list[dict[str, object]] = []
    agent.api._on_validate = lambda **kw: seen.append(kw)
    agent.add_entry("/w")
    stub = agent.stub()
    token = agent.ca.mint_jwt("spiffe://example.org/w/task/t1", ["docs"]).token
    jti = json.loads(b64url_decode(token.split(".")[1]))["jti"]
    request = workload_pb2.ValidateJWTSVIDRequest(audience="docs", svid=token)
    assert stub.ValidateJWTSVID(request, metadata=HEADER).claims["jti"] == jti
    agent.revoked_jtis = frozenset({jti})
    agent.sync(issue=False)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ValidateJWTSVID(request, metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "revoked" in exc.value.details()  # type: ignore[attr-defined]
    assert [(s["ok"], s["jti"]) for s in seen] == [(True, jti), (False, jti)]
    # Refused once its signature held: the claims are the issuer's, the task's own.
    assert [s["claims_verified"] for s in seen] == [True, True]


def test_a_genuine_tokens_refusal_for_another_audience_is_reported_as_verified(
    agent: Harness,
) -> None:
    # A task's token replayed at a service it was not minted for: its signature held, so its
    # txn and jti are the issuer's, and the refusal is the task's to answer for (audit export
    # --task). Reported unverified, the replay was filed under nobody.
    seen: list[dict[str, object]] = []
    agent.api._on_validate = lambda **kw: seen.append(kw)
    agent.add_entry("/w")
    token = agent.ca.mint_jwt("spiffe://example.org/w/task/t1", ["docs"]).token
    jti = json.loads(b64url_decode(token.split(".")[1]))["jti"]
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="billing", svid=token), metadata=HEADER
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "not for audience" in exc.value.details()  # type: ignore[attr-defined]
    assert [(s["ok"], s["jti"], s["claims_verified"]) for s in seen] == [(False, jti, True)]


def test_a_forged_tokens_refusal_is_reported_with_its_claims_unverified(agent: Harness) -> None:
    # Any caller may have a token naming another workload's task (its `txn` is in every token
    # of it) validated: reported as the issuer's words, the server filed the refusal under that
    # task, that runtime and that jti.
    seen: list[dict[str, object]] = []
    agent.api._on_validate = lambda **kw: seen.append(kw)
    agent.add_entry("/w")
    token = agent.ca.mint_jwt("spiffe://example.org/w/task/t1", ["docs"]).token
    head, body, sig = token.split(".")
    claims = json.loads(b64url_decode(body))
    claims["txn"] = "0123456789abcdef"
    forged = ".".join([head, b64url_encode(json.dumps(claims).encode()), sig])
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="docs", svid=forged), metadata=HEADER
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "signature" in exc.value.details()  # type: ignore[attr-defined]
    assert [(s["ok"], s["txn"], s["claims_verified"]) for s in seen] == [
        (False, "0123456789abcdef", False)
    ]


def test_fetch_jwt_never_serves_a_cached_token_whose_jti_the_server_revoked(
    agent: Harness,
) -> None:
    # A task's end revokes its tokens' jtis first and deletes its entry after (a later Sync
    # message; much later when the deletion failed and a sweep finishes it). Meanwhile the
    # agent handed out the cached token it knew revoked, which its own ValidateJWTSVID refuses.
    entry = agent.add_entry("/w/task/t1")
    stub = agent.stub()
    request = workload_pb2.JWTSVIDRequest(audience=["docs"], spiffe_id=entry.spiffe_id)
    first = stub.FetchJWTSVID(request, metadata=HEADER).svids[0].svid
    assert stub.FetchJWTSVID(request, metadata=HEADER).svids[0].svid == first
    agent.revoked_jtis = frozenset({json.loads(b64url_decode(first.split(".")[1]))["jti"]})
    agent.sync(issue=False)
    assert stub.FetchJWTSVID(request, metadata=HEADER).svids[0].svid != first
    assert agent.signer.jwt_calls == 2


# ---- WIT and garbage ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["FetchWITSVID", "FetchWITBundles"])
def test_wit_rpcs_are_unimplemented(agent: Harness, method: str) -> None:
    agent.add_entry("/w")
    call = agent.channel().unary_unary(f"/SpiffeWorkloadAPI/{method}")
    with pytest.raises(grpc.RpcError) as exc:
        call(b"", metadata=HEADER)
    assert _code(exc) == grpc.StatusCode.UNIMPLEMENTED


def test_garbage_on_the_socket_does_not_stop_the_agent(agent: Harness) -> None:
    agent.add_entry("/w")
    for junk in (b"\x00" * 10, os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(agent.socket_path))
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    msg = next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert msg.svids[0].spiffe_id == "spiffe://example.org/w"
    # every relayed connection has been released
    agent.lt.run(_settle())
    assert len(agent.registry) == len(list(agent.channels))


async def _settle() -> None:
    import asyncio

    for _ in range(20):
        await asyncio.sleep(0.01)


def test_socket_file_is_world_connectable_and_private_dir_is_closed(agent: Harness) -> None:
    assert agent.socket_path.stat().st_mode & 0o777 == 0o777
    assert (agent.root / "private").stat().st_mode & 0o777 == 0o700


def test_leaf_from_stream_is_signed_by_the_bundle(agent: Harness) -> None:
    agent.add_entry("/w")
    msg = next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    ca = x509.load_der_x509_certificate(msg.svids[0].bundle)
    parse_der_certs(msg.svids[0].x509_svid)[0].verify_directly_issued_by(ca)
    threading.Event().wait(0)


def test_validation_answers_are_reported_to_the_hook(agent: Harness) -> None:
    seen: list[dict[str, object]] = []
    agent.api._on_validate = lambda **kw: seen.append(kw)
    agent.add_entry("/w")
    stub = agent.stub()
    token = agent.ca.mint_jwt("spiffe://example.org/w", ["svc"]).token
    stub.ValidateJWTSVID(
        workload_pb2.ValidateJWTSVIDRequest(audience="svc", svid=token), metadata=HEADER
    )
    with pytest.raises(grpc.RpcError):
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="x", svid=token), metadata=HEADER
        )
    assert [(s["ok"], s["subject"], s["caller_id"]) for s in seen] == [
        (True, "spiffe://example.org/w", "spiffe://example.org/w"),
        (False, "spiffe://example.org/w", "spiffe://example.org/w"),
    ]
    assert "audience" in str(seen[1]["reason"])
    assert all(token not in str(s) for s in seen)


def test_a_token_validated_again_and_again_is_reported_once_while_it_can_be_validated(
    agent: Harness,
) -> None:
    # A server checking its client's token on every request: each call was one audit row.
    sent: list[task_pb2.Validation] = []

    async def send(request: task_pb2.ReportValidationsRequest) -> None:
        sent.extend(request.validations)

    reporter = ValidationReporter(send, agent.clock)
    agent.api._on_validate = reporter.report
    agent.add_entry("/w")
    stub = agent.stub()
    minted = agent.ca.mint_jwt("spiffe://example.org/w", ["svc", "db"], ttl=60)

    def validate(audience: str) -> None:
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=minted.token),
            metadata=HEADER,
        )

    for _ in range(5):
        validate("svc")
    validate("db")  # another audience: its own report
    agent.clock.set(minted.expires_at + DEFAULT_LEEWAY)  # the last moment it is accepted
    validate("svc")
    asyncio.run(reporter.flush())
    assert [(v.audience[:], v.ok) for v in sent] == [(["svc"], True), (["db"], True)]
    assert reporter.repeated == 5
    # Past it, every call is a refusal, reported as ever (the server budgets those).
    agent.clock.advance(1)
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            validate("svc")
    asyncio.run(reporter.flush())
    assert [v.ok for v in sent[2:]] == [False, False]
    assert reporter.repeated == 5


def test_validation_reports_of_a_huge_forged_token_stay_small(agent: Harness) -> None:
    # The claims of a token that fails are the sender's words: each report is bounded, or one
    # caller could queue gigabytes for the audit log.
    seen: list[dict[str, object]] = []
    agent.api._on_validate = lambda **kw: seen.append(kw)
    agent.add_entry("/w")
    huge = "x" * 11_000  # the token stays under svid._jwt.MAX_TOKEN_BYTES (64 KiB)
    header = b64url_encode(json.dumps({"alg": "ES256", "kid": agent.ca.jwt_kid}).encode())
    claims = {"sub": f"spiffe://example.org/{huge}", "aud": [huge], "jti": huge, "txn": huge}
    forged = f"{header}.{b64url_encode(json.dumps(claims).encode())}.{b64url_encode(b'0' * 64)}"
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="svc", svid=forged), metadata=HEADER
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(exc.value.details()) <= 1024  # type: ignore[attr-defined]
    (report,) = seen
    assert report["ok"] is False
    assert all(len(str(v)) <= 2048 for v in report.values())


@pytest.mark.parametrize("claim", ["sub", "jti", "txn"])
def test_a_forged_token_with_a_lone_surrogate_is_still_reported(agent: Harness, claim: str) -> None:
    # JSON's "\ud800" escape decodes to a lone surrogate, which protobuf refuses to carry: the
    # audit report of the refusal raised, was dropped ("validation hook failed"), and a caller
    # could have any number of forged tokens refused without a trace.
    reporter = ValidationReporter(_unsent, agent.clock)
    agent.api._on_validate = reporter.report
    agent.add_entry("/w")
    claims = {"sub": "spiffe://example.org/x", "aud": ["svc"], "exp": int(agent.clock.now()) + 60}
    claims[claim] = "spiffe://example.org/x\ud800" if claim == "sub" else "j\ud800"
    header = b64url_encode(json.dumps({"alg": "ES256", "kid": agent.ca.jwt_kid}).encode())
    payload = b64url_encode(json.dumps(claims, ensure_ascii=True).encode())
    forged = f"{header}.{payload}.{b64url_encode(b'0' * 64)}"
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="svc", svid=forged), metadata=HEADER
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    [report] = reporter.queued()
    assert not report.ok
    assert getattr(report, "subject" if claim == "sub" else claim).endswith("?")


async def _unsent(request: task_pb2.ReportValidationsRequest) -> None:
    raise AssertionError("not flushed in this test")


def test_the_largest_validation_request_fits_the_sockets_message_bound(agent: Harness) -> None:
    """endpoint.MAX_MESSAGE is sized for this: a token at svid._jwt.MAX_TOKEN_BYTES and an
    audience at its limit reach the handler (and are answered on the token's merits)."""
    agent.add_entry("/w")
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(
                audience="a" * MAX_AUDIENCE_BYTES, svid="x" * MAX_TOKEN_BYTES
            ),
            metadata=HEADER,
        )
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("token is invalid")  # type: ignore[attr-defined]
    # Past the bound, grpcio refuses it before buffering more (test_request_buffering.py).
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="x" * MAX_MESSAGE),
            metadata=HEADER,
        )
    assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        ("deny", grpc.StatusCode.PERMISSION_DENIED),
        ("bad", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_server_decisions_on_jwt_minting_reach_the_workload(
    agent: Harness, refusal: str, code: grpc.StatusCode
) -> None:
    from agent_attestor.errors import BadRequestError, NoIdentityError

    agent.add_entry("/w")
    agent.signer.refuse_jwt = (
        NoIdentityError("policy: lateral movement") if refusal == "deny" else BadRequestError("x")
    )
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub().FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    assert _code(exc) == code


def test_one_connection_holds_a_bounded_number_of_streams(agent: Harness) -> None:
    # Each open stream holds memory and a subscription in the agent: one connection opening
    # streams without end would take the agent's memory from every workload on the node. Past
    # the bound, HTTP/2 makes the client wait for a stream to close (nothing is refused).
    agent.add_entry("/w")
    stub = agent.stub()
    streams = [
        stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=30)
        for _ in range(MAX_STREAMS_PER_CONNECTION)
    ]
    for stream in streams:
        next(stream)
    extra = stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=30)
    first = threading.Thread(target=lambda: next(extra), daemon=True)
    first.start()
    first.join(1.0)
    assert first.is_alive()  # waiting for a stream of its connection to close
    streams[0].cancel()
    first.join(10)
    assert not first.is_alive()
    for stream in streams[1:]:
        stream.cancel()
    extra.cancel()


def test_one_uid_holds_a_bounded_number_of_streams_across_its_connections(
    agent: Harness,
) -> None:
    # A uid may hold 256 connections of 100 streams each: 25,000 streams held 650 MB of the
    # agent's memory for one unprivileged user. Past its maximum, a stream of any kind, on any
    # of its connections, is refused; one that closes makes room.
    agent.add_entry("/w")
    stubs = []
    for _ in range(MAX_STREAMS_PER_UID // MAX_STREAMS_PER_CONNECTION + 2):
        # A subchannel of its own: channels to one target share a connection otherwise.
        channel = grpc.insecure_channel(
            f"unix:{agent.socket_path}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        agent.channels.append(channel)
        stubs.append(workload_pb2_grpc.SpiffeWorkloadAPIStub(channel))
    held = []
    try:
        for i in range(MAX_STREAMS_PER_UID):
            stub = stubs[i // MAX_STREAMS_PER_CONNECTION]
            stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=60)
            held.append(stream)
            next(stream)
        extra = stubs[-1].FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=30
        )
        with pytest.raises(grpc.RpcError) as exc:
            next(extra)
        assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"holds its maximum of {MAX_STREAMS_PER_UID} open streams" in exc.value.details()  # type: ignore[attr-defined]
        held.pop().cancel()
        wait_for(
            lambda: (
                agent.lt.call(lambda: agent.api.streams.held_by(os.getuid())) < MAX_STREAMS_PER_UID
            ),
            20,
            "the cancelled stream let go",
        )
        again = stubs[-1].FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=30
        )
        held.append(again)
        assert next(again).bundles
    finally:
        for stream in held:
            stream.cancel()
    wait_for(
        lambda: agent.lt.call(lambda: agent.api.streams.held_by(os.getuid())) == 0,
        20,
        "every stream let go",
    )


def test_a_uids_connections_hold_a_bounded_sum_of_unfinished_requests(agent: Harness) -> None:
    # grpcio buffers each stream's request (up to MAX_MESSAGE) before any handler checks a
    # header or a caller, so the streams one connection may open, times MAX_MESSAGE, times the
    # connections a uid may hold (max_connections_per_uid) is what any local user can make the
    # agent hold, identity or not. Measured: streams opened until one waits for room; the
    # server itself holds at most STREAMS_ALLOWED (+1), closed ones not let go of yet among them.
    agent.add_entry("/w")
    stub = agent.stub()
    held = []
    per_connection = 0

    def first_of(stream: Iterator[workload_pb2.X509BundlesResponse]) -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            next(stream)

    try:
        for _ in range(101):
            stream = stub.FetchX509Bundles(
                workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=30
            )
            held.append(stream)
            first = threading.Thread(target=first_of, args=(stream,), daemon=True)
            first.start()
            first.join(2.0)
            if first.is_alive():  # waiting for a stream of its connection to close
                break
            per_connection += 1
    finally:
        for stream in held:
            stream.cancel()
    assert per_connection == MAX_STREAMS_PER_CONNECTION
    connections = RelaySettings().max_connections_per_uid
    per_uid = (STREAMS_ALLOWED + 1) * MAX_MESSAGE * connections
    assert per_uid <= 512 * 1024 * 1024, (
        f"{STREAMS_ALLOWED + 1} streams a connection: a uid's {connections} connections hold "
        f"{per_uid // (1024 * 1024)} MiB of unfinished requests"
    )


def test_a_process_holding_a_few_sources_still_gets_its_calls_answered(agent: Harness) -> None:
    # grpcio shares one connection among the channels of a process to one socket (its global
    # subchannel pool), so MAX_STREAMS_PER_CONNECTION would bound the whole process's streams,
    # not one client's. A source holds its 3 or 4 streams for its life: with a source per
    # tenant, or a library's beside the app's, a call past the bound waits for a stream to
    # close, which a source's never do. Each client has a connection of its own.
    agent.add_entry("/w")
    address = f"unix://{agent.socket_path}"
    sources = [X509Source(address, jwt_bundles=True, ready_timeout=10) for _ in range(8)]
    try:
        for source in sources:
            source.__enter__()
        with WorkloadApiClient(address, timeout=5) as client:
            token = client.fetch_jwt_svid("a-service")
        assert str(token.spiffe_id) == "spiffe://example.org/w"
    finally:
        for source in sources:
            source.stop()
