"""Agent configuration: a TOML file plus command-line flags (flags win), validated once.

Every TOML key is also a flag (``data_dir`` -> ``--data-dir``); each error names its key.

The server: `server_addresses` (a TOML list, or a repeatable / comma-separated flag) lists every
svid-server sharing the trust domain's datastore; a name among them that resolves to several
addresses stands for that many servers. The legacy single `server_address` still works; giving
both is an error. `server_attest_addresses` is one Attest address for all of them, or one per
server in the same order (see servers.py for the choice between them).

The join token is a credential: it comes from a 0600 file (``join_token_file``), the environment
(``SVID_AGENT_JOIN_TOKEN``) or, discouraged, ``join_token``; it is never printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent_attestor.checkpoint_store import FILE_NAME as CHECKPOINT_FILE
from agent_attestor.errors import ConfigError
from agent_attestor.servers import Target, pair_targets
from agent_attestor.workload_attestor import EXE_SELECTOR_CHOICES
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
from svid._errors import SvidError
from svid._logs import LOG_FORMATS, LOG_LEVELS
from svid._secret_file import SecretFile, read_owner_only
from svid._spiffe_id import TrustDomain

DEFAULT_SOCKET = Path("/tmp/svid-agent/public/api.sock")  # noqa: S108 - SPIRE's layout
DEFAULT_SERVER = "127.0.0.1:8081"
DEFAULT_ATTEST = "127.0.0.1:8082"
JOIN_TOKEN_ENV = "SVID_AGENT_JOIN_TOKEN"  # noqa: S105 - the variable's name, not a token
_TOKEN_FILE = SecretFile(
    setting="join_token_file",
    owner="the agent's user",
    max_bytes=4096,  # a join token is <id>.<secret>; anything this big is the wrong file
)


@dataclass(frozen=True)
class AgentConfig:
    # Node API (mTLS) of each server. Always filled after build_config, from either spelling.
    server_addresses: tuple[str, ...] = (DEFAULT_SERVER,)
    # Attest (server-auth TLS): one for every server, or one per server_addresses entry.
    server_attest_addresses: tuple[str, ...] = (DEFAULT_ATTEST,)
    server_address: str = ""  # the legacy single spelling, as given (read server_addresses)
    server_attest_address: str = ""  # likewise
    # Whose server alone the agent attests to; when empty, the one its trust bundle's roots name
    # (an upstream root names none: then it must be set).
    trust_domain: str = ""
    trust_bundle: Path | None = None  # PEM CA certificates to trust the server at first contact
    insecure_bootstrap: bool = False  # demo only: trust the first server certificate seen
    join_token: str = field(default="", repr=False)  # a credential: kept out of every repr
    join_token_file: Path | None = None  # where join_token was read from, if a file
    x509pop_cert: Path | None = None
    x509pop_key: Path | None = None
    data_dir: Path = Path(".svid-agent")
    socket_path: Path = DEFAULT_SOCKET
    private_dir: Path | None = None  # default: <data_dir>/private, or a /tmp dir if too long
    # The operator vouches for the writers of socket_path's own directory (a Kubernetes
    # emptyDir, a root:spire 0775 directory): its group and others may write it (safe_dir.py).
    socket_dir_shared: bool = False
    # Seconds a start waits for another agent on its data_dir to stop (a rolling update that
    # starts the new agent first: a DaemonSet with maxSurge); 0: refused at once.
    take_over_wait: float = 0.0
    metrics_address: str = ""  # host:port for /metrics and /healthz; empty = off
    log_format: str = "json"
    log_level: str = "info"
    # Reconnect backoff: attempt n waits a random 0..min(max, min * 2**n) s. The first wait
    # after a live Sync stream is lost spreads a server's agents over half of reconnect_max
    # (no herd: raise it for a larger fleet); never more than a third of the life the agent
    # SVID has left (agent_attestor/reconnect.py).
    reconnect_min: float = 1.0
    reconnect_max: float = 10.0
    connect_timeout: float = 5.0  # a server that does not complete a connection by then is down
    jwt_cache_size: int = 4096
    # Tokens plus their keys, LRU out past it; a sixteenth of it holds the FetchJWTSVID answers
    # built from them (jwt_answers.split_budget).
    jwt_cache_max_bytes: int = 16 * 1024 * 1024
    # Tokens not in that cache that one uid may have minted (mint_budget.py): a second's rate
    # (0: no limit) and a burst, each a fifth of the server's default per-agent limit.
    jwt_mints_per_uid_rate: float = 100.0
    jwt_mints_per_uid_burst: int = 200
    # Workload API connections (issue 11): a share per uid, a deadline to be identified, a
    # capacity (0: what the descriptor limit carries), and a bounded executable hash.
    max_connections_per_uid: int = 128
    # Open Workload API streams of one uid across its connections, each about 25 KiB of the
    # agent's memory (stream_budget.py): eight per connection of max_connections_per_uid.
    max_streams_per_uid: int = 1024
    max_connections: int = 0
    identify_timeout: float = 10.0
    identify_threads: int = 6
    identify_per_uid: int = 2
    max_hash_size: int = 256 * 1024 * 1024  # bytes; a bigger executable gets no unix:sha256
    # unix:path and unix:sha256: "auto" gives them only where no unprivileged user namespace
    # can be made (there a caller can point its exe at any program), "always" or "never".
    exe_selectors: str = "auto"
    # Entries holding a pre-minted X.509-SVID (issue 13), least recently used out (never one an
    # open stream is served); the rest are minted when a workload first asks. 0: every entry.
    # Chosen by measurement (bench/test_bench_agent_scale.py): a start without saved state (the
    # first, or one whose state file was dropped; see state_store.py) must have them all in
    # 30 s, and the server signs at most 1,000 CSRs/s per agent after a 2,000 burst (32k in
    # 30 s) while the agent mints about 2,500/s per core; 20k are ready in ~18 s at the server's
    # limit, and renewing them at a 5 min TTL takes 133 CSRs/s, an eighth of that limit, leaving
    # the rest for minting on demand. Each held SVID costs ~2 KB.
    max_prefetched_svids: int = 20_000
    # The servers' audit_retention_days: a pushed prune record removing events younger than
    # this is refused (a holder of the checkpoint key pruning recent history). 0: not checked,
    # the default, since a count bound or a manual prune may remove recent events by design.
    audit_prune_min_age_days: float = 0.0

    @property
    def servers(self) -> tuple[Target, ...]:
        """Each configured server's node API and Attest addresses, paired."""
        return pair_targets(self.server_addresses, self.server_attest_addresses)

    @property
    def agent_svid_path(self) -> Path:
        return self.data_dir / "agent_svid.der"

    @property
    def agent_key_path(self) -> Path:
        return self.data_dir / "agent_key.der"

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / "bundle.der"

    @property
    def audit_checkpoint_path(self) -> Path:
        return self.data_dir / CHECKPOINT_FILE

    @property
    def state_path(self) -> Path:
        """Entries, Sync position and workload SVIDs (with keys) for the next start."""
        return self.data_dir / "agent_state.sqlite3"


_PATH_KEYS = {
    "trust_bundle",
    "join_token_file",
    "x509pop_cert",
    "x509pop_key",
    "data_dir",
    "socket_path",
    "private_dir",
}
_BOOL_KEYS = {"insecure_bootstrap", "socket_dir_shared"}
_CHOICES = {
    "log_format": LOG_FORMATS,
    "log_level": LOG_LEVELS,
    "exe_selectors": EXE_SELECTOR_CHOICES,
}
_FLOAT_KEYS = {
    "reconnect_min",
    "reconnect_max",
    "connect_timeout",
    "identify_timeout",
    "jwt_mints_per_uid_rate",
    "audit_prune_min_age_days",
    "take_over_wait",
}
# Lists: a TOML array, or strings of comma-separated items (a flag may be repeated).
LIST_KEYS = {"server_addresses", "server_attest_addresses"}
# Each list and its legacy single spelling: one or the other.
_SPELLINGS = {
    "server_addresses": "server_address",
    "server_attest_addresses": "server_attest_address",
}
_INT_KEYS = {
    "jwt_cache_size",
    "jwt_cache_max_bytes",
    "jwt_mints_per_uid_burst",
    "max_connections_per_uid",
    "max_streams_per_uid",
    "max_connections",
    "identify_threads",
    "identify_per_uid",
    "max_hash_size",
    "max_prefetched_svids",
}
_ZERO_ALLOWED = {
    "take_over_wait",
    "max_connections",
    "max_prefetched_svids",
    "jwt_mints_per_uid_rate",
    "audit_prune_min_age_days",
}
KEYS = tuple(f.name for f in fields(AgentConfig))


def _convert(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in LIST_KEYS:
        return _convert_list(key, value)
    if key in _CHOICES:
        return as_choice(key, value, _CHOICES[key], ConfigError)
    if key in _BOOL_KEYS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if key in _FLOAT_KEYS or key in _INT_KEYS:
        # A whole number for a count: int() would cut 0.5 connections to 0 (no limit).
        number = (
            as_finite(key, value, ConfigError)
            if key in _FLOAT_KEYS
            else as_whole(key, value, ConfigError)
        )
        if number < 0 or (number == 0 and key not in _ZERO_ALLOWED):
            raise ConfigError(f"{key}: must be positive, got {value!r}")
        return number
    if not isinstance(value, str):
        # The join token is a credential: its type is named, never its value.
        shown = type(value).__name__ if key == "join_token" else repr(value)
        raise ConfigError(f"{key}: expected a string, got {shown}")
    if key in _PATH_KEYS:
        return expand_path(key, value, ConfigError) if value else None
    return value


def _convert_list(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{key}: expected host:port strings, got {item!r}")
        out += [part.strip() for part in item.split(",") if part.strip()]
    if not out:
        raise ConfigError(f"{key}: expected at least one host:port, got {value!r}")
    for address in out:
        check_address(key, address, ConfigError, listen=False)
    return tuple(dict.fromkeys(out))


_FILE_WORDS = FileWords(
    missing="config: file {path} does not exist",
    unreadable="config: cannot read {path}: {reason}",
    not_utf8="config: {path} is not UTF-8 (byte {reason})",
    not_toml="config: {path} is not valid TOML: {reason}",
)


def load_toml(path: Path) -> dict[str, Any]:
    """The agent's values in a TOML config file: a bare table, or an [agent] one."""
    return read_table(path, "agent", ConfigError, _FILE_WORDS)


def read_join_token_file(path: Path) -> str:
    """The join token in `path`, refused unless only its owner (the agent's user) can read it.

    Errors name the file and its mode, never its content.
    """
    data = read_owner_only(path, _TOKEN_FILE, ConfigError)
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"join_token_file: {path} is not UTF-8 text") from None
    if not token:
        raise ConfigError(f"join_token_file: {path} is empty")
    if any(c.isspace() for c in token):
        raise ConfigError(f"join_token_file: {path} holds more than one word; expected one token")
    return token


def _join_token(
    file_values: Mapping[str, Any], flags: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[str, Path | None]:
    """The join token and its file: from flags, else the environment, else the config file."""
    from_env = {"join_token": env.get(JOIN_TOKEN_ENV) or None}
    for layer in (flags, from_env, file_values):
        token = _convert("join_token", layer.get("join_token"))
        path = _convert("join_token_file", layer.get("join_token_file"))
        if token and path is not None:
            raise ConfigError("join_token: give join_token or join_token_file, not both")
        if path is not None:
            return read_join_token_file(path), path
        if token:
            return token.strip(), None
    return "", None


def _addresses(
    plural: str, file_values: Mapping[str, Any], flags: Mapping[str, Any]
) -> tuple[tuple[str, ...] | None, str]:
    """The list from the first layer (flags, then file) that gives it in either spelling, and
    the legacy single value if that is how it was given."""
    single = _SPELLINGS[plural]
    for layer in (flags, file_values):
        many, one = layer.get(plural), layer.get(single)
        if many is not None and one is not None:
            raise ConfigError(f"{plural}: give {plural} or {single}, not both")
        if many is not None:
            return _convert(plural, many), ""
        if one is not None:
            converted = _convert(single, one)
            check_address(single, converted, ConfigError, listen=False)
            return (converted,), converted
    return None, ""


def build_config(
    file_values: Mapping[str, Any],
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Merge TOML values, the environment and flags into a validated config.

    Flags win (None = not given); the environment only carries the join token.
    """
    refuse_unknown(file_values, KEYS, ConfigError)
    values: dict[str, Any] = {}
    values["join_token"], values["join_token_file"] = _join_token(file_values, flags, env or {})
    for plural, single in _SPELLINGS.items():
        addresses, values[single] = _addresses(plural, file_values, flags)
        if addresses is not None:
            values[plural] = addresses
    if len(values.get("server_addresses", ())) > 1 and "server_attest_addresses" not in values:
        raise ConfigError(
            "server_attest_addresses: give the Attest address (host:port) of the servers: one "
            "for all, or one per server_addresses entry in the same order"
        )
    for key in KEYS:
        if key in values:
            continue
        raw = flags.get(key)
        if raw is None:
            raw = file_values.get(key)
        converted = _convert(key, raw)
        if converted is not None:
            values[key] = converted
    config = AgentConfig(**values)
    nodes, attests = config.server_addresses, config.server_attest_addresses
    if len(attests) not in (1, len(nodes)):
        raise ConfigError(
            f"server_attest_addresses: {len(attests)} given for {len(nodes)} server_addresses: "
            "give one for all, or one per server in the same order"
        )
    if config.metrics_address:
        check_address("metrics_address", config.metrics_address, ConfigError, listen=True)
    if config.trust_domain:
        try:
            TrustDomain.parse(config.trust_domain)
        except SvidError as exc:
            raise ConfigError(f"trust_domain: {exc}") from None
    if config.trust_bundle is not None and config.insecure_bootstrap:
        raise ConfigError("insecure_bootstrap: cannot be combined with trust_bundle")
    if (config.x509pop_cert is None) != (config.x509pop_key is None):
        raise ConfigError("x509pop_key: x509pop_cert and x509pop_key go together")
    if config.join_token and config.x509pop_cert is not None:
        raise ConfigError("join_token: choose join_token or x509pop, not both")
    if config.reconnect_min > config.reconnect_max:
        raise ConfigError("reconnect_min: must not exceed reconnect_max")
    if not str(config.socket_path).startswith("/"):
        config = AgentConfig(**{**values, "socket_path": config.socket_path.resolve()})
    return config
