"""Federation relationships and foreign bundles: kept, refreshed, handed to the state.

Each relationship's foreign bundle is fetched again at its refresh hint (server/federation/
fetch.py). A failed fetch keeps the last good bundle in service and is retried sooner; a bundle
that is refused (wrong trust domain, endpoint not authenticated) never replaces it. Every
change of a foreign bundle is stored in one transaction with the audit event recording it
(AuditLog.append_storing), then reaches the state, whose change log takes it to the agents.
Static relationships come from the configuration and cannot be changed through the API.

Several servers on one datastore: every relationship and bundle write names its trust domain
in the change feed, and each server's follower (server/replication.py) hands what is stored
to `apply_stored`: the stored rows are the truth, adopted as they are (a bundle pushed to
this server's agents as a local change would be), except trust domains this server wrote
itself meanwhile, which are read again. The scheduled fetch of a relationship is claimed
through a datastore lease per trust domain (`federation-fetch:<td>`, held for two refresh
intervals and renewed by its holder's next fetch), so one server fetches each endpoint and
the others adopt its result from the feed instead of all fetching in lockstep; a holder that
dies lets the lease lapse and the next server due takes it. A fetch somebody asked for (an
admin refresh, a relationship created or changed, a bundle set by hand) runs where it was
asked, lease or not. A fetched bundle whose spiffe_sequence is lower than the one held is
stale (a lagging endpoint replica, a replay of older keys) and is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from server.audit.errors import LedgerError
from server.audit.log import AuditLog
from server.datastore.base import DataStore
from server.datastore.errors import BundleRefusedError
from server.datastore.records import (
    HTTPS_SPIFFE,
    HTTPS_WEB,
    BundleWrite,
    FederationRelationship,
    ForeignBundle,
)
from server.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from server.federation.errors import BundleNotStoredError, FederationError
from server.federation.fetch import check_bundle, endpoint_trust_domain, fetch_bundle
from server.https_get import FETCHES_AT_ONCE, fetch_pool, holds_userinfo
from server.input_text import refuse_unprintable
from svid._backoff import Retry
from svid._bundle import SpiffeBundle
from svid._clock import Clock, ElapsedClock
from svid._daemon_config import expand_path
from svid._errors import SpiffeIdError
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._waits import set_within

_log = logging.getLogger("svid.server.federation")
DEFAULT_REFRESH = 300
# A foreign endpoint's hint below this is taken as this (SPIRE's bundle client floors it at a
# minute too): one announcing 1 s and serving a new bundle on every fetch wrote a
# federated_bundle_changed audit row a second. A change still takes effect within this.
MIN_REFRESH = 60
# The hint is a hint (SPIFFE Trust Domain and Bundle 4.1.2): one answer announcing years would
# stop the fetches, and hold the fetch lease, that long, and keys the foreign domain drops would
# stay trusted here. An hour is cheap to poll and bounds how late such a drop arrives.
MAX_REFRESH = 3600
# After a failed fetch, try again after this long (or the hint, if shorter), doubling after each
# further failure up to MAX_RETRY: an endpoint down for a day was fetched, and the failure put on
# the ledger, 17,000 times.
RETRY = 5.0
MAX_RETRY = 300.0
BUNDLE_CHANGED = "federated_bundle_changed"
SET_BY_HAND = "set"  # the source of a bundle set through the admin API
BUNDLE_REFUSED = "federated_bundle_refused"

# Scheduled fetches run at once (FETCHES_AT_ONCE at most), each relationship's in a task of its
# own: one endpoint that answers slowly holds its own relationship up to the whole-GET deadline,
# not the others.

# An operator's refresh (the admin API) is waited for: it fetches in a lane of its own, not
# behind FETCHES_AT_ONCE scheduled fetches of endpoints that hang (each up to its deadline).
ASKED_AT_ONCE = 2

LEASE_PREFIX = "federation-fetch:"
# A relationship another server wrote is due here this much later (seconds): see apply_stored.
FOLLOWED_DELAY = 1.0

Fetch = Callable[[FederationRelationship, SpiffeBundle | None], SpiffeBundle]


@dataclass(frozen=True)
class Stored:
    """The federation rows as the datastore holds them (read by the change-feed follower)."""

    relationships: dict[str, FederationRelationship] = field(default_factory=dict)
    bundles: dict[str, ForeignBundle] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refreshed:
    changed: bool
    bundle: SpiffeBundle


def parse_trust_domain(text: str, field_name: str = "trust_domain") -> TrustDomain:
    try:
        return TrustDomain.parse(text)
    except SpiffeIdError as exc:
        raise InvalidRequestError(f"{field_name}: {exc}") from None


MAX_URL_BYTES = 2048  # the length a SPIFFE ID may have
MAX_CA_FILE_BYTES = 4096  # Linux's PATH_MAX


def validate_relationship(rel: FederationRelationship, own: TrustDomain) -> FederationRelationship:
    td = parse_trust_domain(rel.trust_domain)
    if td == own:
        raise InvalidRequestError(f"trust_domain: {td} is our own trust domain")
    # A NUL in ca_file failed every fetch as an unknown error (ValueError from ssl: INTERNAL
    # to the operator, a traceback a retry) and either field on PostgreSQL as a storage
    # failure; a control character in the URL reached the refusals the ledger keeps.
    refuse_unprintable("bundle_endpoint_url", rel.endpoint_url)
    refuse_unprintable("ca_file", rel.ca_file)
    # Logged, and put on the ledger with each refusal, at every failed fetch: a 3 MB URL was
    # stored as given, and two of them put `federation list` past gRPC's 4 MiB reply limit.
    for name, value, limit in (
        ("bundle_endpoint_url", rel.endpoint_url, MAX_URL_BYTES),
        ("ca_file", rel.ca_file, MAX_CA_FILE_BYTES),
    ):
        if len(value.encode()) > limit:
            raise InvalidRequestError(f"{name}: at most {limit} bytes")
    if not rel.endpoint_url.startswith("https://"):
        raise InvalidRequestError(
            f"bundle_endpoint_url: {rel.endpoint_url!r} must be an https:// URL"
        )
    _check_authority(rel.endpoint_url)
    if rel.profile not in (HTTPS_WEB, HTTPS_SPIFFE):
        raise InvalidRequestError(f"profile: {rel.profile!r}; one of {HTTPS_WEB}, {HTTPS_SPIFFE}")
    endpoint_id = ""
    if rel.profile == HTTPS_SPIFFE:
        try:
            endpoint_id = str(SpiffeId.parse(rel.endpoint_spiffe_id))
        except SpiffeIdError as exc:
            raise InvalidRequestError(f"endpoint_spiffe_id: {exc} (https_spiffe)") from None
    elif rel.endpoint_spiffe_id:
        raise InvalidRequestError("endpoint_spiffe_id: only for the https_spiffe profile")
    if rel.ca_file and rel.profile != HTTPS_WEB:
        raise InvalidRequestError("ca_file: only for the https_web profile")
    if rel.ca_file and not Path(rel.ca_file).is_absolute():
        # Read at each fetch by the server, from its own working directory: a caller's
        # `./ca.pem` named another file, or none (the CLI sends its --ca-file made absolute).
        raise InvalidRequestError(
            f"ca_file: {rel.ca_file!r} must be an absolute path (a relative one would be read "
            "from the server's working directory, not the caller's)"
        )
    return replace(rel, trust_domain=td.name, endpoint_spiffe_id=endpoint_id)


def _check_authority(url: str) -> None:
    """A bundle endpoint URL names a host and no userinfo (SPIFFE Federation 5.2.1.1, 5.2.2.1):
    what it carries would be logged and put on the ledger with the URL, so it is not echoed."""
    if holds_userinfo(url):
        raise InvalidRequestError("bundle_endpoint_url: must not hold userinfo (user@ or user:pw@)")
    try:
        host = urlsplit(url).hostname
    except ValueError:  # an unclosed IPv6 bracket
        host = None
    if not host:
        raise InvalidRequestError(f"bundle_endpoint_url: {url!r} names no host")
    # Read only when connecting: stored as given, a port past 65535 (or not a number) failed
    # every fetch as an unknown error (ValueError: INTERNAL, a traceback at each retry).
    try:
        port = urlsplit(url).port
    except ValueError:
        port = 0
    if port == 0:
        raise InvalidRequestError(f"bundle_endpoint_url: {url!r} has a port not in 1-65535")


def as_read_here(rel: FederationRelationship) -> FederationRelationship:
    """A stored relationship as this server reads it: a relative ca_file (stored by a server
    from before the admin API refused one) made absolute from this server's working directory,
    the file each fetch read. Kept relative, the relationship could not be updated (`federation
    update` sends back what it shows, and a relative ca_file is now refused) and was shown as a
    path whose directory no one could tell."""
    if rel.ca_file and not Path(rel.ca_file).is_absolute():
        return replace(rel, ca_file=str(Path(rel.ca_file).absolute()))
    return rel


def parse_static(text: str, own: TrustDomain) -> FederationRelationship:
    """A relationship of the configuration: "<td> <profile> <url> [<endpoint ID | CA file>]"."""
    parts = text.split()
    if len(parts) not in (3, 4):
        raise InvalidRequestError(
            f"federation_relationships: {text!r}: want '<trust domain> <profile> <url> "
            "[<endpoint SPIFFE ID (https_spiffe) | CA file (https_web)>]'"
        )
    td, profile, url = parts[:3]
    extra = parts[3] if len(parts) == 4 else ""
    if profile == HTTPS_WEB and extra:
        # As every path of the config (and as SPIRE's): a leading ~ expanded, a relative path
        # taken from the server's working directory, once, at start: named absolute in the
        # relationship and in every fetch error, never re-read from wherever a fetch runs.
        field_name = f"federation_relationships: {td}: ca_file"
        extra = str(expand_path(field_name, extra, InvalidRequestError).absolute())
    rel = FederationRelationship(
        td,
        url,
        profile,
        endpoint_spiffe_id=extra if profile == HTTPS_SPIFFE else "",
        ca_file=extra if profile == HTTPS_WEB else "",
    )
    return validate_relationship(rel, own)


def is_stale(held: SpiffeBundle | None, fetched: SpiffeBundle) -> bool:
    """Whether a fetched bundle is older than the one held (by spiffe_sequence, when both
    carry one): another server's newer fetch, adopted from the feed, must not be undone."""
    return held is not None and bool(fetched.sequence) and fetched.sequence < held.sequence


def lease_ttl(bundle: SpiffeBundle | None, floor: float = MIN_REFRESH) -> int:
    """How long a fetch claim lasts: past the holder's next fetch (the hint, or the retry
    after a failure, which is sooner), so a live holder renews it before it lapses."""
    return int(2 * next_refresh(bundle, ok=True, floor=floor)) + 5


def next_refresh(
    bundle: SpiffeBundle | None, ok: bool, retry: float = RETRY, floor: float = MIN_REFRESH
) -> float:
    """Seconds until the next fetch: the bundle's refresh hint (DEFAULT_REFRESH without one),
    within `floor` and MAX_REFRESH; after a failure `retry` if that is sooner. A failure
    installs nothing, so bundle changes stay at least `floor` apart either way."""
    held = bundle.refresh_hint if bundle is not None and bundle.refresh_hint else DEFAULT_REFRESH
    hint = float(min(MAX_REFRESH, max(floor, held)))
    return hint if ok else min(hint, retry)


class FederationService:
    def __init__(
        self,
        *,
        own: TrustDomain,
        datastore: DataStore,
        audit: AuditLog,
        clock: Clock,
        publish: Callable[[Mapping[str, SpiffeBundle]], None],
        static: tuple[FederationRelationship, ...] = (),
        fetch: Fetch = fetch_bundle,
        holder: str = "",
        min_refresh: float = MIN_REFRESH,
    ) -> None:
        """`min_refresh`: the floor on a foreign endpoint's refresh hint (see MIN_REFRESH)."""
        self._own = own
        self._min_refresh = min_refresh
        self._datastore = datastore
        self._audit = audit
        self._clock = clock
        # The due times' clock: it counts a sleep of the host (by the wall clock's jump),
        # which CLOCK_MONOTONIC does not, so a fetch due during a suspend is made on waking.
        self._elapsed = ElapsedClock(clock)
        self._publish = publish
        self._fetch = fetch
        self._static = {r.trust_domain: r for r in static}
        self._relationships: dict[str, FederationRelationship] = {}
        self._bundles: dict[str, SpiffeBundle] = {}
        self._updated: dict[str, int] = {}  # when each foreign bundle last changed (unix s)
        # When each relationship's scheduled fetch is due, on the monotonic clock: the delay
        # is an interval (a refresh hint, a retry), and on the wall clock a step back postponed
        # the fetch by the step.
        self._due: dict[str, float] = {}
        self._retries: dict[str, Retry] = {}  # relationships whose last fetch failed
        self._wake = asyncio.Event()
        # How many times each relationship's next fetch was scheduled (see _reschedule).
        self._schedules: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Scheduled fetches someone asked for here: they skip the lease.
        self._asked: set[str] = set()
        # Without a holder name (one server, tests) every scheduled fetch runs.
        self._holder = holder
        self._claimed: set[str] = set()
        # Relationships another server deleted whose fetch lease this server still holds: let
        # go by `let_go_deleted` (apply_stored, which finds them, does not wait on the store).
        self._deleted_elsewhere: set[str] = set()
        # Local writes, numbered, by trust domain: what the follower must not undo; those it
        # has read past are dropped (apply_stored).
        self._writes = 0
        self._written: dict[str, int] = {}
        # Scheduled fetches under way (run concurrently, FETCHES_AT_ONCE at most).
        self._running: dict[str, asyncio.Task[None]] = {}
        # For tests and metrics: fetches made by this server.
        self.fetches = 0
        # Closed by close().
        self._fetch_pool = fetch_pool("federation-fetch")
        self._asked_pool = fetch_pool("federation-asked", ASKED_AT_ONCE)

    def close(self) -> None:
        """Let the fetch threads go (at stop): a fetch under way ends at its deadline."""
        for pool in (self._fetch_pool, self._asked_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def load(self) -> None:
        """Read relationships and bundles from the datastore (start-up; synchronous)."""
        stored = self.read_stored()  # read as the follower reads them (as_read_here)
        self._relationships = {**stored.relationships, **self._static}
        for row in stored.bundles.values():
            try:
                td = TrustDomain.parse(row.trust_domain)
                self._bundles[td.name] = SpiffeBundle.parse(td, row.bundle)
                self._updated[td.name] = row.updated_at
            except Exception:
                _log.exception("stored foreign bundle unreadable", extra={"td": row.trust_domain})
        self._due = dict.fromkeys(self._relationships, self._elapsed.monotonic())
        self._publish(dict(self._bundles))

    # -- reads ----------------------------------------------------------------------------------

    def relationships(self) -> list[tuple[FederationRelationship, bool]]:
        """(relationship, static) by trust domain."""
        return [(r, td in self._static) for td, r in sorted(self._relationships.items())]

    def relationship(self, trust_domain: str) -> tuple[FederationRelationship, bool]:
        td = parse_trust_domain(trust_domain).name
        rel = self._relationships.get(td)
        if rel is None:
            raise NotFoundError(f"no federation relationship with {td}")
        return rel, td in self._static

    def bundles(self) -> dict[str, SpiffeBundle]:
        return dict(self._bundles)

    def updated_at(self, trust_domain: str) -> int:
        return self._updated.get(trust_domain, 0)

    def next_fetch(self, trust_domain: str) -> float | None:
        """When (clock time) the relationship's scheduled fetch is due; None: not scheduled."""
        due = self._due.get(trust_domain)
        return None if due is None else self._clock.now() + (due - self._elapsed.monotonic())

    def bundle(self, trust_domain: str) -> SpiffeBundle:
        td = parse_trust_domain(trust_domain).name
        found = self._bundles.get(td)
        if found is None:
            raise NotFoundError(f"no bundle for foreign trust domain {td}")
        return found

    # -- relationships --------------------------------------------------------------------------

    def _not_static(self, td: str) -> None:
        if td in self._static:
            raise PermissionDeniedError(
                f"the relationship with {td} comes from the configuration file: change it there"
            )

    async def create(self, rel: FederationRelationship) -> FederationRelationship:
        return await self._store(self._datastore.create_relationship, rel)

    async def update(self, rel: FederationRelationship) -> FederationRelationship:
        return await self._store(self._datastore.update_relationship, rel)

    async def _store(
        self,
        write: Callable[[FederationRelationship], FederationRelationship],
        rel: FederationRelationship,
    ) -> FederationRelationship:
        """Check `rel`, write it, and fetch its bundle now."""
        rel = validate_relationship(rel, self._own)
        self._not_static(rel.trust_domain)
        stored = await asyncio.to_thread(write, rel)
        self._wrote(stored.trust_domain)
        self._relationships[stored.trust_domain] = stored
        self._schedule(stored.trust_domain, 0, asked=True)
        return stored

    async def delete(self, trust_domain: str) -> None:
        td = parse_trust_domain(trust_domain).name
        self._not_static(td)
        await asyncio.to_thread(self._datastore.delete_relationship, td)
        self._wrote(td)
        self._forget(td)
        await self._let_go(td)

    def _forget(self, td: str) -> None:
        self._relationships.pop(td, None)
        self._due.pop(td, None)
        self._asked.discard(td)
        self._forget_fetches(td)

    def _forget_fetches(self, td: str) -> None:
        """What fetches of `td` kept, its relationship gone: else each trust domain ever
        federated with keeps some (_written stays until the follower reads past it). A lock a fetch
        holds stays, so that a relationship made again meanwhile does not fetch beside it:
        that fetch lets go of it at its end (_let_go)."""
        self._schedules.pop(td, None)
        self._retries.pop(td, None)
        lock = self._locks.get(td)
        if lock is not None and not lock.locked():
            del self._locks[td]

    async def _let_go(self, td: str) -> None:
        """After a delete, or a fetch that ended after one: unless `td` was made again, drop
        what its fetches kept and release its fetch lease (else a row per trust domain ever
        deleted, until a clean stop; one deleted through another server lapses there)."""
        if td in self._relationships:
            return
        self._forget_fetches(td)
        if td in self._claimed:
            self._claimed.discard(td)
            with contextlib.suppress(Exception):  # not released, it lapses on its own
                await asyncio.to_thread(
                    self._datastore.release_lease, LEASE_PREFIX + td, self._holder
                )

    def _wrote(self, td: str) -> None:
        self._writes += 1
        self._written[td] = self._writes

    # -- bundles --------------------------------------------------------------------------------

    async def set_bundle(self, trust_domain: str, body: bytes) -> SpiffeBundle:
        """Bootstrap (or replace) a foreign bundle by hand."""
        td = parse_trust_domain(trust_domain)
        if td == self._own:
            raise InvalidRequestError(f"trust_domain: {td} is our own trust domain")
        try:
            bundle = check_bundle(td, body)
        except FederationError as exc:
            raise InvalidRequestError(f"bundle: {exc}") from None
        try:
            await self._install(bundle, source=SET_BY_HAND)
        except BundleNotStoredError as exc:
            # An operator's bundle the store refused: on the ledger as a refusal.
            await self._record_refused(td.name, exc)
            raise
        # A relationship waiting for its first bundle (https_spiffe needs one to authenticate
        # the endpoint) fetches now rather than at its retry.
        self._schedule(td.name, 0, asked=True)
        return bundle

    async def delete_bundle(self, trust_domain: str) -> None:
        """Delete the foreign bundle with the event recording its removal, in one transaction
        (as `_install` stores one): a server dying between the two left a removal no ledger
        holds. LedgerError when it cannot be recorded: then the bundle stays, here and stored."""
        td = parse_trust_domain(trust_domain).name
        try:
            await asyncio.to_thread(
                self._audit.append_storing,
                BundleWrite.removal(td),
                BUNDLE_CHANGED,
                extra={"trust_domain": td},
            )
        except LedgerError as exc:
            refused = exc.__cause__
            if isinstance(refused, BundleRefusedError) and td in refused.missing:
                raise NotFoundError(f"no bundle for foreign trust domain {td}") from None
            raise
        self._wrote(td)
        self._bundles.pop(td, None)
        self._updated.pop(td, None)
        self._publish(dict(self._bundles))

    async def _install(self, bundle: SpiffeBundle, source: str) -> bool:
        """Store the bundle and put its change on the ledger, in one transaction, then serve
        it: no server, this one or one following the feed, ever finds a bundle stored whose
        change is not recorded, and a bundle the store refuses records nothing (its caller
        records the refusal instead)."""
        td = bundle.trust_domain.name
        if self._bundles.get(td) == bundle:
            return False
        row = ForeignBundle(td, bundle.to_json(), int(self._clock.now()), bundle.sequence)
        await self._store_recorded(row, bundle, source)
        self._wrote(td)
        self._bundles[td] = bundle
        self._updated[td] = row.updated_at
        self._publish(dict(self._bundles))
        _log.info("foreign bundle changed", extra={"td": td, "sequence": bundle.sequence})
        return True

    async def _store_recorded(self, row: ForeignBundle, bundle: SpiffeBundle, source: str) -> None:
        """Store the row with the event recording its change (AuditLog.append_storing). Set by
        hand, it stands; fetched, it is not stored over a higher sequence that another server
        stored meanwhile (this server's copy lagging the feed): an older bundle from a lagging
        endpoint replica would be adopted by every server. FederationError when it is not
        stored, and then nothing is recorded."""
        td = row.trust_domain
        write = BundleWrite(row, over_newer=source == SET_BY_HAND)
        try:
            await asyncio.to_thread(
                self._audit.append_storing,
                write,
                BUNDLE_CHANGED,
                extra={
                    "trust_domain": td,
                    "sequence": bundle.sequence,
                    "source": source,
                    "x509_authorities": len(bundle.x509_authorities),
                    "jwt_authorities": len(bundle.jwt_authorities),
                },
            )
        except Exception as exc:
            if isinstance(exc.__cause__, BundleRefusedError):  # the ledger's LedgerError
                raise FederationError(
                    f"{td}: bundle endpoint served spiffe_sequence {row.sequence}, older than "
                    "the one another server stored"
                ) from None
            # Whatever else the store or the ledger raised (an outage, a driver's own error
            # for a value it cannot hold): a refused refresh, backed off and its refusal put on
            # the ledger, not an unknown error retried every few seconds.
            _log.error("foreign bundle not stored", extra={"td": td}, exc_info=True)
            raise BundleNotStoredError(f"{td}: the bundle could not be stored") from exc

    async def refresh(self, trust_domain: str) -> Refreshed:
        """Fetch the relationship's bundle now, for an operator (its own lane, ASKED_AT_ONCE);
        FederationError (last good kept) on failure."""
        try:
            return await self._refresh(trust_domain, self._asked_pool)
        finally:
            with contextlib.suppress(InvalidRequestError):  # a malformed name: nothing kept
                await self._let_go(parse_trust_domain(trust_domain).name)

    async def _refresh(self, trust_domain: str, pool: ThreadPoolExecutor) -> Refreshed:
        """Fetch the relationship's bundle in a thread of `pool`, install it if it changed,
        and schedule the next fetch."""
        rel, _ = self.relationship(trust_domain)
        td = rel.trust_domain
        lock = self._locks.setdefault(td, asyncio.Lock())
        async with lock:
            known = self._bundles.get(td)
            asked = self._schedules.get(td, 0)
            self.fetches += 1
            try:
                fetched = await asyncio.get_running_loop().run_in_executor(
                    pool,
                    functools.partial(
                        contextvars.copy_context().run,
                        self._fetch,
                        rel,
                        self._endpoint_bundle(rel),
                    ),
                )
                if is_stale(self._bundles.get(td), fetched):
                    raise FederationError(
                        f"{td}: bundle endpoint served spiffe_sequence {fetched.sequence}, "
                        f"older than the {self._bundles[td].sequence} held"
                    )
                changed = await self._install(fetched, source=rel.endpoint_url)
            except FederationError as exc:
                retry = self._failed(td)
                self._reschedule(td, asked, self._next(known, ok=False, retry=retry))
                _log.warning("foreign bundle not refreshed", extra={"td": td, "error": str(exc)})
                await self._record_refused(td, exc)
                raise
            self._retries.pop(td, None)
            self._reschedule(td, asked, self._next(fetched))
            return Refreshed(changed, fetched)

    def _failed(self, td: str) -> float:
        """The wait before `td`'s next fetch after one more failure in a row (backed off)."""
        return self._retries.setdefault(td, Retry(RETRY, MAX_RETRY)).failed()

    async def _record_refused(self, trust_domain: str, exc: Exception) -> None:
        """A refused bundle on the ledger, best effort: the refusal itself is what the caller
        raises, whether or not it could be recorded."""
        with contextlib.suppress(Exception):
            await asyncio.to_thread(
                self._audit.append,
                BUNDLE_REFUSED,
                reason=str(exc)[:500],
                extra={"trust_domain": trust_domain},
            )

    def _endpoint_bundle(self, rel: FederationRelationship) -> SpiffeBundle | None:
        """The bundle that authenticates the relationship's endpoint: for https_spiffe, that of
        the endpoint ID's trust domain, which need not be the one whose bundle it serves."""
        if rel.profile != HTTPS_SPIFFE:
            return self._bundles.get(rel.trust_domain)
        return self._bundles.get(endpoint_trust_domain(rel).name)

    def _next(self, bundle: SpiffeBundle | None, *, ok: bool = True, retry: float = RETRY) -> float:
        return next_refresh(bundle, ok, retry, self._min_refresh)

    def _reschedule(self, td: str, asked: int, delay: float) -> None:
        """Schedule the next fetch, unless a fetch was asked for while this one ran (a bundle
        set by hand, the relationship changed): that one stands. Told by a count of
        schedulings, not by the due time: one asked "now" at the same clock reading as the
        running fetch's was due looked like no ask at all, and was lost to the retry."""
        if self._schedules.get(td, 0) == asked:
            self._schedule(td, delay)

    def _schedule(self, td: str, delay: float, *, asked: bool = False) -> None:
        if td in self._relationships:
            self._schedules[td] = self._schedules.get(td, 0) + 1
            self._due[td] = self._elapsed.monotonic() + delay
            if asked:
                self._asked.add(td)
            self._wake.set()

    async def _claim(self, td: str) -> bool:
        """Whether this server makes the scheduled fetch of `td`: it holds (or now takes) the
        relationship's fetch lease, or the fetch was asked for here (it claims the lease too,
        so the others stand back, but fetches either way)."""
        asked = td in self._asked
        self._asked.discard(td)
        if not self._holder:
            return True
        try:
            got = await asyncio.to_thread(
                self._datastore.acquire_lease,
                LEASE_PREFIX + td,
                self._holder,
                int(self._clock.now()),
                lease_ttl(self._bundles.get(td), self._min_refresh),
            )
        except Exception:
            # The datastore is down: fetching anyway keeps the bundle fresh; the write of
            # what it fetched fails on its own if the store still is.
            _log.exception("fetch lease not read; fetching anyway", extra={"td": td})
            return True
        if got:
            self._claimed.add(td)
        else:
            self._claimed.discard(td)
        return got or asked

    def release_leases(self) -> None:
        """Hand every fetch lease over at once (a clean shutdown; blocking)."""
        for td in sorted(self._claimed):
            with contextlib.suppress(Exception):
                self._datastore.release_lease(LEASE_PREFIX + td, self._holder)
        self._claimed.clear()

    # -- following other servers (the change feed) ---------------------------------------------

    def follow_mark(self) -> int:
        """Before the follower reads the store: local writes after this mark win over it."""
        return self._writes

    def read_stored(self) -> Stored:
        """The stored relationships and bundles (blocking; the follower's thread)."""
        return Stored(
            # As load() reads them (it calls this), or a relative ca_file differed from memory
            # at each read.
            {r.trust_domain: as_read_here(r) for r in self._datastore.list_relationships()},
            {b.trust_domain: b for b in self._datastore.list_foreign_bundles()},
        )

    def apply_stored(self, stored: Stored, mark: int) -> bool:
        """Adopt what another server wrote: relationships start, change or stop here, and
        bundles that differ from memory are installed and pushed (audited by their writer).
        Trust domains written here since `mark` are left alone: True asks to read again."""
        skipped = False
        # A write this read is past can hold back no later read (the follower reads one at a
        # time, each mark at least the last): its count goes, else one stayed for every trust
        # domain ever written, each name an admin made and deleted.
        self._written = {td: n for td, n in self._written.items() if n > mark}
        mine = set(self._written)
        for td in sorted(set(stored.relationships) | set(self._relationships)):
            if td in self._static:
                continue
            if td in mine:
                skipped = True
                continue
            row = stored.relationships.get(td)
            if row == self._relationships.get(td):
                continue
            if row is None:
                self._forget(td)
                if td in self._claimed:
                    self._deleted_elsewhere.add(td)
            else:
                self._relationships[td] = row
                # Due shortly, through the lease: by then the writer, which fetches at once,
                # holds it, and this server adopts its bundle instead of fetching it again.
                self._schedule(td, FOLLOWED_DELAY)
        changed = False
        for td in sorted(set(stored.bundles) | set(self._bundles)):
            if td in mine:
                skipped = True
                continue
            found = stored.bundles.get(td)
            if found is None:
                changed |= self._bundles.pop(td, None) is not None
                self._updated.pop(td, None)
                continue
            try:
                bundle = SpiffeBundle.parse(TrustDomain.parse(td), found.bundle)
            except Exception:
                _log.exception("stored foreign bundle unreadable", extra={"td": td})
                continue
            if self._bundles.get(td) == bundle:
                continue
            self._bundles[td] = bundle
            self._updated[td] = found.updated_at
            changed = True
            # Another server just fetched (or set) it: the next look is a hint away.
            if td not in self._asked:
                self._schedule(td, self._next(bundle))
        if changed:
            self._publish(dict(self._bundles))
        return skipped

    async def let_go_deleted(self) -> None:
        """Release the fetch leases of relationships another server deleted (the follower,
        after apply_stored): else each stayed held here until it lapsed (two refresh
        intervals) or this server stopped, a row per relationship deleted meanwhile."""
        while self._deleted_elsewhere:
            await self._let_go(self._deleted_elsewhere.pop())

    async def refresh_due(self) -> None:
        """Fetch every relationship that is due and whose fetch this server claims, at most
        FETCHES_AT_ONCE at a time, and wait for those fetches."""
        done: set[str] = set()
        while started := self._start_due(done):
            done.update(started)
            await asyncio.gather(*started.values())

    def _start_due(
        self, skip: set[str] | frozenset[str] = frozenset()
    ) -> dict[str, asyncio.Task[None]]:
        """Start the scheduled fetch of each due relationship not being fetched already, the
        longest due first, while fewer than FETCHES_AT_ONCE run: each in a task of its own, so
        an endpoint that answers slowly (held up to the whole-GET deadline) holds up only its
        own relationship."""
        now = self._elapsed.monotonic()
        started: dict[str, asyncio.Task[None]] = {}
        for td, due in sorted(self._due.items(), key=lambda item: item[1]):
            if len(self._running) >= FETCHES_AT_ONCE:
                break
            if due > now or td in self._running or td in skip:
                continue
            task = asyncio.create_task(self._refresh_scheduled(td), name=f"federation-fetch:{td}")
            self._running[td] = task
            task.add_done_callback(functools.partial(self._fetch_ended, td))
            started[td] = task
        return started

    def _fetch_ended(self, td: str, task: asyncio.Task[None]) -> None:
        if self._running.get(td) is task:
            del self._running[td]
        self._wake.set()  # a slot is free, and `td` has its next fetch scheduled

    async def _refresh_scheduled(self, td: str) -> None:
        try:
            if not await self._claim(td):
                # Another server fetches it; its result comes through the feed.
                self._schedule(td, self._next(self._bundles.get(td)))
                return
            await self._refresh(td, self._fetch_pool)
        except FederationError:
            pass  # logged, audited and rescheduled by refresh
        except NotFoundError:
            self._due.pop(td, None)
        except Exception:
            # Not a refusal, so a bug, but one what the endpoint serves may trigger at every
            # fetch: backed off as failures are, not a traceback every RETRY seconds for ever.
            _log.exception("foreign bundle refresh failed", extra={"td": td})
            self._schedule(td, self._failed(td))
        finally:
            await self._let_go(td)  # deleted while it was fetched

    async def run(self, stop: asyncio.Event) -> None:
        """The loop that only ticks: start what is due, sleep until the next is due or a fetch
        ends. At a stop, the fetches under way are finished (each bounded by its deadline)."""
        try:
            while not stop.is_set():
                self._start_due()
                waiting = [d for td, d in self._due.items() if td not in self._running]
                wait = min((d - self._elapsed.monotonic() for d in waiting), default=60.0)
                if len(self._running) >= FETCHES_AT_ONCE:
                    wait = 60.0  # nothing starts before a fetch ends, and its end wakes us
                self._wake.clear()
                await set_within(self._wake, max(0.05, min(wait, 60.0)))
        except asyncio.CancelledError:
            running = list(self._running.values())
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        await asyncio.gather(*self._running.values(), return_exceptions=True)
