"""Config: TOML + flags (flags win), validated once, errors name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent_attestor.server_link import MAX_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL
from server.ca.signer import BACKDATE_SECONDS
from server.config import (
    MAX_SYNC_HEARTBEAT_INTERVAL,
    MIN_OWN_SVID_TTL,
    MIN_SYNC_HEARTBEAT_INTERVAL,
    ServerConfig,
    build_config,
    check_key_encryption,
    load_config,
)
from server.errors import ConfigError
from server.renewal import half_life
from svid import _daemon_config
from svid._spiffe_id import TrustDomain


def test_defaults_from_minimal_file(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('trust_domain = "example.org"\n')
    config = load_config(path)
    assert config.trust_domain == TrustDomain("example.org")
    assert config.default_x509_svid_ttl == 300
    assert config.agent_svid_ttl == 3600
    assert config.join_token_ttl == 600
    assert config.key_type == "ec-p256"
    assert config.metrics_address == ""
    assert config.audit_checkpoint_interval == 60.0
    assert (config.audit_retention_days, config.audit_max_events) == (30.0, 0)
    assert config.audit_prune_interval == 3600.0
    assert config.signing_processes == (os.cpu_count() or 1)
    assert (config.http_max_connections, config.http_max_connections_per_host) == (1024, 128)
    assert config.grpc_max_connections == 0  # derived from the descriptor limit at start


def test_signing_processes_zero_signs_in_the_server() -> None:
    config = build_config({"trust_domain": "example.org", "signing_processes": 0})
    assert config.signing_processes == 0


def test_server_table_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        '[server]\ntrust_domain = "example.org"\ndata_dir = "/var/a"\nlog_format = "text"\n'
    )
    config = load_config(path, {"data_dir": "/var/b", "log_format": None, "ca_ttl": "7200"})
    assert config.data_dir == Path("/var/b")
    assert config.log_format == "text"
    assert config.ca_ttl == 7200


def test_config_is_frozen() -> None:
    config = build_config({"trust_domain": "example.org"})
    with pytest.raises(AttributeError):
        config.ca_ttl = 1  # type: ignore[misc]
    assert isinstance(config, ServerConfig)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({}, "trust_domain"),
        ({"trust_domain": "Example.org"}, "trust_domain"),
        ({"trust_domain": "example.org", "ca_ttl": 0}, "ca_ttl"),
        ({"trust_domain": "example.org", "ca_ttl": "soon"}, "ca_ttl"),
        ({"trust_domain": "example.org", "ca_ttl": True}, "ca_ttl"),
        ({"trust_domain": "example.org", "agent_svid_ttl": 1.5}, "agent_svid_ttl"),
        ({"trust_domain": "example.org", "key_type": "dsa"}, "key_type"),
        ({"trust_domain": "example.org", "log_format": "xml"}, "log_format"),
        ({"trust_domain": "example.org", "bind_address": "localhost"}, "bind_address"),
        ({"trust_domain": "example.org", "bind_address": "h:99999"}, "bind_address"),
        # str.isdigit takes "²" and int() raised: a bare ValueError out of load_config.
        ({"trust_domain": "example.org", "bind_address": "h:\u00b2"}, "bind_address"),
        ({"trust_domain": "example.org", "attest_bind_address": "h:\u0661"}, "attest_bind_address"),
        ({"trust_domain": "example.org", "metrics_address": "nope"}, "metrics_address"),
        ({"trust_domain": "example.org", "upstream_ca_cert": "/a.pem"}, "upstream_ca_key"),
        ({"trust_domain": "example.org", "color": "blue"}, "color"),
        ({"trust_domain": "example.org", "admin_socket": "/" + "a" * 120}, "admin_socket"),
        # TOML writes NUL as \u0000: os.mkdir raised ValueError, a traceback from `run`.
        ({"trust_domain": "example.org", "data_dir": "/var/a\x00b"}, "data_dir"),
        ({"trust_domain": "example.org", "policy_dir": "\x00"}, "policy_dir"),
        ({"trust_domain": "example.org", "ca_ttl": 100}, "default_x509_svid_ttl"),
        ({"trust_domain": "example.org", "jwt_key_ttl": 100}, "default_jwt_svid_ttl"),
        ({"trust_domain": "example.org", "shutdown_grace": -1}, "shutdown_grace"),
        (
            {"trust_domain": "example.org", "audit_checkpoint_interval": 0},
            "audit_checkpoint_interval",
        ),
        (
            {"trust_domain": "example.org", "audit_checkpoint_interval": "x"},
            "audit_checkpoint_interval",
        ),
        ({"trust_domain": "example.org", "audit_retention_days": -1}, "audit_retention_days"),
        ({"trust_domain": "example.org", "audit_max_events": 1.5}, "audit_max_events"),
        ({"trust_domain": "example.org", "audit_max_events": -3}, "audit_max_events"),
        ({"trust_domain": "example.org", "audit_prune_interval": 0}, "audit_prune_interval"),
        ({"trust_domain": "example.org", "signing_processes": -1}, "signing_processes"),
        # Each pool booked a slot per process at start: 10**9 took all the memory there was.
        ({"trust_domain": "example.org", "signing_processes": 10**9}, "signing_processes"),
        (
            {"trust_domain": "example.org", "jwt_mint_processes": 2, "signing_processes": 1},
            "jwt_mint_processes",
        ),
        ({"trust_domain": "example.org", "jwt_mint_processes": -1}, "signing_processes"),
        ({"trust_domain": "example.org", "http_max_connections": 0}, "http_max_connections"),
        ({"trust_domain": "example.org", "http_max_connections": "many"}, "http_max_connections"),
        (
            {"trust_domain": "example.org", "http_max_connections_per_host": -1},
            "http_max_connections_per_host",
        ),
        (
            {"trust_domain": "example.org", "http_max_connections_per_host": 2.5},
            "http_max_connections_per_host",
        ),
        (
            {
                "trust_domain": "example.org",
                "http_max_connections": 10,
                "http_max_connections_per_host": 11,
            },
            "http_max_connections_per_host",
        ),
        ({"trust_domain": "example.org", "grpc_max_connections": -1}, "grpc_max_connections"),
        ({"trust_domain": "example.org", "grpc_max_connections": 1.5}, "grpc_max_connections"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        build_config(values)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        # TOML writes nan and inf as floats: int(inf) raised OverflowError (a traceback), and a
        # NaN grace, timeout or rate compares false with everything (no wait, no limit).
        ({"ca_ttl": float("inf")}, "ca_ttl"),
        ({"audit_max_events": float("-inf")}, "audit_max_events"),
        ({"shutdown_grace": float("nan")}, "shutdown_grace"),
        ({"attest_timeout": float("inf")}, "attest_timeout"),
        ({"x509_rate_per_agent": "nan"}, "x509_rate_per_agent"),
        ({"audit_retention_days": float("nan")}, "audit_retention_days"),
    ],
)
def test_numbers_that_are_not_finite_are_refused(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        build_config({"trust_domain": "example.org", **values})


@pytest.mark.parametrize("key", ["agent_svid_ttl", "server_svid_ttl"])
def test_an_own_svid_ttl_whose_renewal_point_is_past_at_issuance_is_refused(key: str) -> None:
    # An agent_svid_ttl of 2 s was taken: the agent renewed its SVID dozens of times a second,
    # each a new Sync stream, until the server refused them and the SVID lapsed; with its join
    # token spent it could not attest again. The server renewed its own SVID likewise.
    with pytest.raises(ConfigError, match=f"^{key}: must be at least {MIN_OWN_SVID_TTL} s, got 10"):
        build_config({"trust_domain": "example.org", key: 10})
    assert getattr(build_config({"trust_domain": "example.org", key: 11}), key) == 11
    # The floor is where half the back-dated span first falls after issuance.
    now = 1_000_000.0
    assert half_life(now - BACKDATE_SECONDS, now + MIN_OWN_SVID_TTL) > now
    assert half_life(now - BACKDATE_SECONDS, now + MIN_OWN_SVID_TTL - 1) <= now


@pytest.mark.parametrize(
    "key",
    # join_token_ttl stops well below, at the longest join token (the test below).
    ["ca_ttl", "jwt_key_ttl", "oauth_access_token_ttl", "max_message_bytes"],
)
def test_a_duration_or_size_past_int32_is_refused_naming_the_key(key: str) -> None:
    # A ca_ttl of 1e14 s passed, and the server's start raised "year 3170900 is out of range"
    # as it made its CA: a traceback, after its listeners were up.
    with pytest.raises(ConfigError, match=f"^{key}: must be at most 2147483647"):
        build_config({"trust_domain": "example.org", key: 10**14})


def test_a_grpc_connection_cap_past_int32_is_refused_naming_the_key() -> None:
    # gRPC takes its channel arguments as C ints: 2**32 raised OverflowError as the server
    # built its node API (a traceback at start), and 2**31 - 1 on one port aborts the process.
    with pytest.raises(ConfigError, match=r"^grpc_max_connections: must be at most 2147483647"):
        build_config({"trust_domain": "example.org", "grpc_max_connections": 2**32})


def test_an_admin_socket_path_is_measured_in_bytes_as_the_kernel_measures_it() -> None:
    # 60 "é" are 60 characters but 120 bytes of sun_path: the length was counted in characters,
    # the path passed, and gRPC's bind failed later as "in use, or no such address/directory".
    path = "/tmp/" + "\u00e9" * 60 + ".sock"
    with pytest.raises(ConfigError, match=r"^admin_socket: path is 130 bytes, a Unix socket"):
        build_config({"trust_domain": "example.org", "admin_socket": path})
    build_config({"trust_domain": "example.org", "admin_socket": "/tmp/" + "\u00e9" * 48 + ".s"})


def test_the_old_worker_key_still_works_under_its_new_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = build_config({"trust_domain": "example.org", "jwt_mint_processes": 3})
    assert config.signing_processes == 3
    assert "jwt_mint_processes is now signing_processes" in caplog.text


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("trust_domain = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_a_key_outside_the_server_table_is_refused_naming_it(tmp_path: Path) -> None:
    # Beside a [server] table, a key above its header was read by nobody: the server ran with
    # the default for it without a word (the agent refuses the same for its [agent] table).
    path = tmp_path / "server.toml"
    path.write_text('log_level = "debug"\n[server]\ntrust_domain = "example.org"\n')
    with pytest.raises(ConfigError, match=r"^log_level: .*outside the \[server\] table"):
        load_config(path)
    # Other tables (an [agent] one in a file both daemons read) are not the server's.
    path.write_text('[agent]\ndata_dir = "/x"\n[server]\ntrust_domain = "example.org"\n')
    assert load_config(path).trust_domain == TrustDomain("example.org")


def test_a_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    # TOML is UTF-8: the bytes were decoded by the locale, and a bad one raised
    # UnicodeDecodeError, a traceback from `run` and from every admin command given --config.
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'trust_domain = "caf\xe9.org"\n')
    with pytest.raises(ConfigError, match=f"config file {bad}: not UTF-8"):
        load_config(bad)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # psycopg encoded the URL to parse it: UnicodeEncodeError out of `run`, a traceback.
        ("datastore", "postgres://svid:hunter2@db/svid\udcff"),
        ("oauth_resources", "https://api.example/\udcff"),
        ("oidc_issuer", "https://\udcff.example"),
    ],
)
def test_a_flag_that_is_not_utf8_is_refused_naming_its_key_only(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build_config({"trust_domain": "example.org"}, {key: value})
    assert str(refused.value) == f"{key}: not UTF-8 text"


def test_a_path_flag_may_hold_any_bytes() -> None:
    config = build_config({"trust_domain": "example.org"}, {"data_dir": "/srv/caf\udce9"})
    assert os.fsencode(config.data_dir) == b"/srv/caf\xe9"
    ours = build_config({"trust_domain": "example.org"}, {"datastore": "/srv/caf\udce9.db"})
    assert os.fsencode(ours.datastore_path) == b"/srv/caf\xe9.db"


# -- the datastore ------------------------------------------------------------------------------


def test_the_datastore_is_sqlite_in_the_data_dir_unless_set() -> None:
    config = build_config({"trust_domain": "example.org", "data_dir": "/var/svid"})
    assert config.datastore_dsn is None
    assert config.datastore_path == Path("/var/svid/datastore.sqlite3")
    moved = build_config({"trust_domain": "example.org", "datastore": "/srv/ds.sqlite3"})
    assert moved.datastore_dsn is None
    assert moved.datastore_path == Path("/srv/ds.sqlite3")


def test_a_datastore_file_under_home_is_found_there_as_data_dir_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # data_dir expanded a leading ~ and datastore, the other path of the datastore, did not:
    # datastore = "~/svid/ds.sqlite3" made ./~/svid/ds.sqlite3 wherever the server started.
    monkeypatch.setenv("HOME", "/home/svid")
    config = build_config({"trust_domain": "example.org", "datastore": "~/svid/ds.sqlite3"})
    assert config.datastore_path == Path("/home/svid/svid/ds.sqlite3")
    with pytest.raises(ConfigError, match=r"^datastore: may not contain NUL"):
        build_config({"trust_domain": "example.org", "datastore": "/srv/ds\x00.sqlite3"})


KEK = {"key_encryption_key_file": "/etc/svid/kek"}  # servers sharing PostgreSQL share the CA


def test_paths_expand_a_leading_tilde_as_the_agents_do(tmp_path: Path) -> None:
    config = build_config({"trust_domain": "example.org", "data_dir": "~/svid-data"})
    assert config.data_dir == Path.home() / "svid-data"
    with pytest.raises(ConfigError, match="data_dir: cannot expand '~nosuchuser/x'"):
        build_config({"trust_domain": "example.org", "data_dir": "~nosuchuser/x"})


def test_a_postgresql_url_selects_postgresql_and_the_flag_wins(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'trust_domain = "example.org"\ndatastore = "/srv/ds.sqlite3"\n'
        'key_encryption_key_file = "/etc/svid/kek"\n'
    )
    dsn = "postgresql://svidd:pw-in-url@db.internal:5432/svidd?sslmode=require"
    config = load_config(path, {"datastore": dsn})
    assert config.datastore_dsn == dsn
    assert config.datastore_shown == "postgresql://svidd:***@db.internal:5432/svidd?sslmode=require"
    other = {"trust_domain": "x.org", "datastore": "postgres://h/db", **KEK}
    assert build_config(other).datastore_dsn


def test_the_datastore_password_stays_out_of_errors_and_the_repr() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"trust_domain": "example.org", "datastore": "postgresql://u:pw-9@h:xx/db"})
    assert str(caught.value).startswith("datastore: not a valid PostgreSQL URL")
    assert "pw-9" not in str(caught.value)
    # One libpq cannot read (a bad %-escape, an unclosed bracket): refused here, not at the
    # open, and libpq's complaint, quoting the URL as spelled, not passed on.
    pytest.importorskip("psycopg")
    for bad in ("postgresql://u:pw-9%zz@h/db", "postgresql://u:pw-9@[::1/db"):
        with pytest.raises(ConfigError, match=r"^datastore: not a valid PostgreSQL URL") as caught:
            build_config({"trust_domain": "example.org", "datastore": bad, **KEK})
        assert "pw-9" not in str(caught.value)
    config = build_config(
        {"trust_domain": "example.org", "datastore": "postgresql://u:pw-9@h/d", **KEK}
    )
    assert "pw-9" not in repr(config)
    # A URL written as a TOML list (or inline table) went into the error as given.
    for value in (["postgresql://u:pw-9@h/db"], {"url": "postgresql://u:pw-9@h/db"}):
        with pytest.raises(ConfigError, match=r"^datastore: expected a string") as caught:
            build_config({"trust_domain": "example.org", "datastore": value})
        assert "pw-9" not in str(caught.value)


def test_a_password_holding_a_url_delimiter_stays_out_of_errors_and_the_log_line() -> None:
    # libpq takes '?' and '#' in a password as they are; urlsplit read them as the query or
    # fragment, so redaction found no password and showed it whole.
    for dsn in ("postgresql://u:pw#9@h/db", "postgresql://u:pw?9@h/db", "postgresql://u:pw/9@h/db"):
        with pytest.raises(ConfigError) as caught:
            build_config({"trust_domain": "example.org", "datastore": dsn})
        assert "pw" not in str(caught.value)
    config = build_config(
        {"trust_domain": "example.org", "datastore": "postgresql://u:12#pw@h/db", **KEK}
    )
    assert config.datastore_shown == "postgresql://u:***@h/db"


WITHOUT_PSYCOPG = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("psycopg", "psycopg_pool"):
            raise ImportError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
import server.app, server.cli  # the server imports without the extra
from server.datastore.postgres_dsn import open_postgres
from server.errors import ConfigError
from svid._clock import SystemClock

try:
    open_postgres("postgresql://u:pw-x@h/db", SystemClock())
except ConfigError as e:
    print(e)
"""


def test_without_the_postgres_extra_the_server_imports_and_a_dsn_names_the_extra() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PSYCOPG],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "needs the 'postgres' extra (pip install 'svidd[postgres]')" in done.stdout
    assert "pw-x" not in done.stdout


def test_key_encryption_key_file_from_file_or_flag(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('trust_domain = "example.org"\nkey_encryption_key_file = "/etc/svid/kek"\n')
    assert load_config(path).key_encryption_key_file == Path("/etc/svid/kek")
    flagged = load_config(path, {"key_encryption_key_file": "/run/kek"})
    assert flagged.key_encryption_key_file == Path("/run/kek")
    assert build_config({"trust_domain": "example.org"}).key_encryption_key_file is None
    with pytest.raises(ConfigError, match="key_encryption_key_file: must not be empty"):
        build_config({"trust_domain": "example.org", "key_encryption_key_file": ""})


def test_a_postgresql_datastore_needs_the_key_encryption_key() -> None:
    dsn = "postgresql://svid:secret@db.internal/svid"
    with pytest.raises(ConfigError, match="key_encryption_key_file: required with a PostgreSQL"):
        check_key_encryption(dsn, None)
    check_key_encryption(dsn, Path("/etc/svid/kek"))
    with pytest.raises(ConfigError, match="required with a PostgreSQL"):
        check_key_encryption("postgres://db.internal/svid", None)  # libpq's other scheme
    check_key_encryption("", None)  # SQLite: a lone server keeps its own key files
    check_key_encryption("/var/lib/svid/datastore.sqlite3", None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # Every `token generate` without --ttl is then refused ("ttl: must be between 1 and
        # 2592000 seconds"), naming a flag the operator never gave, not this setting.
        ("join_token_ttl", 31 * 86400),
        # Every attestation is then refused: "no message from the agent within 0 s".
        ("attest_timeout", 0),
    ],
)
def test_a_setting_that_refuses_every_attestation_or_token_is_refused_at_start(
    key: str, value: int
) -> None:
    with pytest.raises(ConfigError, match=key):
        build_config({"trust_domain": "example.org", key: value})


@pytest.mark.parametrize("seconds", [0.001, 61, 3e6])
def test_a_sync_heartbeat_interval_agents_cannot_keep_to_is_refused(seconds: float) -> None:
    """3e6 s passed, and the server's start raised ValueError on its heartbeat message (int32
    milliseconds); over 60 s agents count their server lost between two beats (they take no
    longer promise); a millisecond woke every stream a thousand times a second."""
    with pytest.raises(ConfigError, match=r"^sync_heartbeat_interval: must be 0.1 to 60.0 seconds"):
        build_config({"trust_domain": "example.org", "sync_heartbeat_interval": seconds})
    for ok in (0.1, 3, 60):
        config = build_config({"trust_domain": "example.org", "sync_heartbeat_interval": ok})
        assert config.sync_heartbeat_interval == ok


def test_the_sync_heartbeat_bounds_are_the_ones_agents_take() -> None:
    assert MAX_SYNC_HEARTBEAT_INTERVAL == MAX_HEARTBEAT_INTERVAL
    assert MIN_SYNC_HEARTBEAT_INTERVAL == MIN_HEARTBEAT_INTERVAL


def test_a_config_past_its_bound_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--config /dev/zero` read on until the machine's memory was gone.
    monkeypatch.setattr(_daemon_config, "MAX_CONFIG_BYTES", 64)
    big = tmp_path / "big.toml"
    big.write_text('trust_domain = "example.org"\n' + "#" * 64 + "\n")
    with pytest.raises(ConfigError) as refused:
        load_config(big)
    assert str(refused.value) == f"config file {big}: more than 64 bytes: not a config file"


@pytest.mark.parametrize(
    "dsn",
    [
        " postgresql://svid:hunter2@db/svid",  # a space before it (a TOML or shell slip)
        "'postgres://svid:hunter2@db/svid'",  # quoted twice
        "postgresql:/svid:hunter2@db/svid",  # a slash short
        "\tPOSTGRES://svid:hunter2@db/svid",
    ],
)
def test_a_mistyped_postgres_url_is_refused_unshown(dsn: str) -> None:
    """Taken as a SQLite file name, the URL was named whole (its password too) in the error
    that the file could not be opened: `No such file or directory: ' postgresql:/svid:...'`."""
    with pytest.raises(ConfigError) as refused:
        build_config({"trust_domain": "example.org", "datastore": dsn})
    assert str(refused.value).startswith("datastore: looks like a PostgreSQL URL")
    assert "hunter2" not in str(refused.value)
    # A SQLite file that merely begins with the word stays one.
    named = build_config({"trust_domain": "example.org", "datastore": "/srv/postgres.db"})
    assert named.datastore_path == Path("/srv/postgres.db")
