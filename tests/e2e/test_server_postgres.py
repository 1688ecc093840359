"""End to end: real `svid-server run` processes on one PostgreSQL database (`datastore` in the
config), driven by the real CLI; the URL's password never reaches their logs."""

from __future__ import annotations

import json
import shutil

import pytest

from server.ca.sealing import KeyEncryptionKey
from tests.e2e.conftest import TRUST_DOMAIN, make_server, short_tmpdir
from tests.e2e.test_server_cli import attest

pytestmark = pytest.mark.e2e
SECRET = "e2e-not-logged-pw"


def test_two_server_processes_share_one_postgresql_datastore(postgres_dsn: str) -> None:
    # The local test server trusts its clients: the password is sent only if asked, so it
    # stands here for one a real deployment would need.
    dsn = postgres_dsn.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@", 1)
    assert SECRET in dsn
    roots = [short_tmpdir(), short_tmpdir()]
    kek = roots[0] / "kek"  # the servers share the CA, sealed in the database under it
    KeyEncryptionKey.generate().write_new(kek)
    shared = {"datastore": dsn, "key_encryption_key_file": str(kek)}
    first = make_server(roots[0], **shared)
    second = make_server(roots[1], **shared)
    try:
        first.start()
        pem = first.cli("bundle", "show").stdout
        token = first.cli_json("token", "generate", "--ttl", "300")
        agent = attest(first, token["token"], pem.encode())
        first.cli_json(
            "entry",
            "create",
            "--spiffe-id",
            f"spiffe://{TRUST_DOMAIN}/pg/web",
            "--parent-id",
            agent.spiffe_id,
            "--selector",
            "unix:uid:1000",
        )
        assert first.stop() == 0

        second.start()  # its own data_dir: all it knows comes from the database
        assert second.cli("bundle", "show").stdout == pem  # the same CA
        shown = second.cli_json("entry", "show", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/pg/web")
        assert [e["parent_id"] for e in shown["entries"]] == [agent.spiffe_id]
        agents = second.cli_json("agent", "list")
        assert [a["spiffe_id"] for a in agents["agents"]] == [agent.spiffe_id]
        assert second.stop() == 0

        for server in (first, second):
            logs = server.logs()
            assert SECRET not in logs
            started = [json.loads(line) for line in logs.splitlines() if "server started" in line]
            assert started[0]["datastore"].startswith("postgresql://postgres:***@")
    finally:
        for server in (first, second):
            if server.proc is not None:
                server.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
