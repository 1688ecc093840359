"""The server's HTTP /healthz beside its node service's gRPC health, when the server cannot read
the shared datastore's change feed: both say it is not one to send agents to."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from server.ca.sealing import KeyEncryptionKey
from tests.server.fixtures import RunningServer, start_server
from tests.server.test_sync_attack import CuttableRelay, upstream_of
from tests.tmpdirs import short_tmpdir
from tests.waits import wait_for


def _healthz(server: RunningServer) -> int:
    address = server.runtime.metrics_address
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return refused.code


@pytest.fixture
def cut_off(postgres_dsn: str) -> Iterator[tuple[RunningServer, CuttableRelay]]:
    """Servers A and B on one PostgreSQL database, B (serving /healthz) through a relay."""
    root = short_tmpdir()
    KeyEncryptionKey.generate().write_new(root / "kek")
    relay = CuttableRelay(upstream_of(postgres_dsn))
    shared = {"key_encryption_key_file": str(root / "kek")}
    a = start_server(
        root, admin_socket=str(root / "a" / "admin.sock"), datastore=postgres_dsn, **shared
    )
    b = start_server(
        root,
        admin_socket=str(root / "b" / "admin.sock"),
        datastore=relay.dsn_through(postgres_dsn),
        metrics_address="127.0.0.1:0",
        **shared,
    )
    try:
        yield b, relay
    finally:
        relay.cut()
        b.stop()
        a.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_healthz_says_what_the_node_health_says_while_the_feed_is_unread(
    cut_off: tuple[RunningServer, CuttableRelay],
) -> None:
    """Fails on main: /healthz said 200 ok while Sync was refused and the node service's gRPC
    health said NOT_SERVING, so a probe of it kept agents coming to a server that sends them
    away."""
    b, relay = cut_off
    assert _healthz(b) == 200
    relay.cut()
    wait_for(lambda: _healthz(b) == 503, 20, "/healthz to say 503 with the feed unread")
    relay.restore()
    wait_for(lambda: _healthz(b) == 200, 20, "/healthz to say 200 once the feed is read")
