"""Other trust domains at the token endpoint: trusted by their issuer URL, their keys found by
OIDC discovery (a real svidd server with its token endpoint on HTTPS, and another issuer served
over HTTPS from a thread here, its discovery document and JWKS, each with a test CA of its
own), or by a bundle file."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.signer import JwtSigner
from server.errors import ConfigError
from server.https_get import FETCHES_AT_ONCE
from server.oauth.discovery import JWT_BEARER
from server.oauth.issuers import (
    DEFAULT_REFRESH,
    MAX_REFRESH,
    MIN_REFRESH,
    RETRY,
    WANTED_GAP,
    DiscoveredIssuers,
    IssuerError,
    fetch_keys,
    next_refresh,
)
from server.oauth.settings import TrustedIssuer, parse_trusted_issuers
from svid._clock import Clock, FakeClock
from svid._jwk import public_key_members
from svid._spiffe_id import SpiffeId, TrustDomain
from tests.clocks import SleptClock, SteppedClock
from tests.server.fixtures import SilentEndpoint, serving_https, short_tmpdir, write_tls_files
from tests.server.oauth.conftest import RESOURCE, OAuthServer, serving_oauth
from tests.waits import wait_for

PARTNER = TrustDomain.parse("partner.org")
WORKLOAD = SpiffeId.parse("spiffe://partner.org/ci/deployer")


@dataclass
class Issuer:
    """Another deployment's OIDC issuer: what its discovery document and JWKS say (changeable
    while it serves), and how many times each was fetched."""

    url: str = ""
    ca_file: Path = Path()
    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    named_issuer: str | None = None  # None: its own URL
    jwks_uri: str | None = None  # None: its own /jwks
    twice: str = ""  # a member its documents name twice: "issuer" or "kid" ("Issuer": by case)
    status: int = 200
    max_age: int = 120
    fetches: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0  # seconds before each answer

    def add_key(self, kid: str) -> ec.EllipticCurvePrivateKey:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        return self.keys[kid]

    def assertion(self, kid: str, audience: str, clock: Any) -> str:
        signer = JwtSigner(self.keys[kid], kid, clock, int(clock.now()) + 3600, issuer=self.url)
        return signer.sign(WORKLOAD, [audience], 120).token

    def answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        self.fetches[path] = self.fetches.get(path, 0) + 1
        time.sleep(self.delay)
        if self.status != 200:
            return self.status, b"{}", {}
        if path == "/.well-known/openid-configuration":
            jwks_uri = self.jwks_uri or self.url + "/jwks"
            doc = {"issuer": self.named_issuer or self.url, "jwks_uri": jwks_uri}
            text = json.dumps(doc)
            if self.twice == "issuer":  # read first by others: another issuer's document
                text = text.replace('{"issuer"', '{"issuer": "https://elsewhere.example", "issuer"')
            if self.twice == "Issuer":  # read last by Go's encoding/json, as "issuer"
                text = text.replace("}", ', "Issuer": "https://elsewhere.example"}')
            return 200, text.encode(), {}
        if path == "/jwks":
            jwks = [
                {**public_key_members(k.public_key()), "kid": kid, "use": "sig", "alg": "ES256"}
                for kid, k in self.keys.items()
            ]
            headers = {"Cache-Control": f"public, max-age={self.max_age}"}
            text = json.dumps({"keys": jwks})
            if self.twice == "kid":  # read first by others: a key of another kid
                text = text.replace('"kid"', '"kid": "other", "kid"', 1)
            return 200, text.encode(), headers
        return 404, b"{}", {}


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    """The other issuer, serving on HTTPS with its own test CA's certificate for 127.0.0.1."""
    state = Issuer()
    with serving_https(state.answer, "iss") as (state.url, state.ca_file):
        yield state


def _serving(issuer: Issuer, **overrides: Any) -> Any:
    return serving_oauth(
        "oti",
        [RESOURCE],
        oauth_trusted_issuers=[f"{PARTNER}={issuer.url}"],
        oauth_trusted_issuers_ca=str(issuer.ca_file),
        **overrides,
    )


def _exchange(server: OAuthServer, assertion: str) -> httpx.Response:
    form = {"grant_type": JWT_BEARER, "assertion": assertion, "resource": RESOURCE}
    return httpx.post(server.issuer + "/token", data=form, verify=server.ssl_context())


def _audited(server: OAuthServer, kind: str) -> list[dict[str, Any]]:
    rows = server.running.server.datastore.audit_rows()
    return [{**r, **json.loads(r.get("extra") or "{}")} for r in rows if r["kind"] == kind]


def _holds(server: OAuthServer, kid: str) -> bool:
    # The server's own view: the issuer counts a fetch before the server has audited and taken
    # the keys it answered with.
    oauth = server.running.server.oauth
    assert oauth is not None
    bundle = oauth.issuers.get(PARTNER)
    return bundle is not None and kid in bundle.keys


def test_a_jwt_svid_of_a_discovered_issuer_gets_an_access_token(issuer: Issuer) -> None:
    issuer.add_key("p1")
    with _serving(issuer) as server:
        clock = server.running.clock
        # The first fetch runs once the server has started; until then there are no keys.
        wait_for(lambda: _holds(server, "p1"), 10, "the keys of p1")
        assert issuer.fetches.get("/jwks") == 1
        reply = _exchange(server, issuer.assertion("p1", server.issuer, clock))
        assert reply.status_code == 200, reply.text
        (event,) = [
            r
            for r in server.running.server.datastore.audit_rows()
            if r["kind"] == "oauth_jwt_bearer"
        ]
        assert event["decision"] == "allow"
        (keys,) = _audited(server, "oauth_issuer_keys_changed")
        assert keys["trust_domain"] == "partner.org"
        assert keys["issuer"] == issuer.url
        assert keys["kids"] == ["p1"]
        # A key the issuer does not publish, and one of ours naming the partner as its iss,
        # are refused: the keys are the issuer's, found through its own URL.
        stranger = Issuer(url=issuer.url)
        stranger.add_key("p1")
        forged = _exchange(server, stranger.assertion("p1", server.issuer, clock))
        assert forged.status_code == 400
        assert forged.json()["error"] == "invalid_grant"
        assert "signature" in forged.json()["error_description"]


def test_keys_follow_the_issuer_as_its_max_age_runs_out(issuer: Issuer) -> None:
    issuer.add_key("p1")
    issuer.max_age = 120
    with _serving(issuer) as server:
        clock = server.running.clock
        wait_for(lambda: _holds(server, "p1"), 10, "the keys of p1")
        issuer.keys.clear()
        issuer.add_key("p2")  # rotated: p1 is gone
        new = issuer.assertion("p2", server.issuer, clock)
        assert _exchange(server, new).status_code == 400  # not fetched yet: still p1
        clock.advance(121)
        wait_for(lambda: _holds(server, "p2"), 10, "the keys of p2")
        assert issuer.fetches.get("/jwks") == 2
        assert _exchange(server, issuer.assertion("p2", server.issuer, clock)).status_code == 200


def test_a_key_the_issuer_published_since_is_fetched_when_a_token_names_it(
    issuer: Issuer,
) -> None:
    issuer.add_key("p1")
    with _serving(issuer) as server:
        clock = server.running.clock
        wait_for(lambda: _holds(server, "p1"), 10, "the keys of p1")
        issuer.add_key("p2")  # published, and used at once; the clock has not moved
        first = _exchange(server, issuer.assertion("p2", server.issuer, clock))
        assert first.status_code == 400
        assert "kid 'p2'" in first.json()["error_description"]
        wait_for(lambda: _holds(server, "p2"), 10, "the keys of p2")
        assert issuer.fetches.get("/jwks") == 2
        assert _exchange(server, issuer.assertion("p2", server.issuer, clock)).status_code == 200


def test_an_issuer_down_at_start_is_tried_again_and_its_keys_kept_when_it_fails_later(
    issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    issuer.add_key("p1")
    issuer.status = 503
    with caplog.at_level(logging.WARNING, "svid.server.oauth"), _serving(issuer) as server:
        clock = server.running.clock
        wait_for(
            lambda: issuer.fetches.get("/.well-known/openid-configuration", 0) == 1,
            10,
            "one fetch of the discovery document",
        )
        refused = _exchange(server, issuer.assertion("p1", server.issuer, clock))
        assert refused.status_code == 400
        assert "no JWT bundle for trust domain partner.org" in refused.json()["error_description"]
        wait_for(
            lambda: "HTTP 503" in caplog.text and "no keys yet" in caplog.text,
            10,
            "the failed fetch logged",
        )
        (failed,) = _audited(server, "oauth_issuer_keys_refused")[:1]
        assert "HTTP 503" in failed["reason"]
        issuer.status = 200
        clock.advance(RETRY + 1)
        wait_for(lambda: _holds(server, "p1"), 10, "the keys of p1")
        assert issuer.fetches.get("/jwks") == 1
        assert _exchange(server, issuer.assertion("p1", server.issuer, clock)).status_code == 200
        issuer.status = 500  # down again: what was fetched stays in use
        clock.advance(MAX_REFRESH + 1)
        wait_for(
            lambda: "keeping the keys fetched before" in caplog.text, 10, "the kept keys logged"
        )
        assert _exchange(server, issuer.assertion("p1", server.issuer, clock)).status_code == 200


# --- the fetch itself, against the same HTTPS issuer ---


def _fetch(issuer: Issuer, ca_file: Path | None = None) -> Any:
    ctx = ssl.create_default_context(cafile=str(ca_file or issuer.ca_file))
    return fetch_keys(TrustedIssuer(PARTNER, issuer.url), ctx)


def test_an_issuer_slow_at_each_get_is_given_one_timeout_for_both(issuer: Issuer) -> None:
    # Each GET alone answers within the timeout; together they must too, or an issuer slow on
    # purpose holds its fetch (and a lane of the pool) for twice as long as configured.
    issuer.add_key("p1")
    issuer.delay = 0.6
    ctx = ssl.create_default_context(cafile=str(issuer.ca_file))
    started = time.monotonic()
    with pytest.raises(IssuerError, match=issuer.url):
        fetch_keys(TrustedIssuer(PARTNER, issuer.url), ctx, timeout=1.0)
    assert time.monotonic() - started < 1.5


def test_the_fetch_takes_sig_keys_and_the_max_age(issuer: Issuer) -> None:
    issuer.add_key("p1")
    issuer.add_key("p2")
    issuer.max_age = 900
    fetched = _fetch(issuer)
    assert sorted(fetched.bundle.keys) == ["p1", "p2"]
    assert fetched.bundle.trust_domain == PARTNER
    assert fetched.max_age == 900


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("other issuer", "names issuer 'https://elsewhere.example'"),
        ("no keys", "no signing key"),
        ("status", "HTTP 404"),
        ("untrusted certificate", "CERTIFICATE_VERIFY_FAILED"),
    ],
)
def test_the_fetch_refuses_what_it_cannot_trust(issuer: Issuer, case: str, says: str) -> None:
    issuer.add_key("p1")
    ca_file = None
    if case == "other issuer":
        issuer.named_issuer = "https://elsewhere.example"
    elif case == "no keys":
        issuer.keys.clear()
    elif case == "status":
        issuer.status = 404
    elif case == "untrusted certificate":
        ca_file = write_tls_files(short_tmpdir("iso"))[0]  # another CA than the issuer's
    with pytest.raises(IssuerError, match=says):
        _fetch(issuer, ca_file)


class Victim:
    """A service on this host's loopback that only the host should reach (a local admin
    port, a sidecar): counts the connections made to it, and answers none."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        # shutdown, not only close: an accept blocked in another thread would hold on.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("http://127.0.0.1:{port}/admin/keys", "plain http off the issuer's origin"),
        ("https://localhost:{port}/jwks", "of this host or its link"),
        ("https://127.0.0.1:{port}/jwks", "of this host or its link"),
    ],
)
def test_a_jwks_uri_off_the_issuers_origin_never_leads_to_this_hosts_own_services(
    issuer: Issuer, where: str, says: str
) -> None:
    # The issuer's document chooses the jwks_uri: pointed at a service on svidd's loopback
    # (or the cloud metadata address), it made svidd GET it for the issuer (SSRF).
    issuer.add_key("p1")
    victim = Victim()
    try:
        issuer.jwks_uri = where.format(port=victim.port)
        with pytest.raises(IssuerError, match=says):
            _fetch(issuer)
        assert victim.connections == 0
    finally:
        victim.close()


@pytest.mark.parametrize("member", ["issuer", "kid"])
def test_a_document_naming_a_member_twice_is_refused(issuer: Issuer, member: str) -> None:
    issuer.add_key("p1")
    issuer.twice = member
    with pytest.raises(IssuerError, match=f"names '{member}' twice"):
        _fetch(issuer)


def test_a_discovery_document_naming_its_issuer_twice_in_two_cases_is_refused(
    issuer: Issuer,
) -> None:
    # coreos/go-oidc reads the document with Go's encoding/json, which takes "Issuer" for
    # "issuer" and keeps the last: another relying party would trust another issuer's tokens.
    issuer.add_key("p1")
    issuer.twice = "Issuer"
    with pytest.raises(IssuerError, match="names 'issuer' and 'Issuer'"):
        _fetch(issuer)


def test_a_refusal_quoting_the_issuer_is_printable_text() -> None:
    # The issuer's status line is quoted in the refusal, which the logs and the ledger keep:
    # raw, its escape sequences and NUL went there as it wrote them.
    ca_file, cert, key = write_tls_files(short_tmpdir("isq"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        raw, _ = listener.accept()
        with contextlib.suppress(OSError), ctx.wrap_socket(raw, server_side=True) as conn:
            conn.recv(65536)
            conn.sendall(b"\x1b]0;owned\x07\x1b[2J\x00\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(IssuerError) as refused:
            fetch_keys(TrustedIssuer(PARTNER, url), ssl.create_default_context(cafile=ca_file))
        assert str(refused.value).isprintable()
        assert "\\x1b]0;owned\\x07" in str(refused.value)
    finally:
        thread.join(5)
        listener.close()


def _partner_down(clock: Clock) -> tuple[DiscoveredIssuers, list[str]]:
    """Issuers with PARTNER alone trusted, whose every fetch fails; and the URLs fetched."""
    calls: list[str] = []

    def failing(item: TrustedIssuer, ctx: ssl.SSLContext) -> Any:
        calls.append(item.url)
        raise IssuerError("down")

    found = DiscoveredIssuers(
        (TrustedIssuer(PARTNER, "https://partner.example"),),
        clock,
        fetch=failing,  # type: ignore[arg-type]
    )
    return found, calls


def test_refresh_is_bounded_and_a_failure_is_retried_on_the_clock() -> None:
    assert next_refresh(None) == DEFAULT_REFRESH
    assert next_refresh(5) == MIN_REFRESH
    assert next_refresh(10**9) == MAX_REFRESH
    assert next_refresh(600) == 600

    clock = FakeClock()
    found, calls = _partner_down(clock)
    assert found.refresh_due() == 0
    assert found.refresh_due() == 0  # not due again before RETRY
    assert calls == ["https://partner.example"]
    clock.advance(RETRY)
    found.refresh_due()
    assert len(calls) == 2
    assert found.get(PARTNER) is None
    # An unknown key makes the keys due at once, but not more often than WANTED_GAP.
    assert found.key_wanted(PARTNER, "k9")
    assert found.refresh_due() == 0
    assert len(calls) == 3
    clock.advance(1)
    assert not found.key_wanted(PARTNER, "k9")
    assert found.refresh_due() == 0
    assert len(calls) == 3
    clock.advance(WANTED_GAP)
    assert found.key_wanted(PARTNER, "k9")
    assert not found.key_wanted(TrustDomain.parse("other.org"), "k9")  # not an issuer's


def test_a_step_back_of_the_clock_postpones_neither_the_retry_nor_a_wanted_key() -> None:
    # The retry and WANTED_GAP are intervals: on the wall clock, a step back of an hour
    # postponed both by the hour, and tokens under the issuer's new key were refused that long.
    clock = SteppedClock(FakeClock())
    found, calls = _partner_down(clock)
    assert found.key_wanted(PARTNER, "k9")
    found.refresh_due()
    assert len(calls) == 1
    clock.offset = -3600.0  # the step back
    clock.base.advance(RETRY)
    found.refresh_due()
    assert len(calls) == 2
    clock.base.advance(WANTED_GAP)
    assert found.key_wanted(PARTNER, "k9")


def test_a_sleep_of_the_host_counts_towards_the_retry_and_a_wanted_key() -> None:
    # CLOCK_MONOTONIC stands still while the host is suspended: on it alone, the retry (and
    # the next refresh) came RETRY after waking, late by the whole sleep, and a key the
    # issuer published meanwhile could not be asked for before WANTED_GAP had passed again.
    clock = SleptClock(FakeClock())
    found, calls = _partner_down(clock)
    assert found.key_wanted(PARTNER, "k9")
    found.refresh_due()
    assert len(calls) == 1
    clock.sleep(RETRY)
    found.refresh_due()
    assert len(calls) == 2
    clock.sleep(WANTED_GAP)
    assert found.key_wanted(PARTNER, "k9")


def test_issuers_that_hang_hold_up_neither_each_other_nor_the_one_that_answers(
    issuer: Issuer,
) -> None:
    """Fetched one after the other, each hanging issuer held the next one's keys back its
    whole deadline: the last of N came after N deadlines. Side by side, every issuer's fetch
    has ended (keys in, or a failure to retry) within about one."""
    issuer.add_key("p1")
    timeout = 1.0
    silent = [SilentEndpoint() for _ in range(FETCHES_AT_ONCE)]
    hanging = tuple(
        TrustedIssuer(TrustDomain.parse(f"hang{i}.org"), s.url.rstrip("/"))
        for i, s in enumerate(silent)
    )
    found = DiscoveredIssuers(
        (*hanging, TrustedIssuer(PARTNER, issuer.url)),
        FakeClock(),
        issuer.ca_file,
        fetch=functools.partial(fetch_keys, timeout=timeout),
    )
    try:
        started = time.monotonic()
        assert found.refresh_due() == 1
        took = time.monotonic() - started
        assert all(s.held.is_set() for s in silent)
        assert took < 2 * timeout, f"the issuers' fetches took {took:.1f} s"
        assert sorted(found.get(PARTNER).keys) == ["p1"]  # type: ignore[union-attr]
        assert all(found.get(i.trust_domain) is None for i in hanging)
    finally:
        found.close()
        for endpoint in silent:
            endpoint.close()


def test_a_bad_signature_under_a_key_held_fetches_nothing(issuer: Issuer) -> None:
    issuer.add_key("p1")

    clock = FakeClock()
    found = DiscoveredIssuers(
        (TrustedIssuer(PARTNER, issuer.url),),
        clock,
        issuer.ca_file,
    )
    assert found.refresh_due() == 1
    clock.advance(WANTED_GAP)
    assert not found.key_wanted(PARTNER, "p1")  # held: the token is bad for another reason
    assert found.refresh_due() == 0
    assert found.key_wanted(PARTNER, "p2")
    assert found.refresh_due() == 1


def test_keys_that_cannot_be_audited_are_not_used(issuer: Issuer) -> None:
    issuer.add_key("p1")
    written: list[tuple[str, dict[str, Any]]] = []
    ledger_up = False

    def audit(kind: str, **fields: Any) -> None:
        if kind == "oauth_issuer_keys_changed" and not ledger_up:
            raise OSError("disk full")
        written.append((kind, fields))

    found = DiscoveredIssuers(
        (TrustedIssuer(PARTNER, issuer.url),),
        FakeClock(),
        issuer.ca_file,
        audit=audit,
    )
    assert found.refresh_due() == 0
    assert found.get(PARTNER) is None
    assert [k for k, _ in written] == ["oauth_issuer_keys_refused"]
    assert "could not be audited" in written[0][1]["reason"]
    ledger_up = True
    found._due[PARTNER] = 0.0
    assert found.refresh_due() == 1
    assert found.get(PARTNER) is not None
    assert written[-1][0] == "oauth_issuer_keys_changed"
    assert written[-1][1]["extra"]["kids"] == ["p1"]


@pytest.mark.parametrize(
    ("items", "says"),
    [
        (["partner.org"], "TRUST_DOMAIN=ISSUER_URL"),
        (["partner.org=ftp://x"], "https:// URL"),
        (["partner.org=http://partner.example"], "only on loopback"),
        (["partner.org=https://a.example", "partner.org=https://b.example"], "named twice"),
        (["spiffe://x/y=https://a.example"], "oauth_trusted_issuers"),
    ],
)
def test_bad_trusted_issuers_name_their_key(items: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match="oauth_trusted_issuers") as raised:
        parse_trusted_issuers(tuple(items))
    assert says in str(raised.value)


def test_a_trust_domain_trusted_by_a_bundle_file_gets_an_access_token(tmp_path: Path) -> None:
    # The other way to trust a domain: its keys in a file (here a JWKS), read at start.
    partner = Issuer(url="")
    partner.add_key("f1")
    jwks = partner.answer("/jwks")[1]
    bundle = tmp_path / "partner.jwks"
    bundle.write_bytes(jwks.replace(b'"use": "sig"', b'"use": "jwt-svid"'))
    with serving_oauth("otb", [RESOURCE], oauth_trusted_bundles=[f"{PARTNER}={bundle}"]) as server:
        clock = server.running.clock
        signer = JwtSigner(partner.keys["f1"], "f1", clock, int(clock.now()) + 3600)
        token = signer.sign(WORKLOAD, [server.issuer], 120).token  # no iss: its trust domain's
        assert _exchange(server, token).status_code == 200
        other = Issuer(url="")
        other.add_key("f1")
        forged = JwtSigner(other.keys["f1"], "f1", clock, int(clock.now()) + 3600)
        assert (
            _exchange(server, forged.sign(WORKLOAD, [server.issuer], 120).token).status_code == 400
        )


def test_a_ca_file_that_is_not_pem_is_a_failed_fetch_not_a_crash(
    issuer: Issuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer.add_key("p1")
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    found = DiscoveredIssuers((TrustedIssuer(PARTNER, issuer.url),), FakeClock(), bad)
    with caplog.at_level(logging.WARNING, "svid.server.oauth"):
        assert found.refresh_due() == 0
    assert found.get(PARTNER) is None
    assert "oauth_trusted_issuers_ca" in caplog.text
    assert issuer.fetches == {}


@pytest.mark.parametrize("claim", ["jti", "sub"])
def test_a_partner_token_whose_claim_looks_like_a_token_is_refused_not_a_server_error(
    issuer: Issuer, claim: str
) -> None:
    # The audit log refuses any value that looks like a JWT: a partner's jti (or a path of its
    # sub) shaped like one made the grant's audit event fail, and the client got a 500.
    from svid import sign_jws

    key = issuer.add_key("p1")
    jwt_like = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    with _serving(issuer) as server:
        wait_for(lambda: _holds(server, "p1"), 10, "the keys of p1")
        now = int(server.running.clock.now())
        claims = {
            "sub": f"{WORKLOAD}/{jwt_like}" if claim == "sub" else str(WORKLOAD),
            "aud": [server.issuer],
            "iss": issuer.url,
            "exp": now + 120,
            "iat": now,
            "jti": jwt_like if claim == "jti" else "partner-jti-1",
        }
        reply = _exchange(server, sign_jws({"kid": "p1", "typ": "JWT"}, claims, key))
        refusals = [e["decision"] for e in _audited(server, "oauth_jwt_bearer")]
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "invalid_grant"
    assert claim in reply.json()["error_description"]
    assert jwt_like not in reply.text
    assert refusals == ["deny"]  # on the record, without the value


@pytest.mark.parametrize("txn", ["jwt", "nul", "other"])
def test_a_partner_task_token_names_no_task_its_spiffe_id_does_not(
    issuer: Issuer, txn: str
) -> None:
    # A refusal names the task of a verified token (its txn), as far as the token says it. A
    # partner's txn is its own text: one shaped like a JWT failed the refusal's event (a 500,
    # nothing on record), one with a NUL the PostgreSQL ledger, and one naming another task
    # than the SPIFFE ID's put the refusal on that task's record.
    from svid import sign_jws

    key = issuer.add_key("p1")
    said = {
        "jwt": "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
        "nul": "t1\x00",
        "other": "victim",
    }[txn]
    with _serving(issuer) as server:
        wait_for(lambda: _holds(server, "p1"), 10, "the keys of p1")
        now = int(server.running.clock.now())
        claims = {
            "sub": f"{WORKLOAD}/task/t1",
            "aud": [server.issuer],
            "iss": issuer.url,
            "exp": now + 120,
            "iat": now,
            "jti": "partner-jti-1",
            "txn": said,
        }
        reply = _exchange(server, sign_jws({"kid": "p1", "typ": "JWT"}, claims, key))
        refusals = _audited(server, "oauth_jwt_bearer")
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "invalid_grant"
    assert [(e["decision"], e["agent_id"], e["task_id"]) for e in refusals] == [
        ("deny", f"{WORKLOAD}/task/t1", None)
    ]
