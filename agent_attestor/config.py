"""Agent configuration: a TOML file plus command-line flags (flags win), validated once.

Every TOML key is also a flag (``data_dir`` -> ``--data-dir``); each error names its key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from agent_attestor.errors import ConfigError

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_SOCKET = Path("/tmp/svid-agent/public/api.sock")  # noqa: S108 - SPIRE's layout


@dataclass(frozen=True)
class AgentConfig:
    server_address: str = "127.0.0.1:8081"  # node API, mTLS
    server_attest_address: str = "127.0.0.1:8082"  # Attest, server-auth TLS
    trust_domain: str = ""  # learned from the server when empty
    trust_bundle: Path | None = None  # PEM CA certificates to trust the server at first contact
    insecure_bootstrap: bool = False  # demo only: trust the first server certificate seen
    join_token: str = ""
    x509pop_cert: Path | None = None
    x509pop_key: Path | None = None
    data_dir: Path = Path(".svid-agent")
    socket_path: Path = DEFAULT_SOCKET
    private_dir: Path | None = None  # default: <data_dir>/private, or a /tmp dir if too long
    metrics_address: str = ""  # host:port for /metrics and /healthz; empty = off
    log_format: str = "json"
    log_level: str = "info"
    reconnect_min: float = 0.2
    reconnect_max: float = 10.0
    jwt_cache_size: int = 4096
    # Workload API connections (issue 11): a share per uid, a deadline to be identified, a
    # capacity (0: what the descriptor limit carries), and a bounded executable hash.
    max_connections_per_uid: int = 256
    max_connections: int = 0
    identify_timeout: float = 10.0
    identify_threads: int = 6
    identify_per_uid: int = 2
    max_hash_size: int = 256 * 1024 * 1024  # bytes; a bigger executable gets no unix:sha256

    @property
    def agent_svid_path(self) -> Path:
        return self.data_dir / "agent_svid.der"

    @property
    def agent_key_path(self) -> Path:
        return self.data_dir / "agent_key.der"

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / "bundle.der"


_PATH_KEYS = {
    "trust_bundle",
    "x509pop_cert",
    "x509pop_key",
    "data_dir",
    "socket_path",
    "private_dir",
}
_BOOL_KEYS = {"insecure_bootstrap"}
_FLOAT_KEYS = {"reconnect_min", "reconnect_max", "identify_timeout"}
_INT_KEYS = {
    "jwt_cache_size",
    "max_connections_per_uid",
    "max_connections",
    "identify_threads",
    "identify_per_uid",
    "max_hash_size",
}
_ZERO_ALLOWED = {"max_connections"}
KEYS = tuple(f.name for f in fields(AgentConfig))


def _convert(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in _BOOL_KEYS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if key in _FLOAT_KEYS or key in _INT_KEYS:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value) if key in _FLOAT_KEYS else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if number < 0 or (number == 0 and key not in _ZERO_ALLOWED):
            raise ConfigError(f"{key}: must be positive, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if key in _PATH_KEYS:
        return Path(value).expanduser() if value else None
    return value


def _check_address(key: str, value: str, *, optional: bool = False, listen: bool = False) -> None:
    if optional and not value:
        return
    host, sep, port = value.rpartition(":")
    lowest = 0 if listen else 1  # a listener may ask for any free port
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    agent = data.get("agent", data)  # accept a bare table or an [agent] section
    if not isinstance(agent, dict):
        raise ConfigError("agent: expected a table")
    return agent


def build_config(file_values: Mapping[str, Any], flags: Mapping[str, Any]) -> AgentConfig:
    """Merge TOML values and flags (flags win, None = not given) into a validated config."""
    unknown = sorted(set(file_values) - set(KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown configuration key")
    values: dict[str, Any] = {}
    for key in KEYS:
        raw = flags.get(key)
        if raw is None:
            raw = file_values.get(key)
        converted = _convert(key, raw)
        if converted is not None:
            values[key] = converted
    config = AgentConfig(**values)
    _check_address("server_address", config.server_address)
    _check_address("server_attest_address", config.server_attest_address)
    _check_address("metrics_address", config.metrics_address, optional=True, listen=True)
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format: expected one of {LOG_FORMATS}, got {config.log_format!r}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {LOG_LEVELS}, got {config.log_level!r}")
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
