"""The svid-server CLI's admin commands, in-process against a real server."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from server.cli import main
from tests.server.cli_run import run_cli
from tests.server.fixtures import TRUST_DOMAIN, RunningServer, managed_server
from tests.tmpdirs import short_tmpdir

TD = f"spiffe://{TRUST_DOMAIN}"
PARENT = f"{TD}/svid/agent/join_token/cli"


def test_entry_lifecycle_text_and_json(
    capsys: pytest.CaptureFixture[str], srv: RunningServer
) -> None:
    code, out, err = run_cli(
        capsys,
        srv,
        "entry",
        "create",
        "--spiffe-id",
        f"{TD}/cli/web",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:50",
        "--x509-ttl",
        "120",
        "--dns",
        "web.example.org",
        "--hint",
        "web",
        "--output",
        "json",
    )
    assert (code, err) == (0, "")
    created = json.loads(out)
    assert created["spiffe_id"] == f"{TD}/cli/web"
    assert created["x509_svid_ttl"] == 120
    assert {f"{s['type']}:{s['value']}" for s in created["selectors"]} == {
        "unix:uid:1000",
        "unix:gid:50",
    }
    entry_id = created["id"]

    code, out, _ = run_cli(capsys, srv, "entry", "show", "--id", entry_id)
    assert code == 0
    assert f"Entry ID         : {entry_id}" in out
    assert "Selector         : unix:uid:1000" in out
    assert "DNS name         : web.example.org" in out

    code, out, _ = run_cli(
        capsys, srv, "entry", "update", "--id", entry_id, "--jwt-ttl", "60", "--output", "json"
    )
    updated = json.loads(out)
    assert updated["jwt_svid_ttl"] == 60
    assert updated["x509_svid_ttl"] == 120  # untouched fields survive an update
    assert int(updated["revision"]) == 2

    code, out, _ = run_cli(capsys, srv, "entry", "show", "--parent-id", PARENT, "--output", "json")
    assert [e["id"] for e in json.loads(out)["entries"]] == [entry_id]

    code, out, _ = run_cli(capsys, srv, "entry", "delete", "--id", entry_id)
    assert (code, out.strip()) == (0, f"Deleted entry {entry_id}")
    code, _, err = run_cli(capsys, srv, "entry", "show", "--id", entry_id)
    assert code == 1
    assert "NOT_FOUND" in err


def _create(
    *extra: str, spiffe_id: str = f"{TD}/x", parent_id: str = PARENT, selector: str = "unix:uid:1"
) -> list[str]:
    """`entry create` with one selector, then `extra` flags."""
    return [
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        parent_id,
        "--selector",
        selector,
        *extra,
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            _create(spiffe_id="spiffe://bad/x/"),
            "INVALID_ARGUMENT: spiffe_id: path has a trailing slash",
        ),
        (
            _create(selector="nocolon"),
            "--selector: 'nocolon' must be TYPE:VALUE",
        ),
        (
            _create(parent_id=f"{TD}/ghost"),
            "INVALID_ARGUMENT: parent_id: unknown parent",
        ),
        (
            _create("--x509-ttl", "-4"),
            "--x509-ttl",
        ),
        # inf raised OverflowError and 1e30 a protobuf ValueError out of main: a traceback.
        *(
            (
                _create("--expires-at", when),
                "--expires-at",
            )
            for when in ("inf", "1e30", "nan")
        ),
        # A byte that is not UTF-8 (Python keeps it as a lone surrogate): protobuf raised
        # UnicodeEncodeError out of main, a traceback.
        (
            _create("--hint", "caf\udce9"),
            "--hint: not UTF-8 text",
        ),
        (["entry", "show", "--selector", "unix:uid:\udcff"], "--selector: not UTF-8 text"),
        (["task", "show", "t\udcff"], "task_id: not UTF-8 text"),
        (["entry", "delete", "--id", "nosuch"], "NOT_FOUND: entry nosuch not found"),
        # `entry show --id "$ID"` with $ID empty listed every entry, exit 0.
        (["entry", "show", "--id", ""], "INVALID_ARGUMENT: id"),
        # The same with a filter given empty, and `bundle show --id ""` printed our own bundle.
        (["entry", "show", "--spiffe-id", ""], "--spiffe-id: empty"),
        (["entry", "show", "--parent-id", ""], "--parent-id: empty"),
        (["entry", "show", "--spiffe-id-prefix", ""], "--spiffe-id-prefix: empty"),
        (["agent", "list", "--spiffe-id-prefix", ""], "--spiffe-id-prefix: empty"),
        (["task", "list", "--runtime-id", ""], "--runtime-id: empty"),
        (["task", "list", "--agent-id", ""], "--agent-id: empty"),
        (["bundle", "show", "--id", ""], "INVALID_ARGUMENT: trust_domain"),
        (["agent", "show", "--spiffe-id", f"{TD}/svid/agent/x/y"], "NOT_FOUND"),
        (["agent", "evict", "--spiffe-id", "nonsense"], "INVALID_ARGUMENT: spiffe_id"),
        (
            _create("--expires-at", "tomorrow"),
            "--expires-at",
        ),
    ],
)
def test_errors_are_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], srv: RunningServer, argv: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, srv, *argv)
    assert code == 1
    assert out == ""
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_missing_socket(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["agent", "list", "--admin-socket", str(tmp_path / "none.sock")])
    _, err = capsys.readouterr()
    assert code == 1
    assert "does not exist" in err


def test_token_and_agents(capsys: pytest.CaptureFixture[str], srv: RunningServer) -> None:
    code, out, _ = run_cli(capsys, srv, "token", "generate", "--ttl", "120", "--output", "json")
    token = json.loads(out)
    assert code == 0
    assert token["agent_spiffe_id"].startswith(f"{TD}/svid/agent/join_token/")
    agent = srv.attest(token["token"])
    code, out, _ = run_cli(capsys, srv, "agent", "list")
    assert agent.spiffe_id in out
    code, out, _ = run_cli(
        capsys, srv, "agent", "show", "--spiffe-id", agent.spiffe_id, "--output", "json"
    )
    assert json.loads(out)["serial"] == agent.serial
    code, out, _ = run_cli(capsys, srv, "agent", "ban", "--spiffe-id", agent.spiffe_id)
    assert code == 0
    code, out, _ = run_cli(capsys, srv, "agent", "list", "--output", "json")
    banned = [a for a in json.loads(out)["agents"] if a["spiffe_id"] == agent.spiffe_id]
    assert banned[0]["banned"] is True
    code, out, _ = run_cli(capsys, srv, "agent", "evict", "--spiffe-id", agent.spiffe_id)
    assert code == 0
    code, out, _ = run_cli(capsys, srv, "agent", "list", "--output", "json")
    assert agent.spiffe_id not in out


def test_bundle_formats(capsys: pytest.CaptureFixture[str], srv: RunningServer) -> None:
    code, pem, _ = run_cli(capsys, srv, "bundle", "show")
    assert code == 0
    assert pem.startswith("-----BEGIN CERTIFICATE-----")
    code, out, _ = run_cli(capsys, srv, "bundle", "show", "--format", "spiffe")
    doc = json.loads(out)
    uses = {k["use"] for k in doc["keys"]}
    assert uses == {"x509-svid", "jwt-svid"}
    assert doc["spiffe_sequence"] >= 1


def test_healthcheck(capsys: pytest.CaptureFixture[str], srv: RunningServer) -> None:
    code, out, _ = run_cli(capsys, srv, "healthcheck")
    assert (code, out.strip()) == (0, "Server is healthy.")


def test_admin_socket_from_config_file(
    capsys: pytest.CaptureFixture[str], srv: RunningServer, tmp_path: Path
) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        f'trust_domain = "{TRUST_DOMAIN}"\nadmin_socket = "{srv.runtime.admin_socket}"\n'
    )
    code = main(["healthcheck", "--config", str(config)])
    assert code == 0
    capsys.readouterr()


def test_text_times_are_rfc3339_utc_and_json_keeps_unix_seconds(
    capsys: pytest.CaptureFixture[str], srv: RunningServer
) -> None:
    argv = ["entry", "create", "--spiffe-id", f"{TD}/cli/timed", "--parent-id", PARENT]
    argv += ["--selector", "unix:uid:7", "--expires-at", "2030-01-02T03:04:05Z"]
    code, out, _ = run_cli(capsys, srv, *argv)
    assert code == 0
    assert "Expires at       : 2030-01-02T03:04:05Z" in out.splitlines()
    show = ["entry", "show", "--spiffe-id", f"{TD}/cli/timed", "--output", "json"]
    code, out, _ = run_cli(capsys, srv, *show)
    assert json.loads(out)["entries"][0]["expires_at"] == 1893553445  # a number, not a string
    code, out, _ = run_cli(capsys, srv, "token", "generate", "--ttl", "60")
    (expires,) = [line for line in out.splitlines() if line.startswith("Expires at")]
    assert re.fullmatch(r"Expires at\s+: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", expires), expires


@pytest.mark.parametrize("action", ["create", "update"])
def test_entry_ttl_flags_say_seconds_and_that_0_is_the_default(
    capsys: pytest.CaptureFixture[str], action: str
) -> None:
    with pytest.raises(SystemExit):
        main(["entry", action, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--x509-svid-ttl", "--jwt-svid-ttl"):
        help_text = text.split(flag, 1)[1]
        assert "seconds" in help_text.split("--", 1)[0], flag
        assert "0 = the server default" in help_text.split("--", 1)[0], flag


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"id": "a"}\n' + '{"hint": ' * 100_000 + "1" + "}" * 100_000 + "\n",
    ],
    ids=["document", "json-lines"],
)
def test_an_entry_file_nested_too_deep_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], srv: RunningServer, tmp_path: Path, text: str
) -> None:
    # json.loads raised RecursionError out of main: a traceback.
    source = tmp_path / "deep.json"
    source.write_text(text)
    code, out, err = run_cli(capsys, srv, "entry", "create", "--file", str(source))
    assert (code, out) == (1, "")
    assert err.startswith(f"svid-server: error: {source}")
    assert "nested too deeply" in err
    assert err.count("\n") == 1


def test_an_admin_socket_whose_path_has_uri_characters_is_reached(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The target was "unix:" + the path, which gRPC reads as a URI: "?" and "#" began a query
    # or fragment and the CLI dialled the path cut there ("failed to connect").
    root = short_tmpdir()
    try:
        socket = root / "ops 1?#%41" / "admin.sock"
        with managed_server(admin_socket=str(socket)):
            code = main(["healthcheck", "--admin-socket", str(socket)])
            out, err = capsys.readouterr()
            assert (code, out, err) == (0, "Server is healthy.\n", "")
    finally:
        shutil.rmtree(root, ignore_errors=True)
