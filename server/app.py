"""The one place that builds the server: datastore, keys, CA, rotator, attestors, APIs, gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from server import admin_socket
from server.admin_api import AdminServicer
from server.agent_authority import AgentAuthority, datastore_reader
from server.attestation.base import NodeAttestor
from server.attestation.join_token import JoinTokenAttestor
from server.attestation.x509pop import X509PopAttestor
from server.audit.checkpoint import CHECKPOINT_FILE, KEY_DIR, CheckpointFile, CheckpointSigner
from server.audit.outage import LedgerOutage
from server.audit.retention import DAY, RetentionPolicy
from server.audit.rollback import (
    Rollback,
    accept_rollback,
    find_rollback,
    refuse_restored_flag,
    refuse_rollback,
)
from server.ca.errors import CaUnavailableError
from server.ca.keys import KeyStore
from server.ca.loop_workers import LoopSigningWorkers
from server.ca.manager import CaConfig, CaManager, default_holder
from server.ca.rotator import Rotator
from server.ca.sealing import KeyEncryptionKey
from server.ca.workers import SigningWorkers
from server.config import ServerConfig
from server.datastore.base import DataStore
from server.datastore.errors import CommitUnknownError
from server.datastore.legacy_import import import_legacy_files
from server.datastore.lost import (
    NEW_DATASTORE_FLAG,
    is_missing,
    records_nothing,
    refuse_lost,
    refuse_new,
    refuse_new_flag,
)
from server.datastore.postgres_dsn import open_postgres, redact_dsn
from server.datastore.sqlite import SqliteDataStore
from server.descriptor_budget import (
    GRPC_IDLE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    budget,
    per_port,
    warn_if_short,
)
from server.errors import ConfigError
from server.events import ChangeNotifier
from server.federation.wiring import Federation
from server.health_reasons import DATASTORE_VIEW, LEDGER, HealthReasons
from server.housekeeping import (
    HOUSEKEEPING_LEASE,
    Lease,
    LeasedCheckpointer,
    LeasedPruner,
)
from server.ids import ServerIds
from server.issuance import AgentAdmission, Issuer, IssuerSettings, MeteredLedger
from server.issuance.datastore_ledger import DatastoreLedger
from server.ledger import Ledger
from server.metrics import Metrics, MetricsHttpServer
from server.node_api import (
    SYNC_OPENS_BURST,
    SYNC_OPENS_PER_SECOND,
    Limiters,
    NodeServicer,
    NodeSettings,
)
from server.peer import PeerCache
from server.propagation import Propagator
from server.refusal_budget import RefusalBudget
from server.replication import FeedFollower, FollowSettings
from server.restore_adoption import CertificateAdoption, RestoredWindow, restored_window
from server.runtime import RuntimeInfo, host_port
from server.state import ServerState
from server.tasks.service import TaskSettings
from server.tasks.wiring import TaskLayer, build_task_layer
from server.view_freshness import CurrentView, ViewFreshness, stale_after
from svid._ratelimit import KeyedLimiter

if TYPE_CHECKING:
    from server.oauth.wiring import OAuthService
from server.tls import ServerTls
from svid import MAX_CLOCK_SKEW
from svid._clock import Clock, SystemClock
from svid._daemon_config import listening
from svid._descriptors import raise_descriptor_limit
from svid._health import HealthServicer
from svid._proto import admin_pb2_grpc, node_pb2_grpc
from svid._unix_socket import grpc_unix_target
from svid._waits import set_within

_log = logging.getLogger("svid.server")
NODE_SERVICE = "svid.node.v1.Node"
ADMIN_SERVICE = "svid.admin.v1.Admin"
HOUSEKEEPING_INTERVAL = 60.0
MAX_TIMER = 10.0
# The housekeeping lease's loop looks at the clock at least this often (renewing every ttl / 3).
MAX_LEASE_WAIT = 1.0


def _load_ca_file(path: Path) -> tuple[x509.Certificate, ...]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"x509pop_ca_bundle: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"x509pop_ca_bundle: {path} holds no PEM certificates") from None
    return tuple(certs)


def ca_config(cfg: ServerConfig) -> CaConfig:
    """The CA manager's settings out of the server's (`svid-server ca` opens the CA offline
    with the same)."""
    return CaConfig(
        trust_domain=cfg.trust_domain,
        ca_ttl=cfg.ca_ttl,
        jwt_key_ttl=cfg.jwt_key_ttl,
        key_type=cfg.key_type,
        upstream_cert=cfg.upstream_ca_cert,
        upstream_key=cfg.upstream_ca_key,
        jwt_issuer=cfg.oidc_issuer or None,
    )


def made_with_a_datastore(cfg: ServerConfig) -> list[Path]:
    """What only a server running on a datastore makes in its data_dir: the CA's key files
    (journaled in it), then the audit checkpoint key and checkpoints (made_after_its_keys)."""
    keys = KeyStore(cfg.keys_dir, create=False)
    return [*(keys.path(slot_id) for slot_id in keys.slot_ids()), *made_after_its_keys(cfg)]


def made_after_its_keys(cfg: ServerConfig) -> list[Path]:
    """What a start makes once its CA key is journaled in the datastore: the audit checkpoint
    key and the checkpoints signed of its audit log."""
    return [cfg.data_dir / KEY_DIR, cfg.data_dir / CHECKPOINT_FILE]


def _starting_anew(datastore: str) -> None:
    """Said where NEW_DATASTORE_FLAG lets a start begin a datastore it would refuse."""
    _log.warning(
        f"starting on a new datastore as asked ({NEW_DATASTORE_FLAG})",
        extra={"datastore": datastore},
    )


def _bind(key: str, address: str, add: Callable[[], int]) -> int:
    try:
        return add()
    except RuntimeError:
        raise ConfigError(
            f"{key}: cannot listen on {address} (in use, or no such address/directory)"
        ) from None


# Sync streams live for hours: ping idle connections, accept agent pings >= 10 s apart. The
# last key is the string grpc reads (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS);
# under the macro's own name it was ignored, the default (5 min) held, and every agent on a
# quiet Sync stream got GOAWAY too_many_pings after three 15 s keepalive pings, and moved.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


# Streams open at once on an agents' port connection; past these grpc-core refuses a new one
# (RST_STREAM REFUSED_STREAM, which a gRPC client retries as its own streams end). Unbounded by
# default: one client of the attestation port, before any proof, opened Attest streams without
# sending their message, and the server grew by ~600 MiB in 8 s (~17 KiB a stream) at ~80 % of
# a core. HTTP/2 asks for no fewer than 100; an agent's calls past it wait for a stream.
NODE_MAX_STREAMS = 100


class Server:
    """svid-server: `await start()`, then `await stop()` (or `run(stop_event)`)."""

    def __init__(
        self,
        config: ServerConfig,
        clock: Clock | None = None,
        *,
        new_datastore: bool = False,
        restored_datastore: bool = False,
    ) -> None:
        """`new_datastore`: a missing SQLite datastore, or a PostgreSQL schema recording no
        migration, is begun anew even beside the key files and audit checkpoints of one
        (server/datastore/lost.py); refused otherwise. `restored_datastore`: a datastore whose
        audit chain lacks the last checkpoint the data_dir signed (restored from a backup) is
        served from, the rollback recorded (server/audit/rollback.py); refused otherwise."""
        self.config = config
        self._new_datastore = new_datastore
        self._restored_datastore = restored_datastore
        self._restored_window: RestoredWindow | None = None
        # Whether the datastore held nothing a server wrote when this start found it (missing,
        # empty, or a PostgreSQL schema recording no migration): what `new_datastore` is for.
        self._found_empty = False
        # Set (from any thread) when a datastore commit's outcome is unknown: the server stops
        # serving and `run` raises it, so the process exits non-zero and starts again from
        # what the disk holds (server/datastore/errors.py, CommitUnknownError).
        self._fatal: CommitUnknownError | None = None
        self._failed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.clock: Clock = clock or SystemClock()
        self.ids = ServerIds(config.trust_domain)
        self.metrics = Metrics()
        self.notifier = ChangeNotifier()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._node_server: grpc.aio.Server | None = None
        self._admin_server: grpc.aio.Server | None = None
        # svid's, not grpcio's: a Watch that grants no window (anyone on the attest port)
        # held grpcio's lock, and with it every status change and the stop.
        self._health = HealthServicer()
        self._admin_health = HealthServicer()
        self._metrics_http: MetricsHttpServer | None = None
        # Why a serving server should be sent no agents (a stale view, a ledger that cannot
        # commit): /healthz and the node service's gRPC health both follow it.
        self.health = HealthReasons(self._health_turned)
        self.ledger_outage = LedgerOutage(self.clock, self._ledger_turned)
        self._executor: ThreadPoolExecutor | None = None
        self._jwt_executor: ThreadPoolExecutor | None = None
        self._workers: SigningWorkers | None = None
        self._loop_workers: LoopSigningWorkers | None = None
        self._serving = False
        self.runtime: RuntimeInfo | None = None
        self.propagator: Propagator | None = None
        self.follower: FeedFollower | None = None
        self.node: NodeServicer | None = None
        self._authority: AgentAuthority | None = None
        self.oauth: OAuthService | None = None
        self.descriptor_limit = 0  # the soft RLIMIT_NOFILE once started
        self.grpc_max_connections = 0  # the agents' ports' connection cap once started
        self.federation: Federation | None = None
        self._budgets: list[RefusalBudget] = []

    # -- construction -------------------------------------------------------------------------

    def _refusal_budget(
        self, source: str, rate: float, burst: int, kind: str = "refusals"
    ) -> RefusalBudget:
        budget = RefusalBudget(
            source,
            rate=rate,
            burst=burst,
            clock=self.clock,
            dropped=self.metrics.refusals_unrecorded.labels(source=source).inc,
            kind=kind,
        )
        self._budgets.append(budget)  # its tally goes on the audit log (_record_unrecorded)
        return budget

    def _new_schema(self, dsn: str) -> None:
        """A PostgreSQL schema recording no migration is about to be made: refused beside the
        files a server on a datastore made, as a missing SQLite datastore is (lost.py)."""
        if not self._new_datastore:
            refuse_new(
                redact_dsn(dsn),
                "empty (its schema holds no datastore: dropped, emptied or never made)",
                made_with_a_datastore(self.config),
            )
        else:
            _starting_anew(redact_dsn(dsn))
        self._found_empty = True

    def _refuse_rollback(self) -> Rollback | None:
        """Refused on a datastore gone back behind the checkpoints signed of it, before
        anything is written to it, unless told it was restored (or begun anew: nothing of
        the old one is there to lose); the rollback so accepted, recorded once the audit log
        is up (accept_rollback). Told it was restored where nothing was, refused too."""
        rollback = find_rollback(self.datastore, self.config.data_dir)
        if rollback is None:
            if self._restored_datastore:
                # Else the flag, left in a unit file after its one start, takes the next
                # restore (or rollback) unasked.
                raise refuse_restored_flag(self.config.data_dir)
            if self._new_datastore and not self._found_empty:
                # Likewise: it would begin the next lost datastore anew unasked.
                raise refuse_new_flag(self.config.datastore_shown)
            return None
        # A datastore begun anew holds no audit event; one that holds some was restored.
        begun_anew = self._new_datastore and rollback.head is None
        if not (self._restored_datastore or begun_anew):
            raise refuse_rollback(rollback)
        return rollback

    def _build_core(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dsn = cfg.datastore_dsn
        if dsn is None:
            # Asked only with the flag: a start without it reads nothing more.
            self._found_empty = self._new_datastore and (
                is_missing(cfg.datastore_path) or records_nothing(cfg.datastore_path)
            )
            if not self._new_datastore:
                refuse_lost(
                    cfg.datastore_path, made_with_a_datastore(cfg), made_after_its_keys(cfg)
                )
            elif is_missing(cfg.datastore_path):
                _starting_anew(str(cfg.datastore_path))
            sqlite = SqliteDataStore(
                cfg.datastore_path, self.clock, on_commit_unknown=self._commit_unknown
            )
            import_legacy_files(sqlite, cfg.data_dir, self.clock)
            self.datastore: DataStore = sqlite
        else:
            # Files of versions older than the shared datastore are SQLite's only.
            self.datastore = open_postgres(
                dsn, self.clock, on_new_schema=lambda: self._new_schema(dsn)
            )
        # Before anything is loaded: what other servers commit from here on is followed.
        self._feed_cursor = self.datastore.feed_head()
        rollback = self._refuse_rollback()
        # Before this start writes anything: the newest write is the restored datastore's own.
        self._restored_window = (
            restored_window(self.datastore, self.clock.now())
            if rollback is not None and self._restored_datastore
            else None
        )
        self.keystore = KeyStore(cfg.keys_dir)
        # With a KEK the CA and JWT keys are the trust domain's, shared with the other servers
        # on this datastore (sealed in it); without, they are this server's own files.
        kek_file = cfg.key_encryption_key_file
        kek = KeyEncryptionKey.load(kek_file) if kek_file is not None else None
        self.ca = CaManager(
            ca_config(cfg),
            self.datastore,
            self.keystore,
            self.clock,
            kek=kek,
        )
        self.ca.initialize()
        self.rotator = Rotator(self.ca, self.clock)
        self.state = ServerState(self.datastore, self.clock, self.notifier)
        self.state.load()
        self.tasks: TaskLayer = build_task_layer(
            datastore=self.datastore,
            policy_dir=cfg.policy_dir,
            trust_domain=cfg.trust_domain.name,
            state=self.state,
            ca=self.ca,
            server_id=str(self.ids.server),
            clock=self.clock,
            settings=TaskSettings(
                max_active_per_runtime=cfg.max_active_tasks_per_runtime,
                mint_pairs_rate_per_agent=cfg.task_mint_pairs_rate_per_agent,
                mint_pairs_burst_per_agent=cfg.task_mint_pairs_burst_per_agent,
            ),
            denials=self._refusal_budget(
                "task", cfg.task_denial_rate_per_agent, cfg.task_denial_burst_per_agent
            ),
            outage=self.ledger_outage,
            announce_policy=self.datastore.announce_policy,
            announced_policy=self.datastore.announced_policy,
        )
        if self._restored_window is not None:
            # An agent whose newer SVID the restore lost is not lapsed until it had the time to
            # call and have it adopted: until that SVID, signed before the restore, expired.
            self.tasks.service.hold_agent_lapses_until(
                self._restored_window.restored_at + cfg.agent_svid_ttl + MAX_CLOCK_SKEW
            )
        # A host started with another policy_dir than the fleet's last reload says so at once
        # (announcements after the feed cursor read above come through the follower).
        announced = self.datastore.announced_policy()
        if rollback is not None and self._restored_datastore:
            # Its announcements after the copy are lost: this server's set is announced again.
            self.tasks.fleet.restored(announced, backup_before=rollback.checkpoint.time)
        else:
            self.tasks.fleet.started(announced)
        # With a KEK the checkpoint key is the trust domain's, like the CA's: every server
        # signs with it, so one pinned key checks all of their checkpoints.
        signer = (
            CheckpointSigner.load_or_create(cfg.data_dir)
            if kek is None
            else CheckpointSigner.load_shared(
                cfg.data_dir, self.datastore, kek, int(self.clock.now())
            )
        )
        if rollback is not None:
            accept_rollback(rollback, self.tasks.audit, cfg.data_dir, self.clock.now())
        # Checkpoints and retention: one server of those sharing the datastore, the holder of
        # this lease (server/housekeeping.py says which job runs where, and why).
        self.housekeeping = Lease(self.datastore, HOUSEKEEPING_LEASE, default_holder(), self.clock)
        self.housekeeping.renew()
        self.checkpointer = LeasedCheckpointer(
            self.tasks.audit,
            signer,
            CheckpointFile(cfg.data_dir / CHECKPOINT_FILE),
            self.clock,
            cfg.audit_checkpoint_interval,
            lease=self.housekeeping,
            # Every new checkpoint goes to every agent over Sync; they keep the latest.
            on_checkpoint=self.state.set_audit_checkpoint,
            # Shared with the other servers: they file and push what the holder signs.
            records=self.datastore,
            on_refused=lambda reason: self.metrics.audit_checkpoint_refusals.labels(
                reason=reason
            ).inc(),
        )
        if self.housekeeping.held or rollback is not None:
            # Anchor what this start found (a crash may have cost the shutdown checkpoint); a
            # restored datastore's lease may name the server the backup was taken from until
            # it lapses, and its rollback is anchored at once all the same.
            self.checkpointer.checkpoint()
        self.pruner = LeasedPruner(
            self.datastore,
            self.tasks.audit,
            self.checkpointer,
            self.clock,
            RetentionPolicy(cfg.audit_retention_days * DAY, cfg.audit_max_events),
            lease=self.housekeeping,
            interval=cfg.audit_prune_interval,
        )
        self.tls = ServerTls(self.ca, self.clock, cfg.server_svid_ttl)
        self.metrics.x509_ca_expiry.set_function(self._x509_ca_expiry)
        self.metrics.policy_diverged.set_function(lambda: self.tasks.fleet.diverged is not None)
        self.metrics.svid_expiry.set_function(
            lambda: chain[0].not_valid_after_utc.timestamp() if (chain := self.tls.chain) else 0
        )
        self._apply_bundle()
        self.tls.renew()

    def _attestors(self) -> dict[str, NodeAttestor]:
        attestors: dict[str, NodeAttestor] = {
            "join_token": JoinTokenAttestor(self.datastore, self.ids, self.clock)
        }
        if self.config.x509pop_ca_bundle is not None:
            attestors["x509pop"] = X509PopAttestor(
                _load_ca_file(self.config.x509pop_ca_bundle),
                self.ids,
                self.clock,
                own_cas=self.ca.issuing_cas,
            )
        return attestors

    def _apply_bundle(self) -> None:
        bundle = self.ca.bundle()
        expiry = {s.kid: s.not_after for s in self.ca.key_slots("jwt")}
        self.tls.set_roots(tuple(bundle.x509_authorities))
        self.state.set_bundle(bundle, expiry)
        if self.oauth is not None:
            self.oauth.bundle_changed()

    def on_key_slots_changed(self) -> None:
        """Another server changed the key slots (the change feed saw it): adopt them now rather
        than at the next rotation tick. Any thread; bundle subscribers hear of the change."""
        try:
            self.ca.reload()
        except Exception:
            _log.exception("adopting changed key slots failed; the next rotation tick retries")

    def _on_bundle_changed(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        def changed() -> None:
            def apply() -> None:
                self._apply_bundle()
                self.metrics.rotations.labels(kind="bundle").inc()
                _log.info("bundle changed", extra={"sequence": self.state.bundle.sequence})

            loop.call_soon_threadsafe(apply)

        return changed

    def _grpc_options(self) -> list[tuple[str, int]]:
        size = self.config.max_message_bytes
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # Two servers must never share a port silently.
            ("grpc.so_reuseport", 0),
            *KEEPALIVE_OPTIONS,
        ]

    def _node_grpc_options(self) -> list[tuple[str, int]]:
        # The agents' ports are open to the network: a connection past the cap is closed at
        # once, a silent one at the handshake timeout, one calling nothing when idle. The
        # admin socket's are the operator's, behind file permissions.
        return [
            *self._grpc_options(),
            ("grpc.max_allowed_incoming_connections", per_port(self.grpc_max_connections)),
            ("grpc.max_concurrent_streams", NODE_MAX_STREAMS),
            ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT * 1000)),
            ("grpc.max_connection_idle_ms", int(GRPC_IDLE_TIMEOUT * 1000)),
        ]

    # -- lifecycle ----------------------------------------------------------------------------

    def _commit_unknown(self, error: CommitUnknownError) -> None:
        """The datastore's word, once, on the thread whose commit failed: fail-stop. Serving
        on would answer from caches, a changelog and a revision that the disk may contradict
        after recovery; retrying the fsync would take an error the kernel may not report
        twice for success (PostgreSQL's data_sync_retry=off, for the same reason)."""
        self._fatal = error
        _log.critical(str(error))  # names the datastore, the error and what to do
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._failed.set)

    async def start(self) -> RuntimeInfo:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        # Every agent's stream and every HTTP client holds a descriptor: the soft limit (often
        # 1024) would run out long before the hard one.
        self.descriptor_limit = raise_descriptor_limit()
        warn_if_short(cfg, self.descriptor_limit)
        self.grpc_max_connections = budget(cfg).grpc_cap(self.descriptor_limit)
        metrics_address = ""
        if cfg.metrics_address:
            # First: an address it cannot listen on is the operator's to fix, before anything
            # else starts (its /healthz says 503 until the server serves).
            # As the node service's gRPC health: a server whose view of a shared datastore is
            # stale (Sync refused), or whose ledger cannot commit (every identity decision
            # refused), is not one to send agents to, whichever probe asks.
            self._metrics_http = MetricsHttpServer(
                self.metrics,
                lambda: self._serving and self.health.healthy(),
                self._unhealthy_reasons,
            )
            with listening("metrics_address", cfg.metrics_address, ConfigError):
                metrics_address = self._metrics_http.start(cfg.metrics_address)
        await asyncio.to_thread(self._build_core)
        loop = asyncio.get_running_loop()
        self.propagator = Propagator(self.state, str(self.ids.server), self.clock)
        self.propagator.start()
        self.ca.subscribe(self._on_bundle_changed(loop))
        self.federation = Federation.build(
            cfg,
            state=self.state,
            datastore=self.datastore,
            audit=self.tasks.audit,
            ca=self.ca,
            clock=self.clock,
            # Scheduled fetches of a foreign bundle: one server per relationship (a lease).
            holder=default_holder(),
            connection_metrics=self.metrics.http_listener("bundle_endpoint"),
        )
        await self.federation.start()
        # Real time, whatever clock the server runs on: the feed's poll waits real seconds.
        # Only a shared datastore has a feed that other servers write to.
        view = ViewFreshness(
            SystemClock(),
            stale_after(cfg.feed_poll_interval) if cfg.datastore_dsn is not None else None,
        )
        self.follower = FeedFollower(
            datastore=self.datastore,
            state=self.state,
            tasks=self.tasks.service,
            on_key_slots_changed=self.on_key_slots_changed,
            clock=self.clock,
            cursor=self._feed_cursor,
            settings=FollowSettings(cfg.feed_poll_interval, cfg.feed_retention),
            on_audit_records=self.checkpointer.adopt,
            federation=self.federation.service,
            view=view,
            on_policy_announced=self.tasks.fleet.on_announced,
            on_feed_restored=self.tasks.fleet.restored,
        )
        self._executor = ThreadPoolExecutor(cfg.signing_threads, thread_name_prefix="svid-sign")
        # JWT batches the loop's workers do not take (task identities, small batches, workers
        # starting): two threads per signing worker, each waiting on a worker or on the ledger.
        jwt_threads = 2 * max(1, cfg.signing_processes)
        self._jwt_executor = ThreadPoolExecutor(jwt_threads, thread_name_prefix="svid-jwt")
        # Two pools, each started on first use: X.509 batches are handed over from threads,
        # workload JWT batches from the event loop (LoopSigningWorkers says why).
        self._workers = SigningWorkers(cfg.signing_processes, self.clock)
        self._loop_workers = LoopSigningWorkers(cfg.signing_processes, self.clock)
        limiters = Limiters(
            x509=KeyedLimiter(cfg.x509_rate_per_agent, cfg.x509_burst_per_agent, self.clock),
            jwt=KeyedLimiter(cfg.jwt_rate_per_agent, cfg.jwt_burst_per_agent, self.clock),
            attest=KeyedLimiter(cfg.attest_rate_per_host, cfg.attest_burst_per_host, self.clock),
            sync=KeyedLimiter(SYNC_OPENS_PER_SECOND, SYNC_OPENS_BURST, self.clock),
        )
        # The spine: the node API calls the issuer; the issuer asks the task layer (its
        # TaskDecisions port) and records through the ledger port before anything is sent.
        # One transaction per group of issuances: credential rows and audit events together.
        ledger = MeteredLedger(DatastoreLedger(Ledger(self.tasks.audit)), self.metrics)
        self.issuer = Issuer(
            state=self.state,
            ca=self.ca,
            ids=self.ids,
            ledger=ledger,
            tasks=self.tasks.decisions,
            clock=self.clock,
            metrics=self.metrics,
            executor=self._executor,
            jwt_executor=self._jwt_executor,
            workers=self._workers,
            loop_workers=self._loop_workers,
            settings=IssuerSettings(
                default_x509_svid_ttl=cfg.default_x509_svid_ttl,
                default_jwt_svid_ttl=cfg.default_jwt_svid_ttl,
                # Half the JWT batch threads: one agent's task batches (a policy decision per
                # item) leave the rest to the others.
                jwt_threads_per_agent=max(1, jwt_threads // 2),
            ),
        )
        agents = AgentAdmission(
            state=self.state,
            ca=self.ca,
            ledger=ledger,
            clock=self.clock,
            metrics=self.metrics,
            executor=self._executor,
            agent_svid_ttl=cfg.agent_svid_ttl,
            on_agent_removed=self.tasks.agent_removed,
            outage=self.ledger_outage,
        )
        # Who calls as an agent, for the node API and the task layer alike.
        peers = PeerCache(self.ids, self.ca.issuing_cas)
        # Servers sharing a datastore: an old view's acceptance is checked with the datastore.
        authority = self._authority = AgentAuthority(
            self.state,
            datastore_reader(self.datastore),
            self.clock,
            view=self.follower.view if cfg.datastore_dsn is not None else None,
            adoption=None
            if self._restored_window is None
            else CertificateAdoption(
                self.state, self.tasks.audit, self._restored_window, self.clock
            ),
        )
        node = NodeServicer(
            state=self.state,
            issuer=self.issuer,
            agents=agents,
            ids=self.ids,
            attestors=self._attestors(),
            settings=NodeSettings(
                attest_timeout=cfg.attest_timeout, heartbeat_interval=cfg.sync_heartbeat_interval
            ),
            limiters=limiters,
            clock=self.clock,
            metrics=self.metrics,
            crl=self.tasks.crl,
            propagator=self.propagator,
            # Servers sharing a datastore: a snapshot is made of a view caught up as of the
            # request, not one a feed poll behind the server the agent comes from.
            view=CurrentView(
                self.follower.view,
                self.follower.catch_up if cfg.datastore_dsn is not None else None,
            ),
            peers=peers,
            authority=authority,
        )
        self.node = node
        admin = AdminServicer(
            on_agent_removed=self.tasks.agent_removed,
            finish_removal=self.tasks.removal_finished,
            state=self.state,
            datastore=self.datastore,
            ids=self.ids,
            clock=self.clock,
            metrics=self.metrics,
            join_token_ttl=cfg.join_token_ttl,
            audit_checkpoint=lambda: asyncio.to_thread(self.checkpointer.checkpoint, force=True),
            federation=self.federation.service,
        )
        # Two gRPC servers: the admin service must never be reachable over the network ports.
        self._node_server = grpc.aio.server(options=self._node_grpc_options())
        node_pb2_grpc.add_NodeServicer_to_server(node, self._node_server)
        self._node_server.add_generic_rpc_handlers(
            self.tasks.node_handlers(
                self.state,
                peers,
                self._refusal_budget(
                    "validation",
                    cfg.validation_refusal_rate_per_agent,
                    cfg.validation_refusal_burst_per_agent,
                ),
                self._refusal_budget(
                    "validation_accepted",
                    cfg.validation_accepted_rate_per_agent,
                    cfg.validation_accepted_burst_per_agent,
                    kind="reports of accepted tokens",
                ),
                KeyedLimiter(
                    cfg.task_begin_rate_per_runtime, cfg.task_begin_burst_per_runtime, self.clock
                ),
                authority=authority,
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._node_server)
        node_port = _bind(
            "bind_address",
            cfg.bind_address,
            lambda: self._node_server_add(cfg.bind_address, require_client_auth=True),
        )
        attest_port = _bind(
            "attest_bind_address",
            cfg.attest_bind_address,
            lambda: self._node_server_add(cfg.attest_bind_address, require_client_auth=False),
        )
        self._admin_server = grpc.aio.server(options=self._grpc_options())
        admin_pb2_grpc.add_AdminServicer_to_server(admin, self._admin_server)
        self._admin_server.add_generic_rpc_handlers(self.tasks.admin_handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self._admin_health, self._admin_server)
        admin_socket.prepare(cfg.admin_socket)
        admin_server = self._admin_server
        with admin_socket.created_private():
            _bind(
                "admin_socket",
                str(cfg.admin_socket),
                # As a URI, like the CLI's target: "%" (or "?", "#") in the path stays itself.
                lambda: admin_server.add_insecure_port(grpc_unix_target(cfg.admin_socket)),
            )
        # Until it serves, a probe hears NOT_SERVING (grpcio's said SERVING for "" from the start).
        for service in ("", NODE_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", ADMIN_SERVICE):
            await self._admin_health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._node_server.start()
        await self._admin_server.start()
        admin_socket.lock_down(cfg.admin_socket)

        if cfg.oidc_issuer:
            self.oauth = await self._start_oauth()

        # Which of these run on every server sharing the datastore, and which on one of them
        # (and why): the table in server/housekeeping.py.
        self._tasks = [
            asyncio.create_task(self.rotator.run(self._stop), name="ca-rotator"),
            asyncio.create_task(self._tls_loop(), name="server-svid"),
            asyncio.create_task(self._housekeeping_loop(), name="housekeeping"),
            asyncio.create_task(self._lease_loop(), name="housekeeping-lease"),
            asyncio.create_task(
                self.tasks.run(self._stop, self.clock, settles=lambda: self.housekeeping.held),
                name="tasks",
            ),
            asyncio.create_task(self.checkpointer.run(self._stop), name="audit-checkpoints"),
            asyncio.create_task(self.pruner.run(self._stop), name="audit-retention"),
            asyncio.create_task(
                self.ledger_outage.run(self._stop, self.tasks.audit, str(self.ids.server)),
                name="ledger-outage",
            ),
            asyncio.create_task(self.propagator.run_expiry(self._stop.is_set), name="entry-expiry"),
            asyncio.create_task(
                self.propagator.run_heartbeats(cfg.sync_heartbeat_interval, self._stop),
                name="sync-heartbeats",
            ),
            asyncio.create_task(self.federation.run(self._stop), name="federation"),
            asyncio.create_task(self.follower.run(self._stop), name="change-feed"),
            asyncio.create_task(
                self.follower.view.watch(self._stop, self.propagator.wake_all, self._view_turned),
                name="view-freshness",
            ),
        ]
        if self.oauth is not None:
            self._tasks.append(asyncio.create_task(self.oauth.run(self._stop), name="oauth"))
        self._serving = True
        await self._node_health_follows()
        for service in ("", ADMIN_SERVICE):
            await self._admin_health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.runtime = RuntimeInfo(
            trust_domain=cfg.trust_domain.name,
            node_address=host_port(cfg.bind_address, node_port),
            attest_address=host_port(cfg.attest_bind_address, attest_port),
            admin_socket=str(cfg.admin_socket),
            metrics_address=metrics_address,
            pid=os.getpid(),
        )
        # Logged before the runtime file is written: whoever waits for the file (tests, the
        # demo) finds the line already in the log.
        _log.info(
            "server started",
            extra={
                "trust_domain": cfg.trust_domain.name,
                "datastore": cfg.datastore_shown,
                "node_address": self.runtime.node_address,
                "attest_address": self.runtime.attest_address,
                "admin_socket": self.runtime.admin_socket,
                "metrics_address": metrics_address,
                "descriptor_limit": self.descriptor_limit,
                "grpc_max_connections": self.grpc_max_connections,
            },
        )
        self.runtime.write(cfg.runtime_file)
        return self.runtime

    async def _start_oauth(self) -> OAuthService:
        # Imported here: h11 (the oauth extra) is needed only when an issuer is configured.
        from server.oauth.settings import check_server_config  # noqa: PLC0415
        from server.oauth.wiring import build  # noqa: PLC0415

        service = build(
            check_server_config(self.config),
            ca=self.ca,
            datastore=self.datastore,
            ledger=Ledger(self.tasks.audit),
            tasks=self.tasks.service,
            clock=self.clock,
            audit=self.tasks.audit.append,
            revoked=self.state.is_jwt_revoked,
            refusals=self._refusal_budget(
                "oauth",
                self.config.oauth_refusal_rate_per_host,
                self.config.oauth_refusal_burst_per_host,
            ),
            connection_metrics=self.metrics.http_listener("oauth"),
        )
        with listening("oauth_bind_address", self.config.oauth_bind_address, ConfigError):
            await service.start()
        return service

    def _node_server_add(self, address: str, *, require_client_auth: bool) -> int:
        assert self._node_server is not None
        port: int = self._node_server.add_secure_port(
            address, self.tls.credentials(require_client_auth=require_client_auth)
        )
        return port

    def _x509_ca_expiry(self) -> float:
        try:
            ca = self.ca.x509_signer().ca_certificate
        except CaUnavailableError:
            return 0
        return ca.not_valid_after_utc.timestamp()

    async def _view_turned(self, stale: bool) -> None:
        # A load balancer checking the node service's health sends no agent to a server whose
        # view is stale (Sync refuses them there) and sends them again once it reads the feed.
        if stale:
            self.health.set(DATASTORE_VIEW, "this server's view of the datastore is stale")
        else:
            self.health.clear(DATASTORE_VIEW)

    def _ledger_turned(self, reason: str | None) -> None:
        # The ledger's outage (LedgerOutage), on the committing thread: the metric, and no
        # agent sent to a server that refuses every identity decision.
        if reason is None:
            self.metrics.ledger_available.set(1)
            self.health.clear(LEDGER)
        else:
            self.metrics.ledger_available.set(0)
            self.health.set(LEDGER, f"the audit ledger cannot commit ({reason})")

    def _health_turned(self, healthy: bool) -> None:
        """HealthReasons' turns, on whichever thread made them (the ledger's are a writer's)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.create_task(self._node_health_follows()))

    async def _node_health_follows(self) -> None:
        """The node service's gRPC health as the health reasons have it now (read now, not
        as the turn that called it had it: turns from threads may land out of order)."""
        if not self._serving:
            return  # NOT_SERVING until the start ends; the stop's graceful shutdown after
        status = health_pb2.HealthCheckResponse
        serving = status.SERVING if self.health.healthy() else status.NOT_SERVING
        for service in ("", NODE_SERVICE):
            await self._health.set(service, serving)

    def _unhealthy_reasons(self) -> list[str]:
        if not self._serving:
            return ["not serving (starting or stopping)"]
        return self.health.reasons()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the server is stopping."""
        await set_within(self._stop, max(0.05, seconds))
        return self._stop.is_set()

    async def _tls_loop(self) -> None:
        while not await self._sleep(min(MAX_TIMER, self.tls.due_in())):
            await self._guarded(self._renew_tls)

    async def _renew_tls(self) -> None:
        if await asyncio.to_thread(self.tls.maybe_renew):
            self.metrics.rotations.labels(kind="server_svid").inc()
            _log.info("server SVID renewed")

    async def _housekeeping_loop(self) -> None:
        while not await self._sleep(HOUSEKEEPING_INTERVAL):
            await self._guarded(self.state.prune)
            await self._guarded(self._record_unrecorded)
            if self.follower is not None:
                await self._guarded(self._prune_feed)

    async def _lease_loop(self) -> None:
        lease = self.housekeeping
        while not await self._sleep(min(MAX_LEASE_WAIT, lease.due_in())):
            if lease.due_in() <= 0:
                await self._guarded(self._renew_lease)

    async def _renew_lease(self) -> None:
        if await asyncio.to_thread(self.housekeeping.renew):
            # Taken over from a server that stopped renewing: anchor the head now, as a start
            # does (the one before may have died before its last checkpoint).
            await asyncio.to_thread(self.checkpointer.checkpoint)

    async def _prune_feed(self) -> None:
        if self.follower is not None:
            await self.follower.prune()

    async def _record_unrecorded(self) -> None:
        """One audit event per refusal budget that left refusals off the record since the
        last: the log counts every refusal, if not each one in a row of its own. On every
        server (each has its own budgets)."""
        taken = [(b, t) for b in self._budgets if (t := b.take_unrecorded()) is not None]
        if not taken:
            return
        try:
            await asyncio.to_thread(self.tasks.audit.append_many, [t.draft() for _, t in taken])
        except Exception:
            # One transaction, none written: the next run counts these too.
            for budget, tally in taken:
                budget.restore(tally)
            raise

    async def _guarded(self, job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        except Exception:
            _log.exception("background job failed; retrying later")

    async def stop(self) -> None:
        if self._stop.is_set():
            return
        _log.info("server stopping")
        self._serving = False
        self._stop.set()
        self.state.shutting_down = True
        self.notifier.notify()
        if self.propagator is not None:
            self.propagator.wake_all()
        await self._health.enter_graceful_shutdown()
        await self._admin_health.enter_graceful_shutdown()
        grace = self.config.shutdown_grace
        for server in (self._node_server, self._admin_server):
            if server is not None:
                await server.stop(grace)
        # No call comes in any more; an end whose caller left runs on: done before the close.
        await self.tasks.drain()
        if self._authority is not None:
            await self._authority.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.oauth is not None:
            await self.oauth.stop()
        if self.federation is not None:
            await self.federation.stop()
        if self._fatal is None:  # after an unknown commit the datastore takes no write
            await self._guarded(self._record_unrecorded)  # nothing refuses any more: the last
        if self._metrics_http is not None:
            self._metrics_http.stop()
        for executor in (self._executor, self._jwt_executor):
            if executor is not None:
                executor.shutdown(wait=True)
        if self._workers is not None:
            self._workers.close()
        if self._loop_workers is not None:
            self._loop_workers.close()
        if self._fatal is None:
            await self._release()
        self.datastore.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.runtime_file.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.config.admin_socket.unlink()
        _log.info("server stopped")

    async def _release(self) -> None:
        """The writes of a clean stop: the last checkpoint, and the leases handed over. Not
        after a commit whose outcome is unknown: the datastore takes no write then, and a
        checkpoint would anchor a head that recovery may yet move."""
        await asyncio.to_thread(self._last_checkpoint)
        try:
            await asyncio.to_thread(self.housekeeping.release)  # hand it over now
        except Exception:
            _log.exception("releasing the housekeeping lease failed; it lapses on its own")
        try:
            await asyncio.to_thread(self.ca.close)  # hand the rotation lease over now
        except Exception:
            _log.exception("releasing the ca-rotation lease failed; it lapses on its own")

    def _last_checkpoint(self) -> None:
        """Nothing is served any more: anchor the head (every issuance was committed before
        its reply, so the ledger holds nothing unwritten). The checkpointer's job only."""
        if not self.housekeeping.held:
            return
        try:
            self.checkpointer.checkpoint()
        except Exception:
            _log.exception("the shutdown audit checkpoint failed")

    async def run(self, stop: asyncio.Event, started: Callable[[], None] | None = None) -> None:
        """Start, call `started`, serve until `stop` is set, then shut down cleanly.
        CommitUnknownError when a datastore commit's outcome became unknown: the server
        stopped on it."""
        await self.start()
        if started is not None:
            started()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._failed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await self.stop()
        if self._fatal is not None:
            raise self._fatal
