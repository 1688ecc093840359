"""Admin commands run from a checkout find the `make run` demo's server through .run/server.toml.

The README shows `svid-server entry show`, `audit verify`, `policy validate` and `task list` with
no flags after `make run` (issue 11, item 14).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import ADMIN_SOCKET_ENV, main
from tests.server.fixtures import TRUST_DOMAIN, RunningServer, managed_server, running_server


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    yield from running_server()


@pytest.fixture
def checkout(srv: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory laid out as `make run` leaves a checkout: .run/ (0700) with server.toml."""
    run = tmp_path / ".run"
    run.mkdir(mode=0o700)
    policy = run / "policy"
    policy.mkdir()
    (run / "server.toml").write_text(
        f'trust_domain = "{TRUST_DOMAIN}"\n'
        f'data_dir = "{srv.config.data_dir}"\n'
        f'admin_socket = "{srv.runtime.admin_socket}"\n'
        f'policy_dir = "{policy}"\n'
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ADMIN_SOCKET_ENV, raising=False)
    return tmp_path


def test_admin_commands_find_the_demo_server_without_flags(
    checkout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["healthcheck"]) == 0
    assert capsys.readouterr().out.strip() == "Server is healthy."
    assert main(["entry", "show", "--output", "json"]) == 0
    assert "entries" in json.loads(capsys.readouterr().out)
    assert main(["task", "list"]) == 0
    assert main(["policy", "validate"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_audit_verify_reads_the_demo_data_dir(
    checkout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "generate"]) == 0  # at least one audited event
    capsys.readouterr()
    assert main(["audit", "verify", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_an_explicit_target_wins_over_the_demo_config(
    checkout: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = checkout / "elsewhere.sock"
    assert main(["entry", "show", "--admin-socket", str(missing)]) == 1
    assert f"admin socket {missing} (from --admin-socket) does not exist" in capsys.readouterr().err
    monkeypatch.setenv(ADMIN_SOCKET_ENV, str(missing))
    assert main(["entry", "show"]) == 1
    assert f"admin socket {missing} (from ${ADMIN_SOCKET_ENV}) does not exist" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("target", [".run", ".run/server.toml"])
def test_a_demo_config_others_can_write_is_ignored_with_a_note(
    checkout: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (checkout / target).chmod(0o777 if target == ".run" else 0o666)
    assert main(["entry", "show"]) == 1
    err = capsys.readouterr().err
    assert f"ignoring {Path('.run/server.toml').absolute()}" in err
    assert "not writable by you alone" in err


def test_policy_validate_output_json_is_json(
    checkout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --output json is JSON for every command: this one printed its text line.
    assert main(["policy", "validate", "--output", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"policy_dir": str(checkout / ".run" / "policy"), "valid": True}


def test_path_keys_of_a_config_are_read_with_home_expanded_as_the_server_reads_them(
    srv: RunningServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The server expands a leading ~ in data_dir and policy_dir; `audit verify` and `policy
    # validate` took them from --config literally: they looked under ./~/, not where the
    # server keeps its datastore and reads its policies.
    home = srv.config.data_dir.parent
    (home / "policy").mkdir(exist_ok=True)
    config = tmp_path / "server.toml"
    config.write_text(
        f'trust_domain = "{TRUST_DOMAIN}"\n'
        f'data_dir = "~/{srv.config.data_dir.name}"\n'
        f'admin_socket = "{srv.runtime.admin_socket}"\n'
        'policy_dir = "~/policy"\n'
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["token", "generate", "--config", str(config)]) == 0  # an audited event
    capsys.readouterr()
    assert main(["audit", "verify", "--config", str(config), "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["policy", "validate", "--config", str(config), "--output", "json"]) == 0
    validated = json.loads(capsys.readouterr().out)
    assert validated == {"policy_dir": str(home / "policy"), "valid": True}


def test_audit_commands_read_the_datastore_file_the_config_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A config's `datastore` file is where the server keeps its log, but `audit verify` and
    # `audit export` (and `audit prune`) looked for <data_dir>/datastore.sqlite3 whatever it
    # said: "no audit database", or, where an older datastore lay there, that one verified,
    # exported and pruned.
    datastore = tmp_path / "elsewhere.sqlite3"
    with managed_server(datastore=str(datastore)) as server:
        config = tmp_path / "server.toml"
        config.write_text(
            f'trust_domain = "{TRUST_DOMAIN}"\n'
            f'data_dir = "{server.config.data_dir}"\n'
            f'datastore = "{datastore}"\n'
            f'admin_socket = "{server.runtime.admin_socket}"\n'
        )
        # The configured file is the only datastore there is: each command opened it.
        assert not (server.config.data_dir / "datastore.sqlite3").exists()
        assert main(["audit", "verify", "--config", str(config), "--output", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["ok"] is True
        assert main(["audit", "export", "--config", str(config)]) == 0
        assert main(["audit", "prune", "--config", str(config)]) == 0
        assert "no datastore" not in capsys.readouterr().err
        assert not (server.config.data_dir / "datastore.sqlite3").exists()
