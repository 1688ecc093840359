"""The agent's link to the server: identity (attest / load / renew), the Sync stream, reconnects,
and failover to another server of the list when its server fails (servers.py decides where).

A server that hangs without closing its connection (SIGSTOP, a network black hole) is noticed by
keepalive about 20 s on, past the life of a short-lived agent SVID: so the agent SVID's renewal
waits a third of the life its SVID has left when there is another server to renew at
(renewal_timeout; with none, what is left), and a renewal that fails for any reason but the
server's decision about the agent ends the connection as a failure, the agent moving to
another server to renew there (_renew_loop).

Also the SvidSigner the rotator and JWT cache use: it forwards to whichever connection is
current, so renewing the agent SVID never disturbs them.

Which agent SVID is in use, held, on disk or waiting to be saved is agent_svid_keeper's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.agent_svid_keeper import AgentSvidKeeper, Arrival, left_at_arrival
from agent_attestor.cache import (
    Cache,
    SyncDelta,
    SyncPosition,
    SyncState,
    join_deltas,
    join_parts,
)
from agent_attestor.cancel import cancel_all
from agent_attestor.checkpoint_store import PushedCheckpoint
from agent_attestor.errors import (
    AttestationError,
    AttestationLimitedError,
    AttestationRefusedError,
    ChannelNotVerifiedError,
    JoinTokenRefusedError,
    NotReadyError,
    RenewalFailedError,
    ServerNotOursError,
    ServerNotVerifiedError,
    ServerSilentError,
    StateNotWritableError,
)
from agent_attestor.model import TrustBundle
from agent_attestor.node_client import Heartbeat, NodeClient, server_not_verified
from agent_attestor.reconnect import attempt_after, reconnect_delay
from agent_attestor.rotation import jitter_for, rotate_fraction, rotation_point
from agent_attestor.server_identity import CheckContexts
from agent_attestor.server_link import HELD_UP, ServerLink
from agent_attestor.servers import (
    Resolver,
    Server,
    ServerChooser,
    Target,
    should_move,
    system_resolver,
)
from agent_attestor.signer import MintedJwt, X509Result
from svid._clock import Clock, ElapsedClock
from svid._errors import SvidError
from svid._held import run_held, to_its_end
from svid._log_throttle import KeyedThrottles, LogThrottle

log = logging.getLogger(__name__)


# Seconds between readings of the wall clock while the agent SVID's rotation point is ahead: a
# clock stepped forward (NTP after a boot with a wrong RTC, a VM resumed) is noticed this soon.
RECHECK = 30.0
# What workloads are told while the server refuses this agent.
REFUSED = (
    "this node agent was evicted or banned by the server and serves no identities until it is "
    "attested again"
)
# Seconds between two log lines about what only the operator can mend (no bundle the agent has
# verifies the server, an attestation the server refuses) or that lasts a while (the host's
# attestation budget spent): the loop retries every few seconds, and the line has only to tell
# the operator what to do, then that it is still so.
OPERATOR_LOG_INTERVAL = 300.0


@dataclass
class SyncSettings:
    servers: tuple[Target, ...]
    # Whose server alone the agent attests to (empty: the trust domain its roots name).
    trust_domain: str = ""
    join_token: str = field(default="", repr=False)  # a credential, as in AgentConfig
    x509pop: tuple[list[x509.Certificate], PrivateKeyTypes] | None = None
    bootstrap_root_pem: bytes = b""
    # bootstrap_root_pem is the operator's trust_bundle, not roots fetched unverified.
    bootstrap_given: bool = False
    reconnect_min: float = 1.0
    reconnect_max: float = 10.0
    connect_timeout: float = 5.0
    # An agent SVID the disk refused is saved again this many seconds later, doubling up to the
    # cap: a full disk is freed, a read-only one remounted, by someone else and at any time.
    save_retry_first: float = 1.0
    save_retry_cap: float = 60.0
    rand: random.Random = field(default_factory=random.Random)
    resolver: Resolver = system_resolver


def renewal_wait(
    not_before: float,
    not_after: float,
    arrival: Arrival | None,
    now: float,
    elapsed: float,
    *,
    jitter: float = 0.0,
) -> float:
    """Seconds until the agent SVID is to be renewed (none left: now), at `now` on the wall clock
    and `elapsed` on the elapsed clock, at the fraction of its life `jitter` moves (as a
    workload SVID's: rotation.jitter_for), so agents attested or renewed at once (a fleet
    started, a server restored) do not all renew at once again, forever.

    By its validity on the wall clock (rotation_point), moved past its arrival: a clock ahead of
    the server's by half a TTL read every SVID the server sent as due, and renewed it at once,
    forever. And at the latest the same fraction of what it had left at its arrival (its life
    but the server's back-dating) after it, on the elapsed clock: a clock behind the server's
    by half a TTL came to the point just before NotAfter, and an SVID whose renewal then failed
    lapsed. Of its whole life, back-dating included, a short TTL's point moved late by the
    jitter fell past NotAfter: 12.6 s after the arrival of an 11 s SVID.

    An SVID loaded from disk (`arrival.wall` None; `arrival` None: not even when it was
    loaded) came no one knows when. Counted as arriving at the load on the wall clock it would
    wait half of what it has left, and one overdue (the agent stopped past its point) would not
    be renewed at once: only its validity says when. On the elapsed clock, half its life after
    the load, which it came before: never before its point, whatever this clock's skew, and a
    clock behind the server's, restarted, does not wait until NotAfter."""
    arrived = 0.0 if arrival is None or arrival.wall is None else arrival.wall
    point = rotation_point(not_before, not_after, jitter, arrived=arrived)
    wait = point - now
    if arrival is not None:
        # The same fraction: at ROTATE_AT alone it cut every later point back to it, and the
        # SVIDs that arrived together renewed within half the jitter, all early.
        left = left_at_arrival(not_after - not_before)
        by_elapsed = arrival.elapsed + left * rotate_fraction(jitter)
        wait = min(wait, by_elapsed - elapsed)
    return wait


# A renewal waits at most this share of the life its SVID has left (renewal_timeout). It waited
# 30 s, or until keepalive gave up on the connection (15 s to the ping, 5 s for its answer), for
# a server that hangs without closing it (SIGSTOP, a network black hole): an SVID of under 40 s
# lapsed first, and the agent had none to move to another server with (with a join token spent,
# none ever again). A third leaves two thirds for the move (a reconnect backoff of about
# reconnect_min, a connection, a renewal the next server answers at once: it is due), and a
# renewal hanging there too waits a third of what is left then: every server tried in turn
# gets its share before the SVID lapses.
RENEW_SHARE = 1 / 3
# Never less: a renewal is a CSR signed and recorded by a server that may be busy, and a
# deadline of a few milliseconds (an SVID about to lapse) would fail a healthy one too.
RENEW_FLOOR = 1.0
# Never more: what a renewal of a long-lived SVID waited before.
RENEW_CAP = 30.0


def renewal_timeout(left: float, *, elsewhere: bool = True) -> float:
    """The deadline of a renewal of an agent SVID that has `left` seconds of life; with no
    other server to renew at (`elsewhere` False), all of it: the share kept for a move cut
    short what the only server, busy, would have answered, and each retry there had less."""
    share = RENEW_SHARE if elsewhere else 1.0
    return max(RENEW_FLOOR, min(RENEW_CAP, left * share))


def failure_code(exc: BaseException) -> str | None:
    """The gRPC status code name behind a failure (None: the transport failed)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, grpc.RpcError):
            return cause.code().name  # type: ignore[attr-defined,no-any-return]
        cause = cause.__cause__
    return None


def failure_text(exc: BaseException) -> str:
    """What a failure said, on one line: a gRPC status as its code and details (an RpcError's
    own text adds lines of debug strings)."""
    if isinstance(exc, grpc.RpcError):
        code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
        return f"{code.name}: {details}"
    return str(exc) or type(exc).__name__


def rebootstrap_roots(tried: bytes, given: bytes, given_by_operator: bool) -> bytes | None:
    """The roots to attest with again after `tried` (the saved bundle) did not verify the
    server: the operator's trust bundle, if there is one and it is not what failed. Never roots
    fetched unverified (insecure_bootstrap): a server the saved bundle cannot verify is then
    one nothing verifies, and the agent stays refused rather than trust it."""
    if not given_by_operator or not given or given == tried:
        return None
    return given


@dataclass
class _Run:
    """The parts of the run a Sync stream is sending (a snapshot's or a delta's), held until
    its last part is in."""

    parts: list[SyncState] = field(default_factory=list)
    deltas: list[SyncDelta] = field(default_factory=list)


class Syncer:
    def __init__(
        self,
        settings: SyncSettings,
        store: AgentStore,
        cache: Cache,
        clock: Clock,
        on_change: Callable[[str], None] | None = None,
        *,
        on_checkpoint: Callable[[PushedCheckpoint], object] | None = None,
        link: ServerLink | None = None,
    ) -> None:
        self._s = settings
        self._store = store
        self._cache = cache
        self._clock = clock
        # Intervals since an agent SVID arrived: no step of the wall clock moves them back.
        self._elapsed = ElapsedClock(clock)
        self._on_change = on_change or (lambda _event: None)
        self._on_checkpoint = on_checkpoint or (lambda _checkpoint: None)
        self._client: NodeClient | None = None
        self._servers = ServerChooser(settings.servers, settings.rand, settings.resolver)
        # The server check's TLS contexts, kept across the clients each reconnect builds.
        self._contexts = CheckContexts()
        self.moves = 0  # times the agent moved to another server
        # The agent SVID in use, on disk, held or waiting to be saved, and when each came.
        self._keeper = AgentSvidKeeper(
            store, clock, self._elapsed, log_interval=OPERATOR_LOG_INTERVAL
        )
        # One checkpoint offer at a time (CheckpointStore is used from one thread): an offer
        # cut short by a reconnect holds its turn until its thread has written.
        self._offering = asyncio.Lock()
        self._reconnect = asyncio.Event()
        self._token_used = False
        # The ID of the join token an earlier run sent without saving what it bought, read at
        # the first attestation (None: not yet), before this run notes its own.
        self._spent_earlier: str | None = None
        # An attestation in flight: a stop lets it finish (see settle).
        self._attesting: asyncio.Task[tuple[AgentSvid, TrustBundle]] | None = None
        # A renewal the server answered, being saved and put in use (_adopt): it ends even when
        # the renewal is cancelled, and a refusal waits for it (_refused).
        self._adopting: asyncio.Future[None] | None = None
        # The operator's trust bundle, to attest with instead of using the saved SVID: the
        # saved bundle did not verify the server (its CA replaced), so the SVID that came with
        # it is one the server no longer accepts either. None: a valid saved SVID is used.
        self._fallback: bytes | None = None
        # A given bundle that fails too makes the loop set the saved SVID aside at every retry.
        self._set_aside_log = LogThrottle(OPERATOR_LOG_INTERVAL, clock)
        self._unverified_log = LogThrottle(OPERATOR_LOG_INTERVAL, clock)
        self._not_ours_log = LogThrottle(OPERATOR_LOG_INTERVAL, clock)
        self._attest_refused_log = LogThrottle(OPERATOR_LOG_INTERVAL, clock)
        self._attest_limited_log = LogThrottle(OPERATOR_LOG_INTERVAL, clock)
        # A server away is retried every reconnect_max seconds at most, for as long as it is;
        # by server and kind of failure, so a new one (the server back, attestation failing)
        # is said at once, not behind the last.
        self._unreachable_log = KeyedThrottles(OPERATOR_LOG_INTERVAL, clock)
        self.connected = False
        # What verifiers are told of it (tasks.revocations): the revocations they hold come
        # from here, and stop coming while no Sync stream is live.
        self.link = link if link is not None else ServerLink(clock)
        self.syncs = 0
        # Where the last Sync stream left off: a reconnect asks only for what came after. It
        # is a position in what the server sends one agent ID: `_revision_of`.
        self.revision = 0
        self.epoch = ""
        self._revision_of = ""

    @property
    def agent_id(self) -> str:
        svid = self._keeper.in_use
        return svid.spiffe_id if svid is not None else ""

    @property
    def server(self) -> str:
        """The node API address of the server the agent uses (or is about to try)."""
        current = self._servers.current
        return current.node if current is not None else ""

    @property
    def agent_svid(self) -> AgentSvid | None:
        return self._keeper.in_use

    @property
    def position(self) -> SyncPosition:
        """The revision reached, and the agent ID it belongs to (saved for the next start)."""
        return SyncPosition(self._revision_of, self.revision, self.epoch)

    def resume(self, position: SyncPosition) -> None:
        """Continue from a position saved by an earlier run (the cache holds its state)."""
        self._revision_of = position.agent_id
        self.revision, self.epoch = position.revision, position.epoch

    def restore_roots(self, bundle: TrustBundle) -> bool:
        """Verify the server with the saved state's `bundle` where it is newer than the trust
        bundle file's (AgentSvidKeeper.restore_roots); True if so."""
        return self._keeper.restore_roots(bundle)

    def set_bootstrap_roots(self, pem: bytes, *, given: bool = False) -> None:
        """Roots to verify the server with until it has handed us a bundle (read at start-up);
        `given`: the operator's trust_bundle, which may stand in for a stale saved bundle."""
        self._s.bootstrap_root_pem = pem
        self._s.bootstrap_given = given

    # ---- identity ---------------------------------------------------------------------------

    def _root_pem(self) -> bytes:
        roots = self._keeper.roots_pem()
        if roots:
            return roots
        if self._s.bootstrap_root_pem:
            return self._s.bootstrap_root_pem
        raise AttestationError(
            "no trust bundle to verify the server: give --trust-bundle (or --insecure-bootstrap)"
        )

    async def _save_loop(self) -> None:
        """Save an agent SVID or trust bundle the disk refused, with the backoff of the settings
        (AgentSvidKeeper.save_loop)."""
        await self._keeper.save_loop(self._s.save_retry_first, self._s.save_retry_cap)

    def _install(self, svid: AgentSvid, bundle: TrustBundle | None) -> None:
        """Use `svid` (on disk, unless the disk refused it: AgentSvidKeeper.persist) from now on;
        `bundle` too, if one came with it."""
        if bundle is not None and bundle.x509_authorities:
            self._cache.set_bundle(bundle)
        self._keeper.in_use = svid
        old = self._client
        server = self._servers.current
        assert server is not None  # picked before any identity is installed
        roots = self._root_pem()
        pinned = pinned_under = b""
        if old is not None and old.server_address == server.node:
            # The server checked there: the new SVID's channel serves calls at once (a renewal,
            # with the bundle it brings, leaves no gap), and connect() checks the server again
            # under the roots of now before the Sync stream is opened.
            pinned, pinned_under = old.pinned, old.pinned_under
        self._client = NodeClient(
            server.node,
            server.attest,
            roots,
            svid,
            self._s.connect_timeout,
            trust_domain=self._s.trust_domain,
            pinned=pinned,
            pinned_under=pinned_under,
            clock=self._clock,
            contexts=self._contexts,
        )
        if old is not None:
            # Streams on the old channel may still be closing: let them, then close it.
            asyncio.get_running_loop().call_later(5, lambda: asyncio.ensure_future(old.close()))

    async def ensure_identity(self) -> AgentSvid:
        """The agent SVID: the current one, the one on disk, or a fresh attestation."""
        if self._servers.current is None:
            server = await self._servers.first()
            log.info("chose a server", extra={"server": server.node})
        if self._keeper.holding and not self._keeper.holds():
            self._use_held()  # saved meanwhile, or the one in use runs short
        now = self._clock.now()
        if self._fallback is None:
            in_use = self._keeper.in_use
            if in_use is not None and in_use.not_after > now:
                return in_use
            stored = self._keeper.load_saved(now)
        else:
            stored = None  # set aside: see _set_aside_saved_svid
        if stored is not None:
            self._install(stored, None)
            return stored
        # Its own task, shielded: a join token is spent once the server answers, so a stop
        # that cancelled the exchange midway would leave the agent with no identity and no
        # token. The SVID it bought is saved even when the caller is cancelled.
        self._attesting = asyncio.create_task(self._attest_and_save(), name="attest")
        svid, bundle = await asyncio.shield(self._attesting)
        self._install(svid, bundle)
        self._on_change("attested")
        return svid

    async def _attest_and_save(self) -> tuple[AgentSvid, TrustBundle]:
        server = self._servers.current
        assert server is not None
        if self._fallback is not None:
            # The saved bundle failed on this server already (_set_aside_saved_svid).
            try:
                return await self._attest_and_save_with(server, self._fallback)
            except Exception:
                self._take_back_saved_svid()
                raise
        roots = self._root_pem()
        try:
            return await self._attest_and_save_with(server, roots)
        except ServerNotOursError:
            raise  # the roots verified it: another bundle would not make it ours
        except ServerNotVerifiedError as exc:
            given = rebootstrap_roots(roots, self._s.bootstrap_root_pem, self._s.bootstrap_given)
            if given is None:
                raise
            # The handshake failed: the join token never left the agent, and is tried again
            # with the operator's bundle, which must verify the server in turn.
            log.warning(
                "the saved trust bundle does not verify the server (its CA replaced while the "
                "agent was away?); attesting with the trust bundle given (trust_bundle)",
                extra={"server": server.attest, "error": str(exc)[:300]},
            )
            return await self._attest_and_save_with(server, given)

    async def _attest_and_save_with(
        self, server: Server, roots: bytes
    ) -> tuple[AgentSvid, TrustBundle]:
        if self._s.join_token and self._token_used:
            # Here, not before the attestation: a saved SVID set aside is given back (see
            # _attest_and_save) whether the server or the agent itself refused the token.
            raise JoinTokenRefusedError(
                "agent SVID expired, was refused or its CA replaced, and this agent spent its "
                "join token already"
            )
        if self._s.join_token:
            self._note_spending()
        client = NodeClient(
            server.node,
            server.attest,
            roots,
            connect_timeout=self._s.connect_timeout,
            trust_domain=self._s.trust_domain,
            contexts=self._contexts,
        )
        try:
            try:
                svid, bundle = await client.attest(
                    join_token=self._s.join_token, x509pop=self._s.x509pop
                )
                self._keeper.note_arrival(svid)
            except JoinTokenRefusedError as exc:
                raise self._refused_token(exc) from exc
            except (
                ServerNotVerifiedError,
                AttestationRefusedError,
                AttestationLimitedError,
                ConnectionError,
            ):
                self._unspent()  # answered, or no handshake: the token was not admitted
                raise
            # On disk before anything else: the server has spent the join token, and a kill
            # before this line leaves the agent with no identity and no way to get one.
            self._token_used = bool(self._s.join_token)
            # A renewal held (_adopt) came for the SVID this one replaces: put in use later
            # (_hold, ensure_identity), it would supersede this one with a stale one.
            self._keeper.drop_held()
            await self._keeper.persist(svid, bundle, "attested")
            self._fallback = None  # the SVID and bundle in use are the new ones
        finally:
            await client.close()
        log.info("agent attested", extra={"agent_id": svid.spiffe_id, "server": server.attest})
        return svid, bundle

    @property
    def _token_id(self) -> str:
        """The join token's public part (its secret follows the dot)."""
        return self._s.join_token.partition(".")[0]

    def _note_spending(self) -> None:
        """Note the join token about to be sent (see AgentStore.note_spending), after reading
        what an earlier run noted."""
        if self._spent_earlier is None:
            self._spent_earlier = self._store.spent_unsaved()
        try:
            self._store.note_spending(self._token_id)
        except OSError as exc:
            raise StateNotWritableError(
                f"cannot write {self._store.spending_path}: {str(exc)[:200]}"
            ) from exc

    def _refused_token(self, exc: JoinTokenRefusedError) -> JoinTokenRefusedError:
        """The server refused the join token. If an earlier run sent it and never saved what
        it bought, that is why, and no retry will be answered otherwise: asked no more."""
        if self._spent_earlier != self._token_id:
            self._store.forget_spending()  # refused for what it is, not spent by this agent
            return exc
        self._token_used = True
        return JoinTokenRefusedError(
            f"{exc}; an earlier run of this agent spent it and could not save the agent SVID "
            f"it bought ({self._store.svid_path})"
        )

    def _unspent(self) -> None:
        """The join token was not admitted by this attempt: its note goes, unless an earlier
        run's says why the server refuses it (kept for the next start to say so too)."""
        if self._s.join_token and self._spent_earlier != self._token_id:
            self._store.forget_spending()

    def _take_back_saved_svid(self) -> None:
        """The attestation a set-aside led to failed, whatever the reason (the server out of
        reach, busy, or refusing the join token): the next attempt is with the saved SVID again,
        on a channel of its own. It is only ever used over a connection its saved bundle
        verified, so nothing reaches the cache from a server no bundle verified; and if that
        bundle fails again, it is set aside again and the attestation retried after a backoff.
        Kept aside, a server that answered in the real one's place for a while (a stray DNS
        answer or load balancer) would cost the agent an SVID that works again once the real
        one is back: attested anew under another ID, or not at all with a join token spent."""
        self._fallback = None
        svid = self._keeper.in_use
        if svid is not None:
            self._install(svid, None)  # the old channel may hold the stray's failure

    async def settle(self, timeout: float) -> None:
        """Let an attestation or renewal in flight finish (up to `timeout` s each), so its SVID is
        on disk; and try once more to save an agent SVID the disk refused (run() saves it no
        more)."""
        for task in (self._attesting, self._adopting):
            if task is not None and not task.done():
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), timeout)
        await self._keeper.save_at_stop()

    async def renew_once(self) -> None:
        if self._client is None:
            return
        # Its deadline within the life the SVID in use has left: one sent to a server that
        # hangs leaves the time to renew at another (renewal_timeout).
        timeout = RENEW_CAP
        in_use = self._keeper.in_use
        if in_use is not None:
            left = self._keeper.life_left(in_use)
            timeout = renewal_timeout(left, elsewhere=self._servers.has_others())
        svid, bundle = await self._client.renew(timeout=timeout)
        arrival = self._keeper.arrival_now()
        # Adopted to the end even if the renewal is cancelled now (a reconnect, a stop): its
        # save goes on in its thread and may reach the disk, and the older SVID kept in memory
        # beside it had this run and the next start use two different ones.
        self._adopting = asyncio.ensure_future(self._adopt(svid, bundle, arrival))
        await to_its_end(self._adopting)

    async def _adopt(self, svid: AgentSvid, bundle: TrustBundle, arrival: Arrival) -> None:
        """Save the renewed `svid` and use it, unless the disk refuses it while the SVID in use
        is the one on disk with life left: then it is held unused (AgentSvidKeeper.adopt)."""
        if await self._keeper.adopt(svid, bundle, arrival):
            if bundle.x509_authorities:
                self._cache.set_bundle(bundle)  # roots are news whichever SVID is in use
            log.info(
                "agent SVID renewed; the disk refused it, so the one saved before it stays in "
                "use until it is saved",
                extra={"agent_id": svid.spiffe_id},
            )
            return
        self._put_in_use(svid, bundle, arrival)

    def _put_in_use(self, svid: AgentSvid, bundle: TrustBundle | None, arrival: Arrival) -> None:
        self._keeper.arrived(svid, arrival)
        log.info("agent SVID renewed", extra={"agent_id": svid.spiffe_id})
        self._install(svid, bundle)
        self._on_change("renewed")
        self._reconnect.set()  # move the Sync stream to the new certificate

    def _use_held(self) -> None:
        # Without the roots it came with: set in the cache then (_adopt), set again now they
        # replaced newer ones a Sync message brought meanwhile (a CA rotation's next root).
        svid, arrival = self._keeper.take_held()
        self._put_in_use(svid, None, arrival)

    async def _hold(self) -> None:
        """Until the renewed SVID held is saved or the one in use runs short, then use it."""
        await self._keeper.wait_held(RECHECK)
        if self._keeper.holding:
            self._use_held()

    async def _renew_loop(self, svid: AgentSvid) -> None:
        arrival = self._keeper.arrival(svid)
        jitter = jitter_for(svid)
        attempt = 0
        while True:
            if self._keeper.holding:
                await self._hold()
                return  # the stream moves to the renewed SVID (_put_in_use)
            due = renewal_wait(
                svid.not_before,
                svid.not_after,
                arrival,
                self._clock.now(),
                self._elapsed.monotonic(),
                jitter=jitter,
            )
            if due > 0:
                # Not one long sleep: it counts monotonic seconds, and a wall clock stepped
                # forward meanwhile would let the SVID expire unrenewed.
                await asyncio.sleep(min(due, RECHECK))
                continue
            try:
                await self.renew_once()
                if self._keeper.holding:
                    continue  # held unused: waits for its save, not renewed again
                return
            # No failure ends the loop silently: one that did (no connection to check the
            # server, an SVID that does not parse) left nothing renewing the SVID.
            except (grpc.RpcError, SvidError, OSError) as exc:
                if self._keeper.life_left(svid) <= 0:
                    # Ended as a failure, not a clean reconnect: a move when it is not the
                    # server's decision, and a backoff before the next connection either way.
                    raise RenewalFailedError(
                        f"the agent SVID expired while its renewal failed: {failure_text(exc)}"
                    ) from exc
                if should_move(failure_code(exc)) and self._servers.has_others():
                    # The server did not answer (hung, gone) or answered nothing usable: the
                    # connection ends as a failure, and the agent renews at another server
                    # while its SVID lets it. Retried here, each try waited out its deadline
                    # on the same server until the SVID lapsed.
                    raise RenewalFailedError(
                        f"agent SVID renewal failed at {self.server}: {failure_text(exc)}"
                    ) from exc
                # Retried here, after a backoff: the server's decision (another would decide
                # the same), or the only server there is. Reconnecting to it would tear down a
                # Sync stream that may still bring entries and revocations, for a new
                # connection to the same server; one that is gone ends that stream by itself
                # (keepalive), and the renewal is retried with a deadline within what is left.
                # Within what the SVID has left: a backoff grown to reconnect_max outlasted
                # a short-lived one between two tries.
                delay = reconnect_delay(
                    attempt,
                    self._s.reconnect_min,
                    self._s.reconnect_max,
                    self._s.rand,
                    life_left=self._keeper.life_left(svid),
                )
                attempt += 1
                log.warning(
                    "agent SVID renewal failed",
                    extra={"error": failure_text(exc)[:300], "retry_in": delay},
                )
                await asyncio.sleep(delay)

    # ---- the stream -------------------------------------------------------------------------

    async def _sync_once(self) -> None:
        svid = await self.ensure_identity()
        assert self._client is not None
        await self._client.connect(self._connect_within(svid))
        self._reconnect.clear()
        renew = asyncio.create_task(self._renew_loop(svid))
        reconnect = asyncio.create_task(self._reconnect.wait())
        stream = asyncio.create_task(self._consume(self._client))
        silence = asyncio.create_task(self._watch_silence())
        try:
            done, _ = await asyncio.wait(
                {stream, reconnect, renew, silence}, return_when=asyncio.FIRST_COMPLETED
            )
            for ended in (stream, renew, silence):
                if ended in done:
                    ended.result()  # raise what ended it (a renewal done asked a reconnect)
        finally:
            for task in (renew, reconnect, stream, silence):
                task.cancel()
            for task in (renew, reconnect, stream, silence):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.connected = False
            self.link.down()

    async def _offer_checkpoint(self, pushed: PushedCheckpoint) -> None:
        """checkpoint_store.CheckpointStore.offer, which refuses rather than raises; anything it
        still raises is logged, not raised: ending the stream here ended every reconnect too
        (the server pushes the same checkpoint on each), and entries stopped coming in.
        In a thread: it appends and fsyncs a line, and on a slow disk the Workload API, on this
        loop, stopped answering for as long. One at a time, across reconnects: the offer of a
        stream cut short holds its turn until its thread ends, so the next stream's offer (the
        server pushes the checkpoint again on connect) never runs beside it."""
        try:
            async with self._offering:
                await run_held(None, self._on_checkpoint, pushed)
        except Exception as exc:  # the node's copy never stops the sync
            log.error(
                "cannot keep the audit checkpoint the server pushed; the sync goes on",
                extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"},
            )

    async def _watch_silence(self) -> None:
        """Count the link lost once its server, which sends heartbeats, falls silent
        (ServerLink.check), and end the stream then (ServerSilentError): left open, it lasted
        until keepalive failed, ~20 s on, the agent served by no server meanwhile (no entry,
        no revocation, no renewal), though another was there to move to, or a new connection
        to the same one would have worked (a connection a network dropped without a word)."""
        while True:
            heard = self.link.heard.version
            due = self.link.check()
            left = self.link.silent_left()
            if left is not None:
                if left <= 0:
                    raise ServerSilentError(
                        f"the server sent nothing for {self.link.silence or 0:g} s, past what "
                        "its heartbeats promise"
                    )
                due = left
            if due is None:
                await self.link.heard.wait(heard)
                continue
            woke_at = self._elapsed.monotonic() + due
            await asyncio.sleep(due)
            if self._elapsed.monotonic() - woke_at > HELD_UP:
                # Woken late: the agent's loop was held up, and the watch runs before the
                # stream reads what came meanwhile. The agent's own time, as a message it was
                # slow to handle: a healthy server's stream was ended for it. Once until a
                # message comes (ServerLink.resumed), so a hung server is still noticed.
                self.link.resumed()

    async def _consume(self, client: NodeClient) -> None:
        # The parts of a run not yet complete: held off the cache, and dropped with the stream
        # if it ends before the last one (the reconnect asks for the run again).
        run = _Run()
        if self._revision_of != self.agent_id:
            # Attested anew under another ID: what the old one reached says nothing here.
            self.revision, self.epoch = 0, ""
        async for message in client.sync(self.revision, self.epoch):
            # Heard, whatever it is: a run's parts come back to back without a heartbeat
            # between them, and its last part is applied only after the others (and a bundle
            # saved): counted from the last heartbeat alone, a long one ended the stream as
            # silent, and every reconnect asked for it again.
            self.link.hear()
            try:
                await self._handle(message, run)
            finally:
                self.link.handled()
        raise ConnectionError("server ended the Sync stream")

    async def _handle(
        self, message: SyncState | SyncDelta | PushedCheckpoint | Heartbeat, run: _Run
    ) -> None:
        if isinstance(message, Heartbeat):
            self.link.beat(message.interval)
        elif isinstance(message, PushedCheckpoint):
            await self._offer_checkpoint(message)
        elif isinstance(message, SyncState):
            await self._snapshot_part(message, run)
        else:
            await self._delta_part(message, run)

    async def _snapshot_part(self, message: SyncState, run: _Run) -> None:
        # A snapshot replaces everything at once, when its last part is in; delta parts held
        # before it (the server never sends them so) are replaced with it.
        run.deltas = []
        run.parts.append(message)
        if message.more:
            return
        state = join_parts(run.parts)
        run.parts = []
        await self._save_bundle(state.bundle)
        self._cache.apply_sync(state)
        self._synced(message)

    async def _delta_part(self, message: SyncDelta, run: _Run) -> None:
        # A delta in parts too is applied whole, when its last part is in.
        if run.parts:
            # Joined to a snapshot it does not follow, it would be applied to state the agent
            # never had: the reconnect asks for both again.
            raise ConnectionError("server sent a delta inside a snapshot's parts")
        run.deltas.append(message)
        if message.more:
            return
        delta = join_deltas(run.deltas)
        run.deltas = []
        if delta.bundle is not None:
            await self._save_bundle(delta.bundle)
        self._cache.apply_delta(delta)
        self._synced(message)

    def _synced(self, message: SyncState | SyncDelta) -> None:
        """A run applied whole: the position it reached, and the stream counted up."""
        self.revision, self.epoch = message.revision, message.epoch
        self._revision_of = self.agent_id
        if not self.connected:
            self._servers.connected()
            log.info("Sync stream up", extra={"server": self.server})
            # The next outage is news: its first failure said at once.
            self._unreachable_log = KeyedThrottles(OPERATOR_LOG_INTERVAL, self._clock)
        self.connected = True
        self.link.up()
        self.syncs += 1
        self._on_change("sync")

    async def _save_bundle(self, bundle: TrustBundle) -> None:
        """The roots for the next start to verify the server with (AgentSvidKeeper.save_roots).
        A failed write (a full disk) is logged, not raised: ending the stream here kept the
        message from being applied, and every reconnect asked for it again, so no entry or
        revocation came in. Saved again by _save_loop: a delta brings the bundle only when it
        changes, so waiting for the next one could leave the file stale for the next start;
        until then _root_pem verifies a reconnect's server with these roots."""
        await self._keeper.save_roots(bundle)

    async def _refused(self, code: grpc.StatusCode, details: str | None) -> None:
        """The server no longer recognises this agent (evicted, banned, or its SVID superseded):
        everything cached came under that identity, so none of it is served any more."""
        agent_id = self.agent_id
        self._keeper.disown()  # nothing backs it now: the next start must not find it
        self.revision, self.epoch = 0, ""  # the cache is emptied: the next stream starts afresh
        self._cache.refuse(REFUSED)
        self._on_change("refused")
        # To its end even if a stop comes while it waits: cut short, the save it waited for
        # left the refused SVID on disk, and the refusal went unsaid.
        await to_its_end(self._forget_refused(code, details, agent_id))

    async def _forget_refused(
        self, code: grpc.StatusCode, details: str | None, agent_id: str
    ) -> None:
        # A renewal being adopted, or a save in its thread (_save_loop's), would write the
        # refused SVID back after the removal, and the next start be refused and remove it
        # again: the removal waits for them. Nothing saves it after: it no longer waits.
        adopting = self._adopting
        if adopting is not None and not adopting.done():
            await asyncio.wait({adopting})
        await self._keeper.forget()
        self._say_refused(code, details, agent_id)

    def _say_refused(self, code: grpc.StatusCode, details: str | None, agent_id: str) -> None:
        if self._s.x509pop is not None:
            # Its certificate still proves the node: it attests again by itself.
            remedy = (
                "It attests again with its x509pop certificate once the removal is finished; "
                "a banned agent's ID is refused for good (a new certificate is a new agent ID)"
            )
        else:
            remedy = (
                "Re-attest it with a new join token (svid-server token generate; svid-agent "
                "run --join-token-file FILE); a banned agent's ID is refused for good"
            )
        log.error(
            "the server refused this agent (evicted or banned): dropped every cached SVID and "
            "JWT-SVID, workloads are refused until it attests again. " + remedy,
            extra={"agent_id": agent_id, "code": code.name, "server_said": (details or "")[:300]},
        )

    async def run(self) -> None:
        """Hold the Sync stream forever; meanwhile save an agent SVID the disk refused."""
        saver = asyncio.create_task(self._save_loop(), name="agent-svid-save")
        try:
            await self._hold_stream()
        finally:
            await cancel_all([saver])

    async def _hold_stream(self) -> None:
        """Hold the Sync stream forever, reconnecting with jittered, capped backoff, by the kind
        of failure and within the agent SVID's life (reconnect.reconnect_delay)."""
        attempt = 0
        # A saved SVID set aside attests at once, the first time only: a server that no bundle
        # it hands out verifies would otherwise be attested to in a loop that never waits.
        hurried = False
        while True:
            started = self._clock.monotonic()
            syncs = self.syncs
            try:
                await self._sync_once()
                attempt = 0
                hurried = False
                continue
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                details = exc.details() or ""  # type: ignore[attr-defined]
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    await self._refused(code, details)
                elif server_not_verified(exc):
                    # The channel is pinned to the CA of the server connect() checked, twice:
                    # the connection reached a server that CA did not sign.
                    self._not_ours(
                        "the server the channel reached is not the one checked at its address: "
                        f"its certificate is not signed by that server's CA: {details}"
                    )
                else:
                    log.warning("lost the server", extra={"server": self.server, "code": code.name})
                await self._after_failure(code.name, code.name)
            except ServerSilentError as exc:
                log.warning(
                    "the server fell silent: ending its Sync stream",
                    extra={"server": self.server, "error": str(exc)[:300]},
                )
                await self._after_failure(None, "server silent")
            except RenewalFailedError as exc:
                log.warning(
                    "agent SVID renewal failed: ending the connection to the server",
                    extra={
                        "server": self.server,
                        "code": failure_code(exc) or "",
                        "error": str(exc)[:300],
                    },
                )
                await self._after_failure(failure_code(exc), "agent SVID renewal failed")
            except AttestationRefusedError as exc:
                # Not a move: every server of the trust domain reads the same tokens, agents
                # and x509pop CAs.
                self._attestation_refused(exc)
            except AttestationLimitedError as exc:
                # Each server keeps its own budget: another one may have room.
                self._attestation_limited(str(exc))
                await self._after_failure(failure_code(exc), "attestation budget spent")
            except ChannelNotVerifiedError as exc:
                # The roots the agent SVID came with do not verify the server its channel meets.
                if not self._set_aside_saved_svid(str(exc)):
                    self._unverified(str(exc))
                elif not hurried:
                    hurried = True
                    continue  # attest at this very server, at once: it failed no attempt
                await self._after_failure(None, "server not verified")
            except ServerNotOursError as exc:
                # Not a decision of the server about us (it heard nothing): another may be ours.
                self._not_ours(str(exc))
                await self._after_failure(None, "not this agent's server")
            except ServerNotVerifiedError as exc:
                # An attestation: neither the saved bundle nor the given one verified the server.
                # A saved SVID set aside is tried again next (_take_back_saved_svid).
                self._unverified(str(exc))
                await self._after_failure(failure_code(exc), "server not verified")
            except (AttestationError, ConnectionError, OSError) as exc:
                times = self._unreachable_log.due((self.server, type(exc), failure_code(exc)))
                if times:
                    log.warning(
                        "cannot reach or attest to the server",
                        extra={"server": self.server, "error": str(exc)[:300], "times": times},
                    )
                await self._after_failure(failure_code(exc), str(exc) or type(exc).__name__)
            self._on_change("disconnected")
            # A stream that was up, lost: every agent of its server lost theirs at once.
            lost_live = self.syncs > syncs
            # Only a connection that lasted starts the backoff afresh: one whose stream came
            # up and was dropped at once, each time (a crash-looping server), backs off.
            attempt = attempt_after(attempt, self._clock.monotonic() - started)
            delay = reconnect_delay(
                attempt,
                self._s.reconnect_min,
                self._s.reconnect_max,
                self._s.rand,
                lost_live=lost_live,
                life_left=self._life_left(),
            )
            attempt += 1
            await asyncio.sleep(delay)

    def _connect_within(self, svid: AgentSvid) -> float:
        """Seconds a connection may take, as a renewal may (renewal_timeout): a share of what
        the agent SVID has left when there is another server to go on to. A server that hangs
        (stopped, a black hole) held the connection for connect_timeout or more, and an SVID
        with less left lapsed there, with another server ready to renew it."""
        left = self._keeper.life_left(svid)
        return renewal_timeout(left, elsewhere=self._servers.has_others())

    def _life_left(self) -> float | None:
        """What the agent SVID in use has left (None: there is none), which bounds a wait."""
        svid = self._keeper.in_use
        return self._keeper.life_left(svid) if svid is not None else None

    def _set_aside_saved_svid(self, details: str) -> bool:
        """The bundle the agent holds did not verify the server on its SVID's connection. True:
        the operator gave another, and the agent attests with it instead of using that SVID."""
        tried = self._client.root_pem if self._client is not None else b""
        given = rebootstrap_roots(tried, self._s.bootstrap_root_pem, self._s.bootstrap_given)
        if given is None:
            return False
        # Nothing on disk changes unless the attestation succeeds: a given bundle that does not
        # verify the server either leaves the saved SVID as it was.
        count = self._set_aside_log.due()
        if count:
            log.warning(
                "the saved trust bundle does not verify the server (its CA replaced while the "
                "agent was away?): setting the saved agent SVID aside, attesting with the trust "
                "bundle given (trust_bundle)",
                extra={"server": self.server, "times": count, "error": details[:300]},
            )
        self._fallback = given
        return True

    def _unverified(self, error: str) -> None:
        """No bundle the agent has verifies the server: only the operator can change that, and
        every retry would say so again."""
        count = self._unverified_log.due()
        if not count:
            return
        log.error(
            "no trust bundle this agent has verifies the server's certificate: if the server's "
            "CA was replaced, give the agent the server's current bundle (--trust-bundle FILE, "
            "from `svid-server bundle show --format pem`) and a new join token (an x509pop "
            "agent needs only the bundle); retrying meanwhile",
            extra={"server": self.server, "failures": count, "error": error[:300]},
        )

    def _not_ours(self, error: str) -> None:
        """The server at the agent's address verified under its roots but is not its trust
        domain's (another trust domain's under the same upstream root, where a DNS answer or a
        balancer sent the agent): nothing was sent to it, nothing it sends is used, and every
        retry there fails alike until whoever runs that address mends it."""
        count = self._not_ours_log.due()
        if not count:
            return
        log.error(
            "the server at this agent's server address is not its trust domain's server (another "
            "trust domain's under the same root?): nothing was sent to it and nothing it sends is "
            "used; check the agent's server_address and what answers there; retrying meanwhile",
            extra={"server": self.server, "times": count, "error": error[:300]},
        )

    def _attestation_refused(self, exc: AttestationRefusedError) -> None:
        """The server refuses to attest the agent (its join token, its x509pop certificate):
        every retry until the operator mends it is refused the same way, and says so once per
        interval. Its problem and remedy are the error's, written in code: the line's text is
        the same at every reminder, what the server said is apart."""
        count = self._attest_refused_log.due()
        if not count:
            return
        log.error(
            "%s: %s; retrying meanwhile",
            exc.problem,
            exc.remedy,
            extra={"server": self.server, "times": count, "error": str(exc)[:300]},
        )

    def _attestation_limited(self, error: str) -> None:
        """The server's attestation budget for this host is spent: it refills with time (or
        another server has room), so a warning, once per interval, rather than at each retry."""
        count = self._attest_limited_log.due()
        if not count:
            return
        log.warning(
            "the server's attestation budget for this host is spent (agents sharing its "
            "address, or many attempts): retrying with backoff; if it lasts, raise the server's "
            "attest_rate_per_host and attest_burst_per_host",
            extra={"server": self.server, "times": count, "error": error[:300]},
        )

    async def _after_failure(self, code: str | None, reason: str) -> None:
        """Move to another server unless the failure was this one's decision about us."""
        if not should_move(code):
            return
        previous = self._servers.current
        server = await self._servers.next()
        svid = self._keeper.in_use
        if svid is not None:
            self._install(svid, None)  # a fresh channel; mTLS works on any server
        if server == previous:
            return  # the only server there is: reconnect to it
        self.moves += 1
        log.warning(
            "moving to another server",
            extra={
                "server": server.node,
                "previous": previous.node if previous is not None else "",
                "reason": reason,
            },
        )
        self._on_change("moved")

    # ---- SvidSigner -------------------------------------------------------------------------

    def _current(self) -> NodeClient:
        if self._client is None:
            raise NotReadyError("not connected to the server yet")
        return self._client

    def channel(self) -> grpc.aio.Channel:
        """The current mTLS channel to the server (follows agent SVID renewals)."""
        return self._current().channel()

    async def batch_new_x509(self, params: list[tuple[str, bytes]]) -> list[X509Result]:
        return await self._current().batch_new_x509(params)

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        return await self._current().new_jwt(spiffe_id, audience, entry_id)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
