"""Logs, metrics, the admin socket guard and the runtime file."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import stat
import sys
from pathlib import Path

import grpc
import pytest

from server.admin_socket import lock_down, prepare
from server.errors import ConfigError
from server.logs import JsonFormatter, configure
from server.metrics import Metrics
from server.runtime import RuntimeInfo, host_port


def test_json_logs_carry_extra_fields() -> None:
    logger = logging.getLogger("svid")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    stream = io.StringIO()
    try:
        configure("json", "info", stream)
        logging.getLogger("svid.server.test").info(
            "agent attested", extra={"agent_id": "spiffe://x/y", "count": 3}
        )
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    line = json.loads(stream.getvalue())
    assert line["msg"] == "agent attested"
    assert line["level"] == "info"
    assert line["agent_id"] == "spiffe://x/y"
    assert line["count"] == 3


def test_json_formatter_includes_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, "f", 1, "failed", None, exc_info=sys.exc_info()
        )
    data = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in data["error"]


def test_metrics_render() -> None:
    metrics = Metrics()
    metrics.svids_issued.labels(kind="x509").inc(3)
    metrics.record_error(grpc.StatusCode.PERMISSION_DENIED)
    text = metrics.render().decode()
    assert 'svid_server_svids_issued_total{kind="x509"} 3.0' in text
    assert 'svid_server_rpc_errors_total{code="PERMISSION_DENIED"} 1.0' in text
    # Each server owns its registry: a second one starts from zero.
    assert 'kind="x509"} 3.0' not in Metrics().render().decode()


def test_admin_socket_directory_is_made_private(tmp_path: Path) -> None:
    root = tmp_path
    directory = root / "priv"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    prepare(directory / "admin.sock")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_shared_directory_is_left_open_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # /run for a server running as root: others' files there must stay reachable.
    shared = tmp_path / "run"
    shared.mkdir()
    os.chmod(shared, 0o755)
    (shared / "other.pid").write_text("1")
    with caplog.at_level(logging.WARNING, logger="svid.server"):
        prepare(shared / "admin.sock")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert "is open to other users (mode 755) and holds other files" in caplog.text


def test_stale_socket_is_removed_live_one_refused(tmp_path: Path) -> None:
    root = tmp_path
    path = root / "priv" / "admin.sock"
    path.parent.mkdir(mode=0o700)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    with pytest.raises(ConfigError, match="another server is listening"):
        prepare(path)
    live.close()
    prepare(path)  # now stale: removed
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        prepare(path)


def test_an_admin_socket_below_a_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    # It was "svid-server: error: [Errno 17] File exists: '<the file>'", naming no key.
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "priv" / "admin.sock"
    with pytest.raises(
        ConfigError, match=f"^admin_socket: cannot make its directory {path.parent}"
    ):
        prepare(path)


def test_lock_down_sets_0600(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("")
    os.chmod(path, 0o666)
    lock_down(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_runtime_file_round_trip(tmp_path: Path) -> None:
    info = RuntimeInfo("example.org", "127.0.0.1:1", "127.0.0.1:2", "/s", "", 42)
    info.write(tmp_path / "server.json")
    assert RuntimeInfo.read(tmp_path / "server.json") == info
    assert host_port("0.0.0.0:0", 8081) == "0.0.0.0:8081"
