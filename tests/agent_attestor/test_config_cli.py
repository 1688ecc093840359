"""Configuration (TOML + flags, errors name the key) and the CLI's client commands."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from agent_attestor import cli
from agent_attestor.app import AgentApp
from agent_attestor.config import KEYS, build_config, load_toml
from agent_attestor.errors import ConfigError
from agent_attestor.servers import Target
from agent_attestor.workload_client import WorkloadClient, endpoint, socket_uri
from svid._clock import format_utc
from svid._proto import task_pb2
from svid._unix_socket import grpc_unix_target
from tests.agent_attestor.harness import Harness
from tests.tmpdirs import short_tmpdir
from tests.users import NOBODY


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('server_address = "10.0.0.1:8081"\nlog_format = "text"\n')
    config = build_config(load_toml(f), {"server_address": "10.0.0.2:9000"})
    assert config.server_address == "10.0.0.2:9000"
    assert config.server_addresses == ("10.0.0.2:9000",)
    assert config.log_format == "text"


def test_the_legacy_single_server_address_still_works_and_defaults_stay() -> None:
    default = build_config({}, {})
    assert default.servers == (Target("127.0.0.1:8081", "127.0.0.1:8082"),)
    legacy = build_config(
        {"server_address": "svid.internal:8081", "server_attest_address": "svid.internal:8082"},
        {},
    )
    # A DNS name is kept as written: it is resolved at every pick (servers.py).
    assert legacy.servers == (Target("svid.internal:8081", "svid.internal:8082"),)


def test_several_servers_from_toml_and_from_repeated_or_comma_separated_flags(
    tmp_path: Path,
) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        'server_addresses = ["a:8081", "b:8081"]\nserver_attest_addresses = ["a:8082", "b:8082"]\n'
    )
    assert build_config(load_toml(f), {}).servers == (
        Target("a:8081", "a:8082"),
        Target("b:8081", "b:8082"),
    )
    args = cli._parser().parse_args(
        [
            "run",
            "--server-addresses",
            "a:8081, b:8081",
            "--server-addresses",
            "[fd00::3]:8081",
            "--server-attest-addresses",
            "lb:8082",
        ]
    )
    flags = {key: getattr(args, f"cfg_{key}") for key in KEYS}
    config = build_config({}, flags)
    assert config.server_addresses == ("a:8081", "b:8081", "[fd00::3]:8081")
    assert {t.attest for t in config.servers} == {"lb:8082"}  # one Attest for all


def test_a_flag_in_either_spelling_replaces_the_files_servers() -> None:
    file_values = {"server_addresses": ["a:1", "b:1"], "server_attest_addresses": ["a:2"]}
    config = build_config(file_values, {"server_address": "c:1"})
    assert config.server_addresses == ("c:1",)


@pytest.mark.parametrize(
    ("file_values", "flags", "message"),
    [
        (
            {"server_address": "a:1", "server_addresses": ["b:1"]},
            {},
            "server_addresses: give server_addresses or server_address, not both",
        ),
        (
            {},
            {"server_address": "a:1", "server_addresses": ["b:1"]},
            "server_addresses: give server_addresses or server_address, not both",
        ),
        (
            {"server_attest_address": "a:2", "server_attest_addresses": ["b:2"]},
            {},
            "server_attest_addresses: give server_attest_addresses or server_attest_address",
        ),
        ({"server_addresses": ["a:1", "b:1"]}, {}, "server_attest_addresses: give the Attest"),
        (
            {"server_addresses": ["a:1", "b:1", "c:1"], "server_attest_addresses": ["a:2", "b:2"]},
            {},
            "server_attest_addresses: 2 given for 3 server_addresses",
        ),
        ({"server_addresses": ["a:1", "nohost"]}, {}, "server_addresses: expected host:port"),
        ({"server_addresses": []}, {}, "server_addresses: expected at least one host:port"),
        ({"server_addresses": [1]}, {}, "server_addresses: expected host:port strings"),
        ({}, {"server_addresses": [" , "]}, "server_addresses: expected at least one"),
    ],
)
def test_conflicting_or_bad_server_lists_are_refused(
    file_values: dict[str, object], flags: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        build_config(file_values, flags)


def test_an_agent_table_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[agent]\ndata_dir = "/var/lib/x"\n')
    assert build_config(load_toml(f), {}).data_dir == Path("/var/lib/x")


def test_a_key_outside_the_agent_table_is_refused_naming_it(tmp_path: Path) -> None:
    """Beside an [agent] table, a key at the top of the file (above the table's header) was
    read by nobody: the agent ran on its default server or data dir without a word."""
    f = tmp_path / "agent.toml"
    f.write_text('server_address = "svid.example.org:8081"\n[agent]\ndata_dir = "/var/lib/x"\n')
    with pytest.raises(ConfigError, match=r"^server_address: .*outside the \[agent\] table"):
        load_toml(f)
    # Other tables (a [server] one in a file both daemons read) are not the agent's.
    f.write_text('[server]\ntrust_domain = "example.org"\n[agent]\ndata_dir = "/var/lib/x"\n')
    assert load_toml(f) == {"data_dir": "/var/lib/x"}


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"server_address": "nohost"}, "server_address"),
        ({"server_attest_address": "h:99999"}, "server_attest_address"),
        ({"metrics_address": "x"}, "metrics_address"),
        ({"log_format": "xml"}, "log_format"),
        ({"log_level": "loud"}, "log_level"),
        ({"exe_selectors": "yes"}, "exe_selectors"),
        ({"exe_selectors": True}, "exe_selectors"),
        ({"reconnect_max": "-1"}, "reconnect_max"),
        ({"reconnect_min": "5", "reconnect_max": "1"}, "reconnect_min"),
        ({"connect_timeout": "0"}, "connect_timeout"),
        ({"insecure_bootstrap": "maybe"}, "insecure_bootstrap"),
        ({"insecure_bootstrap": True, "trust_bundle": "/b.pem"}, "insecure_bootstrap"),
        ({"x509pop_cert": "/c.pem"}, "x509pop_key"),
        # Which server the agent attests to: a name it could never match is no trust domain.
        ({"trust_domain": "Example.org/x"}, "trust_domain"),
        ({"bogus": "1"}, "bogus"),
        # str.isdigit takes "²" and int() raised: a bare ValueError, a traceback from `run`.
        ({"server_address": "h:\u00b2"}, "server_address"),
        ({"server_attest_addresses": ["h:1", "h:\u00b2"]}, "server_attest_addresses"),
        ({"jwt_cache_size": "many"}, "jwt_cache_size"),
        ({"jwt_cache_max_bytes": "0"}, "jwt_cache_max_bytes"),
        ({"identify_threads": 0}, "identify_threads"),
        ({"max_connections_per_uid": -1}, "max_connections_per_uid"),
        ({"max_streams_per_uid": 0}, "max_streams_per_uid"),
        ({"jwt_mints_per_uid_rate": -1}, "jwt_mints_per_uid_rate"),
        ({"jwt_mints_per_uid_burst": 0}, "jwt_mints_per_uid_burst"),
        ({"jwt_mints_per_uid_burst": 2.5}, "jwt_mints_per_uid_burst"),
        ({"max_connections": -1}, "max_connections"),
        ({"identify_timeout": "0"}, "identify_timeout"),
        ({"max_prefetched_svids": -1}, "max_prefetched_svids"),
        ({"max_prefetched_svids": "all"}, "max_prefetched_svids"),
        # Path.expanduser raised RuntimeError for a ~user with no home: a traceback from run.
        ({"data_dir": "~no-such-user-svidd/x"}, "data_dir"),
        ({"join_token_file": "~no-such-user-svidd/token"}, "join_token_file"),
        # TOML writes NUL as \u0000: os.mkdir and os.open raised ValueError, a traceback.
        ({"data_dir": "/var/a\x00b"}, "data_dir"),
        ({"join_token_file": "/etc/token\x00"}, "join_token_file"),
    ],
)
def test_bad_values_name_their_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        build_config(values, {})


@pytest.mark.parametrize(
    ("values", "flags", "key"),
    [
        # TOML writes nan and inf as floats: a NaN backoff sleeps not at all (a reconnect loop
        # with no pause), a NaN timeout expires at once, an infinite one never.
        ({"reconnect_min": float("nan")}, {}, "reconnect_min"),
        ({"reconnect_max": float("inf")}, {}, "reconnect_max"),
        ({}, {"connect_timeout": "nan"}, "connect_timeout"),
        ({}, {"identify_timeout": "inf"}, "identify_timeout"),
        ({}, {"jwt_mints_per_uid_rate": "inf"}, "jwt_mints_per_uid_rate"),
        # A count given with a fraction was cut to an integer (0.5 connections: no limit).
        ({"max_connections": 0.5}, {}, "max_connections"),
        ({"jwt_cache_size": 1.7}, {}, "jwt_cache_size"),
    ],
)
def test_numbers_that_are_not_finite_or_not_whole_are_refused(
    values: dict[str, object], flags: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        build_config(values, flags)


def test_caller_limits_have_defaults_and_take_flags() -> None:
    default = build_config({}, {})
    assert default.max_connections_per_uid == 128
    assert default.max_streams_per_uid == 1024
    assert default.max_connections == 0  # from the descriptor limit
    assert default.max_hash_size == 256 * 1024 * 1024
    config = build_config({"max_connections": 0}, {"identify_per_uid": "1", "max_hash_size": "9"})
    assert (config.identify_per_uid, config.max_hash_size) == (1, 9)


def test_exe_selectors_are_auto_by_default_and_take_the_file_or_a_flag() -> None:
    assert build_config({}, {}).exe_selectors == "auto"
    assert build_config({"exe_selectors": "never"}, {}).exe_selectors == "never"
    assert build_config({"exe_selectors": "never"}, {"exe_selectors": "Always"}).exe_selectors == (
        "always"
    )


def test_a_shared_socket_directory_is_refused_unless_the_file_or_a_flag_vouches_for_it(
    tmp_path: Path,
) -> None:
    assert build_config({}, {}).socket_dir_shared is False
    assert build_config({"socket_dir_shared": True}, {}).socket_dir_shared is True
    with pytest.raises(ConfigError, match="socket_dir_shared: expected true or false"):
        build_config({"socket_dir_shared": "emptydir"}, {})
    args = cli._parser().parse_args(["run", "--socket-dir-shared"])
    assert build_config({}, {"socket_dir_shared": args.cfg_socket_dir_shared}).socket_dir_shared
    # and the agent's relay is told (it checks the directory when it starts)
    for shared in (False, True):
        config = build_config({"data_dir": str(tmp_path), "socket_dir_shared": shared}, {})
        assert AgentApp(config).endpoint.relay.settings.socket_dir_shared is shared


def test_jwt_mints_per_uid_have_defaults_and_a_zero_rate_means_no_limit() -> None:
    default = build_config({}, {})
    assert (default.jwt_mints_per_uid_rate, default.jwt_mints_per_uid_burst) == (100.0, 200)
    config = build_config({"jwt_mints_per_uid_rate": 0}, {"jwt_mints_per_uid_burst": "50"})
    assert (config.jwt_mints_per_uid_rate, config.jwt_mints_per_uid_burst) == (0, 50)


def test_prefetched_svids_are_capped_by_default_and_zero_means_every_entry() -> None:
    assert build_config({}, {}).max_prefetched_svids == 20_000
    assert build_config({"max_prefetched_svids": 0}, {}).max_prefetched_svids == 0
    assert build_config({}, {"max_prefetched_svids": "500"}).max_prefetched_svids == 500


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_a_config_that_cannot_be_read_or_is_not_utf8_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only a missing file was a ConfigError: a directory, an unreadable file or a bad byte
    # (TOML is UTF-8) was a traceback from `run`.
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[agent]\ntrust_domain = "caf\xe9.org"\n')
    with pytest.raises(ConfigError, match=f"^config: {latin1} is not UTF-8"):
        load_toml(latin1)
    with pytest.raises(ConfigError, match=f"^config: cannot read {tmp_path}"):
        load_toml(tmp_path)
    assert cli.main(["run", "--config", str(tmp_path)]) == 2
    assert "configuration error: config: cannot read" in capsys.readouterr().err


def test_socket_paths_that_are_not_utf8_are_measured_not_a_traceback(tmp_path: Path) -> None:
    # A file name is any bytes; the lengths of socket_path and of <data_dir>/private/api.sock
    # were measured with str.encode(), which raised UnicodeEncodeError for a byte that is no
    # UTF-8: a traceback from `run`, where a too long path is one line naming the key.
    data_dir = os.fsencode(tmp_path) + b"/d\xff"
    socket_path = os.fsencode(tmp_path) + b"/" + b"\xff" * 120 + b"/api.sock"
    run = [sys.executable, "-m", "agent_attestor.cli", "run", "--server-address", "127.0.0.1:1"]
    paths = [b"--data-dir", data_dir, b"--socket-path", socket_path]
    done = subprocess.run(
        [*run, "--insecure-bootstrap", *paths],
        capture_output=True,
        timeout=60,
        check=False,
    )
    err = done.stderr.decode(errors="replace")
    assert "Traceback" not in err
    assert done.returncode == 2, err
    assert err.startswith("svid-agent: configuration error: socket_path: ")
    assert err.rstrip().endswith("is longer than 107 bytes")


def test_audit_checkpoint_with_a_data_dir_of_no_users_home_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["audit", "checkpoint", "--data-dir", "~no-such-user-svidd/x"]
    assert cli.main(argv) == 2
    assert "configuration error: data_dir:" in capsys.readouterr().err


def test_endpoint_address_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/a.sock")
    assert endpoint(None).target == "unix:///run/a.sock"
    assert endpoint(None).path == Path("/run/a.sock")
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:5")
    assert (endpoint(None).target, endpoint(None).path) == ("127.0.0.1:5", None)
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix://relative")
    with pytest.raises(ConfigError, match="SPIFFE_ENDPOINT_SOCKET"):
        endpoint(None)
    assert endpoint(Path("/x/y.sock")).target == "unix:/x/y.sock"


@pytest.mark.parametrize("name", ["sv d", "sv\u00f6", "sv%41", "sv#h", "sv?q"])
def test_the_printed_socket_uri_reaches_the_socket_whatever_its_path_holds(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """SPIFFE_ENDPOINT_SOCKET is a URI, which gRPC decodes: the agent's printed line held the
    path as it was, so in a directory whose name held "%41" it named another path ("A"), and
    one holding "#" or "?" began a fragment or query that every client refused."""
    root = short_tmpdir(prefix=name)
    sock = root / "api.sock"
    server = grpc.server(futures.ThreadPoolExecutor(1))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(grpc_unix_target(sock))
    server.start()
    try:
        monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", socket_uri(sock))
        where = endpoint(None)
        assert where.path == sock  # what the CLI checks before it connects
        with WorkloadClient(where, timeout=10) as client:
            assert client.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)
        shutil.rmtree(root)


def test_run_with_a_bad_config_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--log-format", "xml"]) == 2
    assert "log_format" in capsys.readouterr().err


def test_cli_fetch_x509_write_and_json(
    agent: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.add_entry("/w")
    out = tmp_path / "out"
    args = ["--socket-path", str(agent.socket_path)]
    assert cli.main(["api", "fetch", "x509", *args, "--write", str(out), "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["svids"][0]["spiffe_id"] == "spiffe://example.org/w"
    assert stat.S_IMODE((out / "svid.0.key").stat().st_mode) == 0o600
    assert (out / "bundle.0.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 1


def test_cli_fetch_x509_write_never_puts_the_key_in_a_file_already_there(
    agent: Harness, tmp_path: Path
) -> None:
    """--write into a directory another user can write to (a /tmp path): a file or symlink
    planted as svid.0.key got the key written into it, readable until (or, another user's
    file, after) the chmod that came too late."""
    agent.add_entry("/w")
    out = tmp_path / "out"
    out.mkdir()
    planted = tmp_path / "planted"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    (out / "svid.0.key").symlink_to(planted)
    args = ["--socket-path", str(agent.socket_path), "--write", str(out)]
    assert cli.main(["api", "fetch", "x509", *args]) == 0
    assert planted.read_bytes() == b""
    key = out / "svid.0.key"
    assert not key.is_symlink()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_cli_fetch_x509_write_never_writes_through_a_planted_certificate_or_bundle(
    agent: Harness, tmp_path: Path
) -> None:
    """The same directory: a symlink planted as svid.0.pem or bundle.0.pem made the write
    overwrite the file it named, any file of the caller's (a shell profile, a trust store)."""
    agent.add_entry("/w")
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("svid.0.pem", "bundle.0.pem"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_bytes(b"the caller's own file\n")
        (out / name).symlink_to(victims[name])
    args = ["--socket-path", str(agent.socket_path), "--write", str(out)]
    assert cli.main(["api", "fetch", "x509", *args]) == 0
    for name, victim in victims.items():
        assert victim.read_bytes() == b"the caller's own file\n"
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_cli_fetch_x509_write_refuses_a_directory_another_user_owns(
    agent: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--write /tmp/svids, made first by another user: the files were written into it, and its
    owner could then swap them (a bundle.0.pem of a CA of theirs, trusted by what reads it)."""
    if os.geteuid() != 0:
        pytest.skip("making a directory another user owns needs root")
    agent.add_entry("/w")
    out = tmp_path / "svids"
    out.mkdir(mode=0o755)
    os.chown(out, NOBODY, NOBODY)
    args = ["--socket-path", str(agent.socket_path), "--write", str(out)]
    assert cli.main(["api", "fetch", "x509", *args]) == 1
    err = capsys.readouterr().err
    assert f"--write: directory {out} is owned by uid {NOBODY}" in err
    assert list(out.iterdir()) == []
    # One of ours open to all (an emptyDir shared with a sidecar) is still written.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    args = ["--socket-path", str(agent.socket_path), "--write", str(shared)]
    assert cli.main(["api", "fetch", "x509", *args]) == 0
    assert stat.S_IMODE((shared / "svid.0.key").stat().st_mode) == 0o600


def test_cli_jwt_fetch_validate_and_errors(
    agent: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.add_entry("/w")
    args = ["--socket-path", str(agent.socket_path)]
    assert cli.main(["api", "fetch", "jwt", "--audience", "a", "--output", "json", *args]) == 0
    token = json.loads(capsys.readouterr().out)["svids"][0]["svid"]
    assert cli.main(["api", "validate", "jwt", "--audience", "a", "--svid", token, *args]) == 0
    shown = capsys.readouterr()
    assert "spiffe://example.org/w" in shown.out
    # A token as an argument still works, but every local user reads it in /proc/<pid>/cmdline.
    assert "--svid TOKEN is readable by every local user" in shown.err
    kept = agent.root / "token"
    kept.write_text(token + "\n")
    from_file = ["--svid-file", str(kept)]
    assert cli.main(["api", "validate", "jwt", "--audience", "a", *from_file, *args]) == 0
    shown = capsys.readouterr()
    assert "spiffe://example.org/w" in shown.out
    assert "readable by every local user" not in shown.err
    gone = ["--svid-file", str(agent.root / "none")]
    assert cli.main(["api", "validate", "jwt", "--audience", "a", *gone, *args]) == 2
    assert "--svid-file: cannot read" in capsys.readouterr().err
    assert cli.main(["api", "validate", "jwt", "--audience", "b", "--svid", token, *args]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err
    assert token not in err
    missing = ["--socket-path", str(agent.root / "nope.sock"), "--timeout", "1"]
    assert cli.main(["api", "fetch", "x509", *missing]) == 1
    assert f"no socket at {agent.root / 'nope.sock'}" in capsys.readouterr().err


def test_healthcheck_needs_the_health_service(agent: Harness) -> None:
    # The test harness endpoint has no health service: the check must fail, not pass.
    assert cli.main(["healthcheck", "--socket-path", str(agent.socket_path), "--timeout", "2"]) == 1


def test_cli_jwt_raw_output_is_only_the_token(
    agent: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.add_entry("/w")
    args = ["--socket-path", str(agent.socket_path)]
    assert cli.main(["api", "fetch", "jwt", "--audience", "a", "--output", "raw", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    token = out.strip()
    assert token.count(".") == 2
    assert " " not in token
    assert cli.main(["api", "validate", "jwt", "--audience", "a", "--svid", token, *args]) == 0


def test_cli_times_are_rfc3339_in_text_and_unix_seconds_in_json(
    agent: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.add_entry("/w")
    args = ["--socket-path", str(agent.socket_path)]
    assert cli.main(["api", "fetch", "x509", *args]) == 0
    (expires,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Expires")]
    assert re.fullmatch(r"Expires:\t\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", expires), expires
    assert cli.main(["api", "fetch", "x509", "--output", "json", *args]) == 0
    not_after = json.loads(capsys.readouterr().out)["svids"][0]["not_after"]
    assert isinstance(not_after, int)
    assert format_utc(not_after) == expires.split("\t")[1]


def test_task_text_shows_rfc3339_times(capsys: pytest.CaptureFixture[str]) -> None:
    task = task_pb2.Task(task_id="t1", expires_at=1_796_455_871, credentials=3)
    cli._print_tasks(argparse.Namespace(output="text"), [task])
    lines = capsys.readouterr().out.splitlines()
    assert any(re.fullmatch(r"Expires\s+: 2026-12-05T07:31:11Z", x) for x in lines), lines
    assert any(re.fullmatch(r"Credentials\s+: 3", x) for x in lines), lines


def test_task_json_times_are_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    task = task_pb2.Task(task_id="t1", expires_at=1_796_455_871, created_at=1_796_455_000)
    cli._print_tasks(argparse.Namespace(output="json"), [task])
    (shown,) = json.loads(capsys.readouterr().out)["tasks"]
    assert (shown["expires_at"], shown["created_at"]) == (1_796_455_871, 1_796_455_000)


def test_watch_works_with_an_agent_without_the_health_service(agent: Harness) -> None:
    # The harness endpoint, like a SPIRE agent's Workload API socket, serves no health service.
    agent.add_entry("/w")
    with WorkloadClient(endpoint(agent.socket_path), timeout=5) as client:
        first = next(iter(client.watch_x509()))
    assert first.svids[0].spiffe_id == "spiffe://example.org/w"


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e10"])
def test_a_timeout_no_call_can_wait_is_a_configuration_error(
    agent: Harness, capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    # Taken as given, gRPC ended the call at once (0, a past or out-of-range deadline) and the
    # agent was reported unreachable or hung; a NaN one too.
    agent.add_entry("/w")
    argv = ["api", "fetch", "x509", "--socket-path", str(agent.socket_path), "--timeout", timeout]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("svid-agent: configuration error: --timeout:")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["api", "fetch", "jwt", "--audience", "caf\udce9"], "--audience"),
        (["api", "validate", "jwt", "--audience", "a", "--svid", "e\udcff.x.y"], "--svid"),
        (["task", "begin", "--action", "read", "--goal", "caf\udce9"], "--goal"),
    ],
)
def test_an_argument_that_is_not_utf8_is_a_configuration_error_naming_its_flag(
    agent: Harness, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    # A byte the shell passed as is (a lone surrogate in Python) raised UnicodeEncodeError
    # out of main: a traceback. The value is not shown: --svid is a credential.
    assert cli.main([*argv, "--socket-path", str(agent.socket_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"svid-agent: configuration error: {flag}: not UTF-8 text\n"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["task", "begin", "--action", "read", "--ttl", "99999999999"], "--ttl"),
        (["task", "list", "--page-size", "99999999999"], "--page-size"),
    ],
)
def test_a_number_past_int32_is_a_usage_error_naming_its_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    # Both are int32 on the wire: protobuf raised a bare ValueError out of main, a traceback.
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--socket-path", "/nonexistent/agent.sock"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: 99999999999 must be at most 2147483647" in err


def test_fetch_x509_write_where_no_directory_can_be_is_one_line(
    agent: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The OSError of mkdir (a file in the way, no permission) was a traceback.
    agent.add_entry("/w")
    blocker = tmp_path / "a file"
    blocker.write_text("")
    argv = ["api", "fetch", "x509", "--socket-path", str(agent.socket_path)]
    assert cli.main([*argv, "--write", str(blocker / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"svid-agent: --write: {blocker} is not a directory\n"


def test_a_join_token_of_the_wrong_type_is_refused_without_printing_it() -> None:
    # A token written as a TOML list or number was put in the error as given: a credential on
    # the terminal and in the service's log.
    for value in (["abc123.s3cretpart"], 123456789):
        with pytest.raises(ConfigError, match=r"^join_token: expected a string") as refused:
            build_config({"join_token": value}, {})
        assert "s3cret" not in str(refused.value)
        assert "123456789" not in str(refused.value)


def test_log_format_and_level_take_any_case_as_the_servers_do() -> None:
    # One file serves both daemons: log_level = "INFO" ran the server and refused the agent.
    config = build_config({"log_level": "WARNING"}, {"log_format": "Text"})
    assert (config.log_format, config.log_level) == ("text", "warning")
    with pytest.raises(ConfigError, match=r"^log_level: must be one of debug, info, "):
        build_config({"log_level": "LOUD"}, {})


_OLD_SET = {
    "svid.0.pem": b"the old certificate\n",
    "svid.0.key": b"the old key\n",
    "bundle.0.pem": b"the old bundle\n",
}


def _old_set(out: Path) -> None:
    out.mkdir()
    for name, data in _OLD_SET.items():
        (out / name).write_bytes(data)
    (out / "svid.0.key").chmod(0o600)


@pytest.mark.parametrize("hard_links", [True, False])
@pytest.mark.parametrize("fails_at", ["svid.0.key", "bundle.0.pem"])
def test_cli_fetch_x509_write_failing_at_a_later_rename_leaves_the_old_set_whole(
    agent: Harness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *,
    fails_at: str,
    hard_links: bool,
) -> None:
    """--write replaced svid.0.pem, then svid.0.key: a failure between left the new certificate
    beside the old key, which a reloading server (nginx) took up as a pair that does not match.
    The old files are kept as hard links until the set is in, or as copies on a file system
    without them."""
    agent.add_entry("/w")
    out = tmp_path / "out"
    _old_set(out)
    if not hard_links:

        def no_links(*args: Any, **kwargs: Any) -> None:
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    replace = os.replace

    def fails(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst) == out / fails_at:
            raise OSError(28, "No space left on device", str(dst))
        replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", fails)
    argv = ["api", "fetch", "x509", "--socket-path", str(agent.socket_path), "--write", str(out)]
    assert cli.main(argv) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err == f"svid-agent: --write: cannot write {out / fails_at}: No space left on device\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == _OLD_SET  # no temp file left
    assert stat.S_IMODE((out / "svid.0.key").stat().st_mode) == 0o600


def test_cli_fetch_x509_write_failing_at_a_later_write_leaves_the_old_set_whole(
    agent: Harness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk fills up at the bundle: nothing of the new set is in place yet."""
    agent.add_entry("/w")
    out = tmp_path / "out"
    _old_set(out)
    real_open = os.open

    def full_at_the_bundle(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).parent == out and "bundle.0.pem" in Path(path).name:
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_at_the_bundle)
    argv = ["api", "fetch", "x509", "--socket-path", str(agent.socket_path), "--write", str(out)]
    assert cli.main(argv) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert (
        err
        == f"svid-agent: --write: cannot write {out / 'bundle.0.pem'}: No space left on device\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == _OLD_SET


def test_cli_fetch_x509_write_replaces_the_set_with_a_key_0600_from_its_first_byte(
    agent: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent.add_entry("/w")
    out = tmp_path / "out"
    _old_set(out)
    modes_at_fsync: dict[str, int] = {}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # Each new file whole and on its way to the disk, under its temp name: which mode?
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.parent == out and path.name.endswith(".tmp"):
            modes_at_fsync[path.name[1:].rsplit(".", 2)[0]] = stat.S_IMODE(os.fstat(fd).st_mode)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["api", "fetch", "x509", "--socket-path", str(agent.socket_path), "--write", str(out)]
    assert cli.main(argv) == 0
    monkeypatch.undo()
    assert sorted(modes_at_fsync) == sorted(_OLD_SET)
    assert modes_at_fsync["svid.0.key"] == 0o600
    assert sorted(p.name for p in out.iterdir()) == sorted(_OLD_SET)
    assert stat.S_IMODE((out / "svid.0.key").stat().st_mode) == 0o600
    key = load_pem_private_key((out / "svid.0.key").read_bytes(), None)
    (cert, *_) = x509.load_pem_x509_certificates((out / "svid.0.pem").read_bytes())
    assert cert.public_key() == key.public_key()
    (authority,) = x509.load_pem_x509_certificates((out / "bundle.0.pem").read_bytes())
    assert cert.issuer == authority.subject


def test_cli_fetch_x509_write_with_a_directory_in_the_way_of_the_key_replaces_nothing(
    agent: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.add_entry("/w")
    out = tmp_path / "out"
    out.mkdir()
    (out / "svid.0.pem").write_bytes(b"the old certificate\n")
    (out / "svid.0.key").mkdir()
    argv = ["api", "fetch", "x509", "--socket-path", str(agent.socket_path), "--write", str(out)]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.startswith(
        f"svid-agent: --write: cannot write {out / 'svid.0.key'}: "
    )
    assert (out / "svid.0.pem").read_bytes() == b"the old certificate\n"
    assert sorted(p.name for p in out.iterdir()) == ["svid.0.key", "svid.0.pem"]


def test_a_trust_bundle_with_no_certificate_is_refused_at_start_naming_it(tmp_path: Path) -> None:
    # An empty file, or the wrong one, was taken: the agent ran on, retrying with "no trust
    # bundle to verify the server" or as if the server's CA had been replaced.
    empty, wrong = tmp_path / "empty.pem", tmp_path / "token"
    empty.write_bytes(b"")
    wrong.write_text("0123456789abcdef.not-a-certificate\n")
    run = [sys.executable, "-m", "agent_attestor.cli", "run", "--server-address", "127.0.0.1:1"]
    for bundle in (empty, wrong):
        paths = ["--data-dir", str(tmp_path / "d"), "--socket-path", str(tmp_path / "api.sock")]
        done = subprocess.run(
            [*run, "--trust-bundle", str(bundle), *paths],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"svid-agent: configuration error: trust_bundle: {bundle}: ")
        assert "certificate" in done.stderr
        assert done.stderr.count("\n") == 1


def test_an_insecure_bootstrap_with_no_server_up_is_one_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    run = [sys.executable, "-m", "agent_attestor.cli", "run", "--server-address", "127.0.0.1:1"]
    paths = ["--data-dir", str(tmp_path / "d"), "--socket-path", str(tmp_path / "api.sock")]
    done = subprocess.run(
        [*run, "--server-attest-address", "127.0.0.1:1", "--insecure-bootstrap", *paths],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    said = "svid-agent: insecure_bootstrap: cannot fetch the server's certificate from 127.0.0.1:1"
    assert said in done.stderr
