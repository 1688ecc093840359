"""`svid-server ca forget-lost-keys`: the operator's way out of a start refused for a lost CA key
file, run as a user runs it (in-process `main`, a real server on a real SQLite datastore)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from server.ca.errors import CaConfigError
from server.cli import main
from server.config import load_config
from server.datastore.records import ACTIVE, JWT_KIND, X509_KIND, KeySlot
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock, SystemClock
from svid._proto import node_pb2
from tests.server.fixtures import CLOCK_LAG, TRUST_DOMAIN, Agent, RunningServer, short_tmpdir

COMMAND = ("ca", "forget-lost-keys")
DER = Encoding.DER


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config_file(root: Path, *extra: str) -> Path:
    path = root / "server.toml"
    path.write_text(
        "\n".join(
            [
                *extra,
                f'trust_domain = "{TRUST_DOMAIN}"',
                f'data_dir = "{root / "data"}"',
                'bind_address = "127.0.0.1:0"',
                'attest_bind_address = "127.0.0.1:0"',
                f'admin_socket = "{root / "priv" / "admin.sock"}"',
                'log_level = "warning"',
                "shutdown_grace = 0.5",
                "",
            ]
        )
    )
    return path


def _start(config: Path, lag: float = CLOCK_LAG) -> RunningServer:
    """`svid-server run --config FILE`, in-process."""
    return RunningServer(load_config(config), FakeClock(start=time.time() - lag))


def _datastore(root: Path) -> Path:
    elsewhere = root / "datastore.sqlite3"
    return elsewhere if elsewhere.exists() else root / "data" / "datastore.sqlite3"


def _active_slot(root: Path, kind: str) -> KeySlot:
    store = SqliteDataStore(_datastore(root), SystemClock())
    try:
        return next(s for s in store.list_key_slots(kind) if s.status == ACTIVE)
    finally:
        store.close()


def _journaled(root: Path, slot_id: str) -> bool:
    store = SqliteDataStore(_datastore(root), SystemClock())
    try:
        return any(
            s.slot_id == slot_id for k in (X509_KIND, JWT_KIND) for s in store.list_key_slots(k)
        )
    finally:
        store.close()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _refused_start(config: Path) -> str:
    with pytest.raises(CaConfigError) as refused:
        _start(config)
    return str(refused.value)


def _audit_events(capsys: pytest.CaptureFixture[str], config: Path) -> list[dict[str, Any]]:
    code, out, err = _cli(capsys, "audit", "export", "--config", str(config))
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_lost_ca_key_is_forgotten_and_the_next_start_makes_a_new_ca(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    config = _config_file(root)
    first = _start(config)
    old_bundle = first.bundle()
    first.stop()
    lost = _active_slot(root, X509_KIND)
    jwt = _active_slot(root, JWT_KIND)
    key_file = root / "data" / "keys" / f"{lost.slot_id}.pem"
    key_file.unlink()

    refusal = _refused_start(config)
    assert str(key_file) in refusal
    assert "svid-server ca forget-lost-keys --config FILE" in refusal

    # Without --yes: says what it would do, changes nothing.
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config))
    assert (code, err) == (0, "")
    assert f"x509 active   slot {lost.slot_id}  key file {key_file}" in out
    assert jwt.slot_id not in out
    assert "Nothing changed" in out
    assert "re-bootstrapped" in out
    assert _journaled(root, lost.slot_id)
    assert lost.slot_id in _refused_start(config)

    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--yes", "--output", "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "forgotten": True,
        "slots": [
            {"slot_id": lost.slot_id, "kind": "x509", "status": "active", "key_file": str(key_file)}
        ],
    }
    assert not _journaled(root, lost.slot_id)
    assert _journaled(root, jwt.slot_id)
    forgotten = [e for e in _audit_events(capsys, config) if e["kind"] == "ca_keys_forgotten"]
    assert [[s["slot_id"] for s in e["extra"]["slots"]] for e in forgotten] == [[lost.slot_id]]

    again = _start(config)
    try:
        new_bundle = again.bundle()
    finally:
        again.stop()
    assert len(new_bundle.x509_authorities) == 1
    assert new_bundle.x509_authorities[0] not in old_bundle.x509_authorities
    assert _active_slot(root, X509_KIND).slot_id != lost.slot_id
    # The JWT key was not lost: it stays.
    assert [k.kid for k in new_bundle.jwt_keys] == [k.kid for k in old_bundle.jwt_keys]
    code, out, err = _cli(capsys, "audit", "verify", "--config", str(config))
    assert code == 0, err


def test_nothing_lost_is_refused_with_and_without_yes(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    config = _config_file(root)
    _start(config).stop()
    slots = {_active_slot(root, k).slot_id for k in (X509_KIND, JWT_KIND)}
    for extra in ((), ("--yes",)):
        code, out, err = _cli(capsys, *COMMAND, "--config", str(config), *extra)
        assert (code, out) == (1, "")
        assert "no key slot is lost" in err
    assert all(_journaled(root, slot_id) for slot_id in slots)
    assert not [e for e in _audit_events(capsys, config) if e["kind"] == "ca_keys_forgotten"]


def test_a_running_server_keeps_its_slots(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    """A key file deleted under a running server: forgetting its slot then would have the
    server rotate to a CA of its own at its next tick, so the command waits for it to stop."""
    config = _config_file(root)
    server = _start(config, lag=0)  # the lease it holds is on the wall clock the CLI reads
    try:
        lost = _active_slot(root, X509_KIND)
        (root / "data" / "keys" / f"{lost.slot_id}.pem").unlink()
        code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--yes")
        assert (code, out) == (1, "")
        assert "a server is running on this datastore" in err
        assert _journaled(root, lost.slot_id)
    finally:
        server.stop()
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--yes")
    assert code == 0, err
    assert not _journaled(root, lost.slot_id)


def test_a_missing_datastore_is_named_and_not_created(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    config = _config_file(root)
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config))
    assert (code, out) == (1, "")
    assert f"no datastore at {root / 'data' / 'datastore.sqlite3'}" in err
    assert not (root / "data").exists()


def test_a_wiped_data_dir_lists_both_keys_and_a_dry_run_makes_no_data_dir(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    """The datastore kept apart from a data_dir that is gone: both the CA's and the JWT key's
    slots are lost; without --yes the command creates nothing, with it both are replaced."""
    config = _config_file(root, f'datastore = "{root / "datastore.sqlite3"}"')
    _start(config).stop()
    slots = [_active_slot(root, kind) for kind in (X509_KIND, JWT_KIND)]
    shutil.rmtree(root / "data")
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--output", "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "forgotten": False,
        "slots": [
            {
                "slot_id": s.slot_id,
                "kind": s.kind,
                "status": "active",
                "key_file": str(root / "data" / "keys" / f"{s.slot_id}.pem"),
            }
            for s in slots
        ],
    }
    assert not (root / "data").exists()
    assert _cli(capsys, *COMMAND, "--config", str(config), "--yes")[0] == 0
    _start(config).stop()
    assert {_active_slot(root, k).slot_id for k in (X509_KIND, JWT_KIND)}.isdisjoint(
        s.slot_id for s in slots
    )


def _kek_config(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """A lone server with shared (sealed) keys: its CA and JWT keys live in the datastore,
    sealed under the KEK file, and nowhere else."""
    kek = root / "kek"
    assert _cli(capsys, "keys", "new-kek", "--out", str(kek))[0] == 0
    return _config_file(root, f'key_encryption_key_file = "{kek}"'), kek


def _slots(root: Path) -> list[KeySlot]:
    store = SqliteDataStore(_datastore(root), SystemClock())
    try:
        return [s for k in (X509_KIND, JWT_KIND) for s in store.list_key_slots(k)]
    finally:
        store.close()


def test_a_lost_kek_is_named_and_its_slots_are_forgotten_under_a_new_one(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    config, kek = _kek_config(root, capsys)
    first = _start(config)
    old_bundle = first.bundle()
    first.stop()
    sealed = _slots(root)
    assert sealed
    assert all(s.sealed_key for s in sealed)
    assert not list((root / "data" / "keys").glob("*.pem"))  # nothing to fall back on

    # The KEK file is gone: the refusal says what that means and what to do.
    kek.unlink()
    refusal = _refused_start(config)
    assert f"key_encryption_key_file: {kek} does not exist" in refusal
    assert "svid-server keys new-kek" in refusal
    assert "forget-lost-keys --lost-kek" in refusal
    # The command reads the same file: it says the same before anything else.
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--lost-kek")
    assert (code, out) == (1, "")
    assert "svid-server keys new-kek" in err

    # A new KEK in its place: the start names the slots sealed under the lost one.
    assert _cli(capsys, "keys", "new-kek", "--out", str(kek))[0] == 0
    refusal = _refused_start(config)
    assert "is not the key-encryption key the datastore's keys are sealed with" in refusal
    assert all(s.slot_id in refusal for s in sealed)
    assert "svid-server ca forget-lost-keys --lost-kek --config FILE" in refusal

    # Without --lost-kek the command says why it forgets nothing, and changes nothing.
    for extra in ((), ("--yes",)):
        code, out, err = _cli(capsys, *COMMAND, "--config", str(config), *extra)
        assert (code, out) == (1, "")
        assert "sealed under another key-encryption key" in err
        assert "--lost-kek" in err
    # A dry run lists every slot sealed under the lost KEK, and changes nothing.
    code, out, err = _cli(
        capsys, *COMMAND, "--config", str(config), "--lost-kek", "--output", "json"
    )
    assert (code, err) == (0, "")
    listed = json.loads(out)
    assert listed["forgotten"] is False
    assert {s["slot_id"] for s in listed["slots"]} == {s.slot_id for s in sealed}
    assert all(s["sealed_under"] and "key_file" not in s for s in listed["slots"])
    assert len(_slots(root)) == len(sealed)

    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--lost-kek", "--yes")
    assert (code, err) == (0, "")
    assert "sealed under key id" in out
    assert _slots(root) == []
    forgotten = [e for e in _audit_events(capsys, config) if e["kind"] == "ca_keys_forgotten"]
    assert len(forgotten) == 1
    assert {s["slot_id"] for s in forgotten[0]["extra"]["slots"]} == {s.slot_id for s in sealed}

    again = _start(config)
    try:
        new_bundle = again.bundle()
    finally:
        again.stop()
    assert new_bundle.x509_authorities[0] not in old_bundle.x509_authorities
    assert not {k.kid for k in new_bundle.jwt_keys} & {k.kid for k in old_bundle.jwt_keys}
    assert all(s.sealed_key for s in _slots(root))  # sealed under the new KEK
    code, out, err = _cli(capsys, "audit", "verify", "--config", str(config))
    assert code == 0, err


def test_lost_kek_needs_a_new_kek_in_the_config(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    config, kek = _kek_config(root, capsys)
    _start(config).stop()
    sealed = _slots(root)
    bare = _config_file(root)  # the setting dropped instead of a new KEK given
    code, out, err = _cli(capsys, *COMMAND, "--config", str(bare), "--lost-kek", "--yes")
    assert (code, out) == (1, "")
    assert "--lost-kek: key_encryption_key_file is required" in err
    assert len(_slots(root)) == len(sealed)
    # With the KEK the keys were sealed under, nothing is lost.
    config, _ = _config_file(root, f'key_encryption_key_file = "{kek}"'), kek
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--lost-kek", "--yes")
    assert (code, out) == (1, "")
    assert "no key slot is lost" in err
    assert len(_slots(root)) == len(sealed)


def _snapshot_bundle(server: RunningServer, agent: Agent) -> list[bytes]:
    """The X.509 authorities an agent's Sync stream hands it: what it trusts from then on."""
    stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=10)
    try:
        return list(next(stream).bundle.x509_authorities)
    finally:
        stream.cancel()


def test_a_retired_ca_whose_key_is_lost_is_listed_and_forgotten_and_leaves_the_agents_bundle(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    """A retired CA whose key file is lost stays published (it verifies the SVIDs it signed)
    and the server starts; the command lists it, and once the operator forgets it, the
    restarted server's bundle, and the one its agents are sent, no longer hold it."""
    config = _config_file(root)
    # Made 0.9 of its life ago; the two starts after prepare a successor, then activate it.
    _start(config, lag=0.9 * 86400).stop()
    retired = _active_slot(root, X509_KIND)
    _start(config).stop()
    _start(config).stop()
    successor = _active_slot(root, X509_KIND)
    assert successor.slot_id != retired.slot_id
    key_file = root / "data" / "keys" / f"{retired.slot_id}.pem"
    key_file.unlink()

    server = _start(config)  # a retired slot's lost key costs its CRLs, not the start
    try:
        agent = server.attest()
        before = _snapshot_bundle(server, agent)
    finally:
        server.stop()
    assert retired.public_der in before
    assert successor.public_der in before

    code, out, err = _cli(capsys, *COMMAND, "--config", str(config))
    assert (code, err) == (0, "")
    assert f"x509 retired  slot {retired.slot_id}  key file {key_file}" in out
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--yes")
    assert (code, err) == (0, "")
    assert not _journaled(root, retired.slot_id)
    forgotten = [e for e in _audit_events(capsys, config) if e["kind"] == "ca_keys_forgotten"]
    assert [[s["slot_id"] for s in e["extra"]["slots"]] for e in forgotten] == [[retired.slot_id]]

    server = _start(config)
    try:
        assert [c.public_bytes(DER) for c in server.server.ca.bundle().x509_authorities] == [
            successor.public_der
        ]
        after = _snapshot_bundle(server, agent)  # the same agent: its CA was not lost
    finally:
        server.stop()
    assert after == [successor.public_der]


def test_a_lost_kek_on_postgresql_is_forgotten_and_the_next_start_seals_new_keys(
    capsys: pytest.CaptureFixture[str], root: Path, postgres_dsn: str
) -> None:
    """Where shared keys live: the slots sealed under the lost KEK in PostgreSQL are forgotten
    under the lease guard, and the next server makes new ones sealed under the new KEK."""
    from server.datastore.postgres import PostgresDataStore  # needs psycopg

    kek = root / "kek"
    assert _cli(capsys, "keys", "new-kek", "--out", str(kek))[0] == 0
    config = _config_file(
        root, f'datastore = "{postgres_dsn}"', f'key_encryption_key_file = "{kek}"'
    )

    def slots() -> list[KeySlot]:
        store = PostgresDataStore(postgres_dsn, SystemClock())
        try:
            return [s for k in (X509_KIND, JWT_KIND) for s in store.list_key_slots(k)]
        finally:
            store.close()

    _start(config).stop()
    sealed = slots()
    kek.unlink()
    assert _cli(capsys, "keys", "new-kek", "--out", str(kek))[0] == 0
    assert "forget-lost-keys --lost-kek" in _refused_start(config)
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--lost-kek", "--yes")
    assert (code, err) == (0, "")
    assert all(s.slot_id in out for s in sealed)
    assert slots() == []
    _start(config).stop()
    fresh = slots()
    assert fresh
    assert all(s.sealed_key for s in fresh)
    assert not {s.slot_id for s in fresh} & {s.slot_id for s in sealed}


def test_an_empty_postgresql_schema_is_named_and_not_migrated(
    capsys: pytest.CaptureFixture[str], root: Path, postgres_dsn: str
) -> None:
    """As a missing SQLite file: `--yes` on a schema recording nothing (dropped or emptied)
    makes none of its tables, which would let the next start pass the lost-datastore check."""
    import psycopg  # needs the postgres extra

    kek = root / "kek"
    assert _cli(capsys, "keys", "new-kek", "--out", str(kek))[0] == 0
    config = _config_file(
        root, f'datastore = "{postgres_dsn}"', f'key_encryption_key_file = "{kek}"'
    )
    code, out, err = _cli(capsys, *COMMAND, "--config", str(config), "--yes")
    assert (code, out) == (1, "")
    assert "no datastore in" in err
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchone()
    assert row is not None
    assert row[0] == 0
