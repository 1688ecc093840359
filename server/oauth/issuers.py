"""Other trust domains whose JWT-SVIDs the token endpoint accepts, their keys found by OIDC
discovery, as workload identity federation for MCP (SEP-1933) expects of an authorization
server: ``<issuer>/.well-known/openid-configuration`` names the ``jwks_uri``, whose JWKS holds
the keys.

Every change of an issuer's keys is an audit event before the keys are used (if it cannot be
recorded, they are not), and so is every failed fetch.

Each issuer is fetched at start and again when its JWKS's ``Cache-Control: max-age`` runs out
(held within [MIN_REFRESH, MAX_REFRESH]), or sooner when a token names a key it did not
publish (at most once per WANTED_GAP); a failed fetch keeps the keys fetched last and is tried
again after RETRY. Until a first fetch succeeds, that trust domain's tokens are refused
(no keys). The fetch is blocking (http.client) and follows no redirect: the issuers due are
fetched side by side, in threads of their own (https_get.fetch_pool). A ``jwks_uri`` off the
issuer's own origin is the issuer's choice, not the operator's: https only, and never to an
address of this host or its link (https_get.inward).
"""

from __future__ import annotations

import http.client
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from server import https_get, strict_json
from server.errors import ConfigError
from server.input_text import shown
from server.oauth.discovery import OIDC_PATH
from server.oauth.settings import TrustedIssuer, check_issuer
from svid._bundle import USE_JWT, JwtBundle
from svid._clock import Clock, ElapsedClock
from svid._errors import BundleError
from svid._spiffe_id import TrustDomain

_log = logging.getLogger("svid.server.oauth")

TIMEOUT = 10.0
MAX_DOCUMENT_BYTES = 256 * 1024
MAX_KEYS = 64
MIN_REFRESH = 60.0
MAX_REFRESH = 3600.0
DEFAULT_REFRESH = 300.0
RETRY = 30.0
# A token signed with a key the issuer did not publish when last fetched makes its keys due at
# once (keys rotate), at most this often per issuer: unknown kids cost an attacker nothing.
WANTED_GAP = 10.0
# A JWKS served for OIDC marks its keys "sig"; one served as a SPIFFE bundle, "jwt-svid".
KEY_USES = ("sig", USE_JWT)
_DEFAULT_PORTS = {"https": 443, "http": 80}
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)\s*(?:,|$)", re.IGNORECASE)


ISSUER_KEYS_CHANGED = "oauth_issuer_keys_changed"
ISSUER_KEYS_REFUSED = "oauth_issuer_keys_refused"

# AuditLog.append: (kind, **EventDraft fields); durable when it returns.
Audit = Callable[..., object]


class IssuerError(Exception):
    """An issuer's discovery document or keys could not be fetched or were refused. Its
    message quotes the issuer's answers (a status line, a key's members): made printable
    here, as it reaches the logs and the ledger."""

    def __init__(self, message: str) -> None:
        super().__init__(shown(message))


@dataclass(frozen=True, slots=True)
class FetchedKeys:
    bundle: JwtBundle
    max_age: float | None  # from the JWKS's Cache-Control; None when it says nothing


Fetch = Callable[[TrustedIssuer, ssl.SSLContext], FetchedKeys]


def fetch_keys(
    issuer: TrustedIssuer, ctx: ssl.SSLContext, *, timeout: float = TIMEOUT
) -> FetchedKeys:
    """The issuer's keys by OIDC discovery, its two GETs within ``timeout`` together (an
    issuer slow at each would otherwise hold its fetch for twice that); IssuerError saying
    what went wrong."""
    deadline = time.monotonic() + timeout
    body, _ = _get(issuer.url + OIDC_PATH, ctx, timeout, issuer.url)
    try:
        # Parsed once, and one way only (see _refuse_member_twice).
        doc = strict_json.loads(body)
    except strict_json.MemberTwiceError as twice:
        raise IssuerError(
            f"{issuer.url}: an object of its discovery document {twice.said}"
        ) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise IssuerError(f"{issuer.url}: the discovery document is not JSON") from None
    if not isinstance(doc, dict):
        raise IssuerError(f"{issuer.url}: the discovery document is not a JSON object")
    # OpenID Connect Discovery 1.0 §4.3: the document must name exactly the issuer asked for.
    if doc.get("issuer") != issuer.url:
        raise IssuerError(
            f"{issuer.url}: the discovery document names issuer "
            f"{str(doc.get('issuer'))[:200]!r}, not this one"
        )
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise IssuerError(f"{issuer.url}: the discovery document has no jwks_uri")
    try:
        check_issuer(jwks_uri, "jwks_uri")  # https (http on loopback only), a host
    except ConfigError as exc:
        raise IssuerError(f"{issuer.url}: {exc}") from None
    # The issuer's document chooses this URL, not the operator: elsewhere than the issuer's
    # own origin it was a GET from svidd to wherever the issuer liked (SSRF): a plain-http
    # service on our loopback, the cloud metadata service by a name resolving to it.
    elsewhere = _origin(jwks_uri) != _origin(issuer.url)
    if elsewhere and urlsplit(jwks_uri).scheme != "https":
        raise IssuerError(
            f"{issuer.url}: jwks_uri {jwks_uri[:200]!r} is plain http off the issuer's origin"
        )
    left = deadline - time.monotonic()
    if left <= 0:
        raise IssuerError(f"{issuer.url}: no time left for its JWKS within the {timeout:g} s")
    # The JWKS's host is the one the issuer's document names: its lookups count against
    # the issuer too, so names it makes up to hang hold its own room only.
    keys, max_age = _get(jwks_uri, ctx, left, issuer.url, outward=elsewhere)
    _refuse_member_twice(issuer, "JWKS", keys)
    try:
        bundle = JwtBundle.parse_jwks(issuer.trust_domain, keys, uses=KEY_USES)
    except BundleError as exc:
        raise IssuerError(f"{issuer.url}: {exc}") from None
    if not bundle.keys:
        raise IssuerError(f"{issuer.url}: its JWKS holds no signing key svidd can use")
    if len(bundle.keys) > MAX_KEYS:
        raise IssuerError(f"{issuer.url}: its JWKS holds {len(bundle.keys)} keys (> {MAX_KEYS})")
    return FetchedKeys(bundle, max_age)


def _refuse_member_twice(issuer: TrustedIssuer, what: str, body: bytes) -> None:
    """Read one way only (server/strict_json.py): two "issuer" members, or two "kid" in a
    key, mean one thing here and another to the issuer's other relying parties."""
    twice = strict_json.member_twice(body)
    if twice is not None:
        raise IssuerError(f"{issuer.url}: an object of its {what} {twice}")


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port (the default one named): check_issuer has parsed the URL."""
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme)


def _get(
    url: str, ctx: ssl.SSLContext, timeout: float, party: str, *, outward: bool = False
) -> tuple[bytes, float | None]:
    try:
        reply = https_get.get(
            url,
            context=ctx,
            limit=MAX_DOCUMENT_BYTES,
            timeout=timeout,
            party=party,
            outward=outward,
        )
    except (OSError, http.client.HTTPException) as exc:
        raise IssuerError(f"{url}: {type(exc).__name__}: {exc}") from None
    if reply.status != 200:  # a redirect too: the URL is the one configured or published
        raise IssuerError(f"{url}: HTTP {reply.status}")
    if len(reply.body) > MAX_DOCUMENT_BYTES:
        raise IssuerError(f"{url}: the document is over {MAX_DOCUMENT_BYTES} bytes")
    found = _MAX_AGE.search(reply.headers.get("Cache-Control") or "")
    return reply.body, float(found.group(1)) if found else None


def next_refresh(max_age: float | None) -> float:
    """Seconds until the keys are fetched again: the JWKS's max-age, held within bounds."""
    if max_age is None:
        return DEFAULT_REFRESH
    return min(max(max_age, MIN_REFRESH), MAX_REFRESH)


class DiscoveredIssuers:
    """The keys of the trusted issuers, each fetched when due (``refresh_due``)."""

    def __init__(
        self,
        issuers: tuple[TrustedIssuer, ...],
        clock: Clock,
        ca_file: Path | None = None,
        fetch: Fetch = fetch_keys,
        audit: Audit | None = None,
    ) -> None:
        self._issuers = issuers
        self._audit = audit
        self._clock = clock
        # The due times' clock: it counts a sleep of the host (by the wall clock's jump),
        # which CLOCK_MONOTONIC does not, so a fetch due during a suspend is made on waking.
        self._elapsed = ElapsedClock(clock)
        self._fetch = fetch
        self._ca_file = ca_file
        self._ctx: ssl.SSLContext | None = None  # made at the first fetch: none without issuers
        self._lock = threading.Lock()
        self._bundles: dict[TrustDomain, JwtBundle] = {}
        # When each issuer's keys are due, and when a key was last wanted: on the monotonic
        # clock, as both are intervals (a refresh, a retry, WANTED_GAP); on the wall clock a
        # step back postponed them by the step.
        self._due: dict[TrustDomain, float] = {i.trust_domain: 0.0 for i in issuers}
        self._wanted: dict[TrustDomain, float] = {}
        self._pool = https_get.fetch_pool("issuer-fetch")

    def close(self) -> None:
        """Let the fetch threads go (at stop): a fetch under way ends at its deadline."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __bool__(self) -> bool:
        return bool(self._issuers)

    def get(self, td: TrustDomain) -> JwtBundle | None:
        return self._bundles.get(td)

    def issuers(self) -> dict[str, TrustDomain]:
        """Issuer URLs, as their tokens carry them in ``iss``, and their trust domains."""
        return {i.url: i.trust_domain for i in self._issuers}

    def key_wanted(self, td: TrustDomain, kid: str) -> bool:
        """A token of ``td`` named key ``kid``, which its issuer's keys do not hold: fetch them
        at the next look, unless that was asked less than WANTED_GAP ago. True if it will be."""
        now = self._elapsed.monotonic()
        with self._lock:
            if td not in self._due:  # not a discovered issuer's trust domain
                return False
            bundle = self._bundles.get(td)
            if bundle is not None and kid in bundle.keys:
                return False  # the key is there: the token is bad for another reason
            if now < self._wanted.get(td, -WANTED_GAP) + WANTED_GAP:
                return False
            self._wanted[td] = now
            self._due[td] = min(self._due[td], now)
            return True

    def refresh_due(self) -> int:
        """Fetch every issuer whose keys are due (all of them, the first time), side by side
        (https_get.FETCHES_AT_ONCE at most), each within its own deadline: issuers that hang hold up
        only their own keys, for one deadline, not every issuer after them. How many were
        fetched. Blocking, until every fetch has ended: a worker thread's job."""
        now = self._elapsed.monotonic()
        with self._lock:
            due = [i for i in self._issuers if self._due[i.trust_domain] <= now]
        fetches = [self._pool.submit(self._refresh, issuer) for issuer in due]
        wait(fetches)
        # A fetch that raised (a bug: failed fetches are logged and retried) raises here, after
        # the others have ended and taken their keys.
        return sum(f.result() for f in fetches)

    def _refresh(self, issuer: TrustedIssuer) -> bool:
        td = issuer.trust_domain
        try:
            keys = self._fetch(issuer, self._context())
            changed = self._bundles.get(td) != keys.bundle
            if changed and self._audit is not None:
                self._audit_change(issuer, keys.bundle)
        except IssuerError as exc:
            held = "keeping the keys fetched before" if td in self._bundles else "no keys yet"
            _log.warning(
                "trusted issuer %s: fetching its keys failed (%s); %s, trying again in %.0f s",
                issuer.url,
                exc,
                held,
                RETRY,
            )
            if self._audit is not None:
                try:
                    self._audit(
                        ISSUER_KEYS_REFUSED,
                        reason=str(exc)[:500],
                        extra={"trust_domain": td.name, "issuer": issuer.url},
                    )
                except Exception:  # the refusal stands; only its record is missing
                    _log.exception(
                        "trusted issuer %s: the failed fetch was not audited", issuer.url
                    )
            with self._lock:
                self._due[td] = self._elapsed.monotonic() + RETRY
            return False
        with self._lock:
            # The same keys keep the same object: the verifier's key checks stay memoised.
            if changed:
                self._bundles[td] = keys.bundle
            self._due[td] = self._elapsed.monotonic() + next_refresh(keys.max_age)
        if changed:
            _log.info(
                "trusted issuer %s: %d keys for %s (%s)",
                issuer.url,
                len(keys.bundle.keys),
                td,
                ", ".join(sorted(keys.bundle.keys))[:200],
            )
        return True

    def _context(self) -> ssl.SSLContext:
        with self._lock:  # the fetch threads share one context
            return self._made_context()

    def _made_context(self) -> ssl.SSLContext:
        if self._ctx is None:
            try:
                ca_file = self._ca_file
                ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            except (OSError, ssl.SSLError) as exc:  # an unreadable or non-PEM CA file
                raise IssuerError(f"oauth_trusted_issuers_ca: {exc}") from None
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ctx = ctx
        return self._ctx

    def _audit_change(self, issuer: TrustedIssuer, bundle: JwtBundle) -> None:
        """On the ledger before the keys are used: keys nobody recorded never verify a token."""
        assert self._audit is not None
        kids = sorted(bundle.keys)
        try:
            self._audit(
                ISSUER_KEYS_CHANGED,
                reason=f"{len(kids)} keys from {issuer.url}"[:500],
                extra={
                    "trust_domain": issuer.trust_domain.name,
                    "issuer": issuer.url,
                    "kids": kids,
                },
            )
        except Exception as exc:
            raise IssuerError(f"{issuer.url}: its new keys could not be audited ({exc})") from None
