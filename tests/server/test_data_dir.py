"""The server's data_dir is made 0700, or refused when another user could replace what it holds
(server/data_dir.py): a 0777 one was taken without a word."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from server.data_dir import prepare_data_dir
from server.errors import ConfigError
from tests.users import system_python

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


def _server_config(root: Path, data: Path) -> Path:
    """A server config in `root` on the data_dir `data`, listening on ports of its own."""
    config = root / "server.toml"
    config.write_text(
        f'trust_domain = "example.org"\ndata_dir = "{data}"\n'
        f'admin_socket = "{root / "p" / "admin.sock"}"\n'
        'bind_address = "127.0.0.1:0"\nattest_bind_address = "127.0.0.1:0"\n'
    )
    return config


def test_a_missing_data_dir_is_made_0700(tmp_path: Path) -> None:
    path = tmp_path / "a" / "data"
    prepare_data_dir(path)
    assert os.stat(path).st_mode & 0o7777 == 0o700


def test_a_data_dir_any_user_may_write_is_refused_and_a_sticky_one_taken(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(ConfigError, match=f"^data_dir: {path} has mode 0777: any user may write"):
        prepare_data_dir(path)
    os.chmod(path, 0o1777)
    prepare_data_dir(path)


def test_a_group_writable_data_dir_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "data"
    path.mkdir()
    os.chmod(path, 0o770)
    with caplog.at_level(logging.WARNING):
        prepare_data_dir(path)
    warned = [r for r in caplog.records if r.getMessage().startswith("data_dir: its group")]
    assert [(r.data_dir, r.mode) for r in warned] == [(str(path), "0770")]
    # Not "make it 0700": a server writing a root:group directory through its group would be
    # locked out.
    assert "(chown it to that user, then chmod 0700)" in warned[0].getMessage()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_data_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"^data_dir: directory {path} is owned by uid {NOBODY}"):
        prepare_data_dir(path)


def test_a_file_in_place_of_the_data_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        prepare_data_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"^data_dir: cannot make .*: Not a directory"):
        prepare_data_dir(tmp_path / "file" / "data")


def test_run_refuses_a_data_dir_any_user_may_write_before_it_holds_anything(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    config = _server_config(tmp_path, data)
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.endswith(
        f"svid-server: config error: data_dir: {data} has mode 0777: "
        "any user may write it, and so replace the datastore and keys it "
        "holds (chmod o-w, or 0700)\n"
    )
    assert list(data.iterdir()) == []


def test_a_data_dir_in_a_directory_any_user_may_write_is_refused(tmp_path: Path) -> None:
    # Whoever may write the directory above can rename the server's 0700 data_dir aside and
    # put one of its own, holding its own datastore and keys, in its place.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match=f"^data_dir: directory {shared} has mode 0777"):
        prepare_data_dir(shared / "data")
    with pytest.raises(ConfigError, match=f"^data_dir: directory {shared} has mode 0777"):
        prepare_data_dir(shared / "a" / "data")


def test_a_data_dir_reached_through_a_symlink_in_an_open_directory_is_refused(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data").symlink_to(real)
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match=f"^data_dir: directory {shared} has mode 0777"):
        prepare_data_dir(shared / "data")
    # The same link in a directory no one else may write is followed and the target checked.
    os.chmod(shared, 0o755)
    prepare_data_dir(shared / "data")
    os.chmod(real, 0o777)
    with pytest.raises(ConfigError, match=f"^data_dir: {real} has mode 0777: any user may"):
        prepare_data_dir(shared / "data")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_data_dir_below_a_directory_its_group_may_write_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Kubernetes fsGroup volume (root:fsGroup 2775) with the data_dir made below it: warned
    # of, as a group-writable data_dir is (the group is not root's own, which would be fine).
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chown(volume, 0, NOBODY)
    os.chmod(volume, 0o2775)
    with caplog.at_level(logging.WARNING):
        prepare_data_dir(volume / "data")
    warned = [r for r in caplog.records if r.getMessage().startswith("data_dir: a directory")]
    assert [(r.directory, r.mode) for r in warned] == [(str(volume), "2775")]
    assert os.stat(volume / "data").st_mode & 0o777 == 0o700  # setgid inherited


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process of another user")
@pytest.mark.parametrize("mode", [0o755, 0o1755])  # a sticky one is not taken as writable
def test_run_refuses_a_data_dir_its_user_may_not_write_naming_it_and_the_fix(mode: int) -> None:
    # A root-owned 0755 data_dir (made by hand, or a volume mounted so) and a server running as
    # `nobody`: it failed at the datastore with "[Errno 13] Permission denied:
    # '<data_dir>/datastore.sqlite3'", naming neither the directory nor what to do.
    root = Path(tempfile.mkdtemp(prefix="svs", dir="/tmp"))
    try:
        os.chmod(root, 0o755)  # nobody may reach it, not write it
        data = root / "data"
        data.mkdir()
        os.chmod(data, mode)
        config = _server_config(root, data)
        os.chmod(config, 0o644)
        site = Path(pytest.__file__).parents[1]
        done = subprocess.run(
            [system_python(), "-m", "server.cli", "run", "--config", str(config)],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            env={"PYTHONPATH": f"{REPO}:{site}", "PATH": "/usr/bin:/bin"},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.endswith(
            f"svid-server: config error: data_dir: {data} is not writable by the server's user "
            f"(nobody, uid {NOBODY}): chown it to that user (then chmod 0700), or run the server "
            "as its owner\n"
        ), done.stderr[-2000:]
        assert list(data.iterdir()) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
