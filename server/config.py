"""Server configuration: a TOML file plus command-line flags (flags win), validated once.

Every key of the TOML file is also a flag (``data_dir`` -> ``--data-dir``). Validation happens in
one place, `build_config`, and each error names the key it is about.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from server.attestation.join_token import MAX_TOKEN_TTL
from server.datastore.postgres_dsn import check_dsn, is_postgres_dsn, redact_dsn
from server.errors import ConfigError
from svid._daemon_config import (
    FileWords,
    as_choice,
    as_finite,
    as_whole,
    check_address,
    expand_path,
    read_table,
    refuse_unknown,
)
from svid._errors import SpiffeIdError
from svid._logs import LOG_FORMATS, LOG_LEVELS
from svid._spiffe_id import TrustDomain
from svid._unix_socket import MAX_UNIX_PATH, unix_path_size

log = logging.getLogger(__name__)

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")
DEFAULT_ADMIN_SOCKET = Path("/tmp/svid-server/private/admin.sock")  # noqa: S108 - SPIRE's layout


@dataclass(frozen=True)
class ServerConfig:
    trust_domain: TrustDomain
    data_dir: Path = Path(".svid-server")
    bind_address: str = "127.0.0.1:8081"
    attest_bind_address: str = "127.0.0.1:8082"
    admin_socket: Path = DEFAULT_ADMIN_SOCKET
    metrics_address: str = ""
    default_x509_svid_ttl: int = 300
    default_jwt_svid_ttl: int = 300
    agent_svid_ttl: int = 3600
    server_svid_ttl: int = 3600
    ca_ttl: int = 86400
    jwt_key_ttl: int = 86400
    join_token_ttl: int = 600
    key_type: str = "ec-p256"
    upstream_ca_cert: Path | None = None
    upstream_ca_key: Path | None = None
    x509pop_ca_bundle: Path | None = None
    log_format: str = "json"
    log_level: str = "info"
    max_message_bytes: int = 4 * 1024 * 1024
    shutdown_grace: float = 5.0
    # How long Attest waits for each agent message (first params, x509pop answer).
    attest_timeout: float = 30.0
    # Token buckets; 0 disables a limit. Signing counts CSRs, not requests, so that
    # batching cannot dodge the limit.
    x509_rate_per_agent: float = 1000.0
    x509_burst_per_agent: int = 2000
    jwt_rate_per_agent: float = 500.0
    jwt_burst_per_agent: int = 1000
    attest_rate_per_host: float = 10.0
    attest_burst_per_host: int = 50
    # Reports of refused tokens (ValidateJWTSVID, forwarded by agents) written to the audit
    # log per agent, as a token bucket: any local process may have forged tokens validated,
    # and past this they are only counted (svid_server_refusals_unrecorded). 0 writes them all.
    validation_refusal_rate_per_agent: float = 10.0
    validation_refusal_burst_per_agent: int = 1000
    # Reports of accepted tokens, likewise but more generous: an agent reports each token,
    # caller and audience once while the token is valid, and only a compromised one reports
    # faster (svid_server_refusals_unrecorded{source="validation_accepted"}). 0 writes them all.
    validation_accepted_rate_per_agent: float = 100.0
    validation_accepted_burst_per_agent: int = 10_000
    # Task denials (a begin or a mint its policy refuses) written to the audit log per agent,
    # likewise: a node's workloads may ask again and again. 0 writes them all.
    task_denial_rate_per_agent: float = 10.0
    task_denial_burst_per_agent: int = 1000
    # Tasks a runtime (a workload beginning tasks through its agent) may begin, and hold active
    # at once. Each begin writes a task row, an entry pushed to its agent and audit events: one
    # workload must neither flood the server nor crowd out its node's others. 0 lifts a limit.
    task_begin_rate_per_runtime: float = 20.0
    task_begin_burst_per_runtime: int = 200
    max_active_tasks_per_runtime: int = 1000
    # Policy decisions an agent's tasks may ask for, in (action, audience) pairs a second: a
    # task JWT mint is decided afresh over its task's actions times its audiences, a hundred
    # times a signature's CPU for a few dozen pairs, which jwt_rate_per_agent counts as one;
    # a token exchange or delegation of the task's is charged here too. A decision policy
    # answers from its cache costs nothing, but for a delegation's (nothing else bounds those),
    # which is charged to a budget of the actor's for the task's agent, not to the agent's.
    task_mint_pairs_rate_per_agent: float = 1000.0
    task_mint_pairs_burst_per_agent: int = 4000
    # Threads that run issuance batches (and sign the small ones, and agent SVIDs). Big
    # batches wait on a signing worker here; one per CPU keeps every worker fed.
    signing_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Worker processes in each of two pools, one signing big X.509-SVID batches (>= 8 items;
    # server/ca/workers.py), one big workload JWT-SVID batches (server/ca/loop_workers.py),
    # each started on its first batch; 0 signs everything in the server process. cryptography
    # holds the GIL while it signs and verifies, and so does the Python around each signature:
    # in the server, all of it took turns on one core.
    signing_processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Task policies (*.cedar + optional schema); None = the shipped default policy.
    policy_dir: Path | None = None
    # Seconds between signed checkpoints of the audit head (written only when it moved);
    # one is also written at clean shutdown and on `svid-server audit checkpoint`.
    audit_checkpoint_interval: float = 60.0
    # Audit retention (server/audit/retention.py; README "Audit retention"): events older
    # than this many days are pruned behind a signed prune record; 0 keeps them forever.
    # 30 days covers an incident found weeks late; keep longer with `audit export`.
    audit_retention_days: float = 30.0
    # Also prune all but the newest N events (a size bound, ~0.5 KB each); 0 = no bound.
    audit_max_events: int = 0
    # Seconds between prune runs.
    audit_prune_interval: float = 3600.0
    # Where the datastore lives: "" is <data_dir>/datastore.sqlite3; a path, a SQLite file
    # there; a postgresql:// URL, that PostgreSQL database (several servers may share one).
    # Out of repr: a URL may hold a password (better kept in PGPASSWORD or ~/.pgpass).
    datastore: str = field(default="", repr=False)
    # Changes made through other servers on the same datastore (server/replication.py): the
    # feed is read at least this often without a wake-up, and rows older than
    # feed_retention seconds are pruned (a server down longer reloads everything).
    feed_poll_interval: float = 1.0
    feed_retention: float = 3600.0
    # Seconds between two heartbeats on a quiet Sync stream (agents that ask for them): an
    # agent counts its revocations stale after two intervals without a word, where a server
    # hung without closing the stream was heard of only when keepalive failed (~20 s).
    sync_heartbeat_interval: float = 3.0
    # Several servers, one trust domain: the file (0600, this user's) holding the 32-byte
    # key-encryption key every server of the trust domain shares. Set, the CA and JWT keys are
    # sealed into the datastore and shared (`svid-server keys new-kek --out FILE` makes one);
    # unset, they are this server's own files under data_dir/keys.
    key_encryption_key_file: Path | None = None
    # OIDC discovery + OAuth authorization server (server/oauth; README "OAuth"). Off unless
    # oidc_issuer is set: then JWT-SVIDs carry it as `iss`, and oauth_bind_address serves
    # discovery, JWKS and the token endpoint over HTTPS (cert/key files; plain HTTP only for
    # an http:// issuer on loopback). Resources: the RFC 8707 `resource` values tokens may be
    # for. Trusted bundles: "trust_domain=path" of other domains whose JWT-SVIDs are accepted.
    # Trusted issuers: "trust_domain=issuer URL" of others whose keys are found by OIDC
    # discovery (refreshed as their JWKS's max-age says), over HTTPS checked against the
    # system roots or oauth_trusted_issuers_ca. Resource workloads: "resource=SPIFFE ID" of the
    # workload serving a resource, which may exchange the tokens it receives (RFC 8693
    # actor_token) for tokens to other resources of the same task.
    oidc_issuer: str = ""
    oauth_bind_address: str = ""
    oauth_tls_cert: Path | None = None
    oauth_tls_key: Path | None = None
    oauth_resources: tuple[str, ...] = ()
    oauth_trusted_bundles: tuple[str, ...] = ()
    oauth_trusted_issuers: tuple[str, ...] = ()
    oauth_trusted_issuers_ca: Path | None = None
    oauth_resource_workloads: tuple[str, ...] = ()
    oauth_access_token_ttl: int = 300
    # Token endpoint refusals written to the audit log per client address (an IPv6 one by its
    # /64), as a token bucket: past it they are only counted (svid_server_refusals_unrecorded)
    # and a log line a minute says so. 0 writes them all. Grants are always written.
    oauth_refusal_rate_per_host: float = 1.0
    oauth_refusal_burst_per_host: int = 20
    # SPIFFE federation (server/federation; README "Federation"). bundle_endpoint_address ("" =
    # off) serves our bundle, profile https_spiffe (our server SVID) or https_web (cert/key
    # files), announcing bundle_endpoint_refresh_hint. Static relationships, one string each:
    # "<trust domain> <profile> <https URL> [<endpoint SPIFFE ID> | <CA file>]".
    bundle_endpoint_address: str = ""
    bundle_endpoint_profile: str = "https_spiffe"
    bundle_endpoint_cert: Path | None = None
    bundle_endpoint_key: Path | None = None
    bundle_endpoint_refresh_hint: int = 300
    federation_relationships: tuple[str, ...] = ()
    # The floor (seconds) on a foreign endpoint's refresh hint: each relationship is fetched,
    # and its bundle change put on the audit log, at most this often (an operator's refresh
    # excepted). SPIRE's floor is a minute too; at most an hour.
    federation_min_refresh: int = 60
    # Open connections each HTTP listener (oauth_bind_address, bundle_endpoint_address) takes
    # from one client address (an IPv6 one by its /64), and in all: past either, a new one is
    # closed at once, before TLS, and counted (svid_server_http_connections_refused). Each
    # holds a descriptor the agents' gRPC streams need too, for up to the 10 s TLS handshake
    # or the 30 s request deadline even if its client never sends a byte. Per host: more than
    # an HTTP client's pool keeps (httpx: 100); a NAT or proxy in front needs more.
    http_max_connections: int = 1024
    http_max_connections_per_host: int = 128
    # Open connections the agents' ports (bind_address and attest_bind_address together, half
    # each) take: past its half, a port closes a new connection at once. A silent one is cut
    # after the 10 s TLS handshake, one with no call after 5 minutes. 0: what the descriptor
    # limit leaves once the HTTP listeners' caps and a headroom for the server's own files are
    # set aside (logged at start), so no flood of connections can take the descriptors the
    # admin API and datastore need.
    grpc_max_connections: int = 0

    @property
    def datastore_dsn(self) -> str | None:
        """The PostgreSQL URL of the datastore; None when it is a SQLite file."""
        return self.datastore if is_postgres_dsn(self.datastore) else None

    @property
    def datastore_path(self) -> Path:
        """The SQLite file (when `datastore_dsn` is None)."""
        return Path(self.datastore) if self.datastore else self.data_dir / "datastore.sqlite3"

    @property
    def datastore_shown(self) -> str:
        """Where the datastore is, fit for a log line: a URL without its password."""
        dsn = self.datastore_dsn
        return str(self.datastore_path) if dsn is None else redact_dsn(dsn)

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def runtime_file(self) -> Path:
        """Where a running server writes its bound addresses (for port 0, tests and the demo)."""
        return self.data_dir / "server.json"


def _as_int(key: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    number = as_whole(key, value, ConfigError)
    if number < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{key}: must be at most {maximum}, got {number}")
    return number


def _as_float(key: str, value: Any) -> float:
    number = as_finite(key, value, ConfigError)
    if number < 0:
        raise ConfigError(f"{key}: must not be negative, got {number}")
    return number


def _refuse_non_utf8(key: str, text: str) -> None:
    """A flag's bytes that are not UTF-8 (Python holds them as lone surrogates) refused naming
    the key, never the value (a URL with a password): they raised UnicodeEncodeError wherever
    the text was first encoded (psycopg parsing a --datastore URL), a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{key}: not UTF-8 text") from None


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    _refuse_non_utf8(key, value)
    return value


def _as_path(key: str, value: Any) -> Path:
    """A path, with a leading ~ or ~user expanded as the agent's config does (taken literally,
    `data_dir = "~/svid"` made a directory named "~" wherever the server was started). Any
    bytes a file name may hold: not held to UTF-8 as text is."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    text = value
    if not text:
        raise ConfigError(f"{key}: must not be empty")
    return expand_path(key, text, ConfigError)


def _as_choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    return lambda key, value: as_choice(key, value, choices, ConfigError)


def _as_address(key: str, value: Any) -> str:
    """An address the server listens on (every one of its addresses is)."""
    text = _as_str(key, value)
    check_address(key, text, ConfigError, listen=True)
    return text


def _as_optional_address(key: str, value: Any) -> str:
    text = _as_str(key, value)
    return _as_address(key, text) if text else ""


def _as_trust_domain(key: str, value: Any) -> TrustDomain:
    try:
        return TrustDomain.parse(_as_str(key, value))
    except SpiffeIdError as exc:
        raise ConfigError(f"{key}: {exc}") from None


# A PostgreSQL URL spelled so that is_postgres_dsn misses it: whitespace or a quote before it,
# or its "//" mistyped. No SQLite file name of anyone's begins so.
_MISTYPED_DSN = re.compile(r"""[\s'"]*postgres(?:ql)?:""", re.IGNORECASE)


def _as_datastore(key: str, value: Any) -> str:
    if not isinstance(value, str):  # its type only: a URL in it may hold a password
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    text = value
    if not is_postgres_dsn(text):
        if _MISTYPED_DSN.match(text):
            # Taken as a SQLite file name, a URL with a space before it (`" postgresql://u:PW@db"`)
            # was named whole, password and all, in the error that it could not be opened.
            raise ConfigError(
                f"{key}: looks like a PostgreSQL URL but does not start with postgresql:// or "
                "postgres:// (a space, a quote, a missing slash?); not shown, it may hold a "
                "password"
            )
        # A SQLite file ("" for the default one), its path read as data_dir's is (~ expanded).
        return str(expand_path(key, text, ConfigError)) if text else text
    _refuse_non_utf8(key, text)
    try:
        _ = urllib.parse.urlsplit(text).port  # raises for a port that is no number
    except ValueError:
        # Never the value itself: it may hold a password.
        raise ConfigError(f"{key}: not a valid PostgreSQL URL: {redact_dsn(text)}") from None
    check_dsn(key, text)
    return text


def _as_str_list(key: str, value: Any) -> tuple[str, ...]:
    """A TOML list of strings, or one comma-separated string (a flag)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    for item in items:
        _refuse_non_utf8(key, item)
    return tuple(i.strip() for i in items if i.strip())


# TTLs and sizes fit an int32 (68 years, 2 GiB): a time that far off is past what a
# certificate or datetime can hold, and gRPC takes no bigger message.
MAX_INT32 = 2**31 - 1


def _positive(key: str, value: Any) -> int:
    return _as_int(key, value, minimum=1, maximum=MAX_INT32)


# The agent's and the server's own SVIDs are renewed at half their span from their NotBefore,
# which the CA back-dates 10 s (server/ca/signer.py BACKDATE_SECONDS): at a TTL of 10 s or less
# that point is already past when the SVID is issued, and the daemon renewed it again at once,
# without end (an agent dozens of times a second, each renewal a new Sync stream, until the
# server refused them, its SVID lapsed and its spent join token could not attest it again).
MIN_OWN_SVID_TTL = 11


def _own_svid_ttl(key: str, value: Any) -> int:
    number = _as_int(key, value, minimum=1, maximum=MAX_INT32)
    if number < MIN_OWN_SVID_TTL:
        raise ConfigError(
            f"{key}: must be at least {MIN_OWN_SVID_TTL} s, got {number}: the SVID is renewed at "
            "half its life counted from its NotBefore, which is back-dated 10 s"
        )
    return number


def _count(key: str, value: Any) -> int:
    """0 or more, within what gRPC and C take (a channel argument is a C int)."""
    return _as_int(key, value, minimum=0, maximum=MAX_INT32)


# sync_heartbeat_interval's bounds. Past 60 s the agent takes a heartbeat as promising none
# (agent_attestor/server_link.py: keepalive notices a hung server first), and past 2**31 ms
# the heartbeat message cannot carry it (the server's start raised ValueError). Below 0.1 s
# the one timer woke every stream of the server (10,000 of them) ten times a second or more,
# and an agent counted every pause of its loop as an outage.
MIN_SYNC_HEARTBEAT_INTERVAL = 0.1
MAX_SYNC_HEARTBEAT_INTERVAL = 60.0


def _sync_heartbeat_interval(key: str, value: Any) -> float:
    number = _as_float(key, value)
    if not MIN_SYNC_HEARTBEAT_INTERVAL <= number <= MAX_SYNC_HEARTBEAT_INTERVAL:
        raise ConfigError(
            f"{key}: must be {MIN_SYNC_HEARTBEAT_INTERVAL} to {MAX_SYNC_HEARTBEAT_INTERVAL} "
            f"seconds, got {value!r}"
        )
    return number


def _as_positive_float(key: str, value: Any) -> float:
    number = _as_float(key, value)
    if not number > 0:
        raise ConfigError(f"{key}: must be more than 0 seconds, got {value!r}")
    return number


# Worker processes per signing pool: each pool books a slot per process at start (a 10**8 typo
# took 4 s and 870 MB before the server listened; 10**9, all the memory there was) and may start
# that many interpreters under a burst of big batches. Far past any host's cores.
MAX_SIGNING_PROCESSES = 1024


def _signing_processes(key: str, value: Any) -> int:
    return _as_int(key, value, minimum=0, maximum=MAX_SIGNING_PROCESSES)


def _join_token_ttl(key: str, value: Any) -> int:
    """Bounded as `token generate --ttl` is: past it, every `token generate` without --ttl
    was refused, naming a flag the operator never gave."""
    return _as_int(key, value, minimum=1, maximum=MAX_TOKEN_TTL)


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "trust_domain": _as_trust_domain,
    "data_dir": _as_path,
    "bind_address": _as_address,
    "attest_bind_address": _as_address,
    "admin_socket": _as_path,
    "metrics_address": _as_optional_address,
    "default_x509_svid_ttl": _positive,
    "default_jwt_svid_ttl": _positive,
    "agent_svid_ttl": _own_svid_ttl,
    "server_svid_ttl": _own_svid_ttl,
    "ca_ttl": _positive,
    "jwt_key_ttl": _positive,
    "join_token_ttl": _join_token_ttl,
    "key_type": _as_choice(KEY_TYPES),
    "upstream_ca_cert": _as_path,
    "upstream_ca_key": _as_path,
    "x509pop_ca_bundle": _as_path,
    "log_format": _as_choice(LOG_FORMATS),
    "log_level": _as_choice(LOG_LEVELS),
    "max_message_bytes": _positive,
    "shutdown_grace": _as_float,
    "attest_timeout": _as_positive_float,
    "x509_rate_per_agent": _as_float,
    "x509_burst_per_agent": _as_int,
    "jwt_rate_per_agent": _as_float,
    "jwt_burst_per_agent": _as_int,
    "attest_rate_per_host": _as_float,
    "attest_burst_per_host": _as_int,
    "validation_refusal_rate_per_agent": _as_float,
    "validation_refusal_burst_per_agent": _as_int,
    "validation_accepted_rate_per_agent": _as_float,
    "validation_accepted_burst_per_agent": _as_int,
    "task_denial_rate_per_agent": _as_float,
    "task_denial_burst_per_agent": _as_int,
    "task_begin_rate_per_runtime": _as_float,
    "task_begin_burst_per_runtime": _as_int,
    "max_active_tasks_per_runtime": _as_int,
    "task_mint_pairs_rate_per_agent": _as_float,
    "task_mint_pairs_burst_per_agent": _as_int,
    "signing_threads": _positive,
    "signing_processes": _signing_processes,
    "policy_dir": _as_path,
    "audit_checkpoint_interval": _as_positive_float,
    "audit_retention_days": _as_float,
    "audit_max_events": _as_int,
    "audit_prune_interval": _as_positive_float,
    "datastore": _as_datastore,
    "feed_poll_interval": _as_positive_float,
    "feed_retention": _as_positive_float,
    "sync_heartbeat_interval": _sync_heartbeat_interval,
    "key_encryption_key_file": _as_path,
    "oidc_issuer": _as_str,
    "oauth_bind_address": _as_optional_address,
    "oauth_tls_cert": _as_path,
    "oauth_tls_key": _as_path,
    "oauth_resources": _as_str_list,
    "oauth_trusted_bundles": _as_str_list,
    "oauth_trusted_issuers": _as_str_list,
    "oauth_trusted_issuers_ca": _as_path,
    "oauth_resource_workloads": _as_str_list,
    "oauth_access_token_ttl": _positive,
    "oauth_refusal_rate_per_host": _as_float,
    "oauth_refusal_burst_per_host": _as_int,
    "bundle_endpoint_address": _as_optional_address,
    "bundle_endpoint_profile": _as_choice(("https_spiffe", "https_web")),
    "bundle_endpoint_cert": _as_path,
    "bundle_endpoint_key": _as_path,
    "bundle_endpoint_refresh_hint": _positive,
    "federation_relationships": _as_str_list,
    "federation_min_refresh": _positive,
    "http_max_connections": _positive,
    "http_max_connections_per_host": _positive,
    "grpc_max_connections": _count,
}

CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ServerConfig))
assert set(CONFIG_KEYS) == set(_CONVERTERS), "every config key needs a converter"


_FILE_WORDS = FileWords(
    missing="config file {path}: {reason}",
    unreadable="config file {path}: {reason}",
    not_utf8="config file {path}: not UTF-8 (byte {reason})",
    not_toml="config file {path}: not valid TOML: {reason}",
)


def read_toml(path: Path) -> dict[str, Any]:
    """The raw table of a TOML config file (top level, or a ``[server]`` table)."""
    return read_table(path, "server", ConfigError, _FILE_WORDS)


# Keys an earlier release read: still accepted, with a warning, under their new names.
_RENAMED = {"jwt_mint_processes": "signing_processes"}


def build_config(
    file_values: Mapping[str, Any], flag_values: Mapping[str, Any] | None = None
) -> ServerConfig:
    """Merge file values and flags (flags win, None means 'not given'), validate, freeze."""
    merged: dict[str, Any] = dict(file_values)
    for old, new in _RENAMED.items():
        if old in merged:
            if new in merged:
                raise ConfigError(f"{old}: renamed {new}; give only {new}")
            log.warning("configuration key %s is now %s; rename it", old, new)
            merged[new] = merged.pop(old)
    for key, value in (flag_values or {}).items():
        if value is not None:
            merged[key] = value
    refuse_unknown(merged, CONFIG_KEYS, ConfigError)
    if "trust_domain" not in merged:
        raise ConfigError('trust_domain: required (e.g. trust_domain = "example.org")')
    values = {key: _CONVERTERS[key](key, value) for key, value in merged.items()}
    config = ServerConfig(**values)
    _check_consistency(config)
    return config


def check_key_encryption(datastore: str, key_encryption_key_file: Path | None) -> None:
    """Servers sharing a PostgreSQL datastore share its CA: they need the one KEK to do so."""
    if is_postgres_dsn(datastore) and key_encryption_key_file is None:
        raise ConfigError(
            "key_encryption_key_file: required with a PostgreSQL datastore (the servers "
            "sharing it share one CA and JWT key set, sealed under that key; "
            "`svid-server keys new-kek --out FILE` makes one)"
        )


def _check_consistency(config: ServerConfig) -> None:
    check_key_encryption(config.datastore, config.key_encryption_key_file)
    if (config.upstream_ca_cert is None) != (config.upstream_ca_key is None):
        missing = "upstream_ca_key" if config.upstream_ca_key is None else "upstream_ca_cert"
        raise ConfigError(f"{missing}: required when the other upstream_ca_* key is set")
    size = unix_path_size(config.admin_socket)  # bytes, not characters
    if size > MAX_UNIX_PATH:
        raise ConfigError(
            f"admin_socket: path is {size} bytes, a Unix socket path may have at most "
            f"{MAX_UNIX_PATH}"
        )
    for key in ("default_x509_svid_ttl", "agent_svid_ttl", "server_svid_ttl"):
        if getattr(config, key) > config.ca_ttl:
            raise ConfigError(f"{key}: {getattr(config, key)} s exceeds ca_ttl ({config.ca_ttl} s)")
    if config.oidc_issuer:
        # Imported here: the oauth package is only needed when it is configured.
        from server.oauth.settings import check_server_config  # noqa: PLC0415

        check_server_config(config)
    if config.bundle_endpoint_profile == "https_web" and config.bundle_endpoint_address:
        for key in ("bundle_endpoint_cert", "bundle_endpoint_key"):
            if getattr(config, key) is None:
                raise ConfigError(f"{key}: required for bundle_endpoint_profile https_web")
    # Imported here: federation keys are checked by the federation package's own rules.
    from server.federation.service import MAX_REFRESH, parse_static  # noqa: PLC0415

    if config.federation_min_refresh > MAX_REFRESH:
        raise ConfigError(
            f"federation_min_refresh: at most {MAX_REFRESH} s (the longest a foreign bundle "
            f"goes unfetched), got {config.federation_min_refresh}"
        )
    for text in config.federation_relationships:
        try:
            rel = parse_static(text, config.trust_domain)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # Checked at start as every file the config names: missing, every fetch failed.
        if rel.ca_file and not Path(rel.ca_file).is_file():
            raise ConfigError(
                f"federation_relationships: {rel.trust_domain}: ca_file {rel.ca_file}: no such "
                f"file (a relative path is taken from the server's working directory, "
                f"{Path.cwd()})"
            )
    if config.http_max_connections_per_host > config.http_max_connections:
        raise ConfigError(
            f"http_max_connections_per_host: {config.http_max_connections_per_host} is more "
            f"than http_max_connections ({config.http_max_connections})"
        )
    if config.default_jwt_svid_ttl > config.jwt_key_ttl:
        raise ConfigError(
            f"default_jwt_svid_ttl: {config.default_jwt_svid_ttl} s exceeds jwt_key_ttl "
            f"({config.jwt_key_ttl} s)"
        )


def file_value(file_values: Mapping[str, Any], key: str) -> Any:
    """`key` of a config file's table as `run` takes it (checked; a path with ~ expanded), or
    None where the file does not give it: for a command that needs that one key, not a config."""
    return _CONVERTERS[key](key, file_values[key]) if key in file_values else None


def load_config(path: Path | None, flag_values: Mapping[str, Any] | None = None) -> ServerConfig:
    return build_config(read_toml(path) if path is not None else {}, flag_values)
