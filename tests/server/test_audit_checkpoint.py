"""Signed checkpoints of the audit head, and `audit verify --anchor` against whole-database
rewrites: a cut tail with its head fixed, a wipe, dropped tables, an edit re-hashed onward."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from server.audit import AuditLog, Break, Head, SqliteAuditStore
from server.audit.checkpoint import (
    CHECKPOINT_FILE,
    KEY_DIR,
    MAX_PUBLIC_KEY_BYTES,
    PRUNE,
    PUBLIC_KEY_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointFile,
    CheckpointSigner,
    load_public_key,
)
from server.audit.checkpointer import Checkpointer
from server.audit.event import CANONICAL_FIELDS, GENESIS_HASH
from server.cli import main
from server.datastore.migrations import MIGRATIONS
from server.datastore.sqlite import SqliteDataStore
from svid._audit_checkpoint import key_id_of
from svid._clock import FakeClock
from tests.server.audit_setup import START, Setup, fill, make_setup, rechain, sql, verify


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def setup(tmp_path: Path, clock: FakeClock) -> Setup:
    return make_setup(tmp_path, clock)


def anchored(setup: Setup, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return verify(setup, capsys, "--anchor", str(setup.checkpoints))


# -- the key and the file ---------------------------------------------------------------------


def test_the_checkpoint_key_lives_in_its_own_private_file(setup: Setup) -> None:
    key_dir = setup.data_dir / KEY_DIR
    key_file = key_dir / "checkpoint.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key_dir).st_mode) == 0o700
    public = setup.data_dir / PUBLIC_KEY_FILE
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    assert b"PRIVATE" not in public.read_bytes()
    # The same key at the next start, and its id is the published key's.
    again = CheckpointSigner.load_or_create(setup.data_dir)
    key_id, _ = load_public_key(public)
    assert again.key_id == key_id
    # Nothing of it in the database that holds the log: no key slot, and (without a
    # key-encryption key to seal it under) no shared checkpoint key either.
    db = sqlite3.connect(setup.db)
    tables = {t[0] for t in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not {t for t in tables if "checkpoint" in t or "key" in t} - {
        "key_slots",
        "audit_signing_key",
    }
    assert db.execute("SELECT COUNT(*) FROM key_slots").fetchone() == (0,)
    assert db.execute("SELECT COUNT(*) FROM audit_signing_key").fetchone() == (0,)


def test_a_checkpoint_names_the_committed_head_and_is_signed(
    setup: Setup, clock: FakeClock
) -> None:
    fill(setup.log, clock, 3)
    cp = setup.checkpointer.checkpoint()
    head = setup.log.head()
    assert head is not None
    assert (cp.seq, cp.hash, cp.count, cp.time) == (3, head.hash, 3, clock.now())
    lines = setup.checkpoints.read_text().splitlines()
    assert len(lines) == 1
    parsed = Checkpoint.parse(lines[0])
    assert parsed == cp
    parsed.verify_signature(parsed.public_key_object())
    assert json.loads(lines[0])["key_id"] == setup.checkpointer.last.key_id  # type: ignore[union-attr]


def test_an_interval_tick_writes_only_when_the_head_moved(setup: Setup, clock: FakeClock) -> None:
    first = setup.checkpointer.checkpoint()
    assert (first.seq, first.hash) == (0, GENESIS_HASH)
    assert setup.checkpointer.checkpoint() == first
    fill(setup.log, clock, 1)
    assert setup.checkpointer.checkpoint().seq == 1
    setup.checkpointer.checkpoint(force=True)  # on demand: always a fresh one
    assert len(setup.checkpoints.read_text().splitlines()) == 3


def test_a_checkpoint_is_not_fooled_by_a_head_rewritten_behind_the_server(
    setup: Setup, clock: FakeClock
) -> None:
    fill(setup.log, clock, 5)
    real = setup.log.head()
    sql(setup.db, "DELETE FROM audit_events WHERE seq = 5", "UPDATE audit_head SET seq = 4")
    cp = setup.checkpointer.checkpoint()
    assert real is not None
    assert (cp.seq, cp.hash) == (real.seq, real.hash)


def test_the_checkpointer_ticks_on_its_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    log = AuditLog(SqliteDataStore(tmp_path / "datastore.sqlite3", clock), clock)
    file = CheckpointFile(tmp_path / CHECKPOINT_FILE)
    checkpointer = Checkpointer(
        log, CheckpointSigner.load_or_create(tmp_path), file, clock, interval=0.02
    )
    fill(log, clock, 2)

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(checkpointer.run(stop))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if file.last() is not None:
                break
        stop.set()
        await task

    asyncio.run(run())
    last = file.last()
    assert last is not None
    assert last.seq == 2


# -- the four rewrites that passed `audit verify` ---------------------------------------------


def test_a_cut_tail_with_a_fixed_head_row_is_truncation(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 10)
    setup.checkpointer.checkpoint()
    hash7 = sqlite3.connect(setup.db).execute("SELECT hash FROM audit_events WHERE seq = 7")
    sql(
        setup.db,
        "DELETE FROM audit_events WHERE seq > 7",
        f"UPDATE audit_head SET seq = 7, hash = '{hash7.fetchone()[0]}'",
    )
    assert verify(setup, capsys)[0] == 0  # the chain alone cannot tell
    code, out = anchored(setup, capsys)
    assert code == 1
    assert f"BROKEN at seq 8: {Break.TRUNCATED}" in out
    assert "names seq 10 (10 events) but the log ends at seq 7" in out


def test_an_emptied_log_is_a_wipe(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 4)
    setup.checkpointer.checkpoint()
    sql(setup.db, "DELETE FROM audit_events", "DELETE FROM audit_head")
    assert verify(setup, capsys)[0] == 0
    code, out = anchored(setup, capsys)
    assert code == 1
    assert f"{Break.WIPED}: the log is empty but the checkpoint of" in out
    assert "names seq 4 (4 events)" in out


def test_dropped_tables_are_named_and_not_recreated(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 4)
    setup.checkpointer.checkpoint()
    setup.log.store.close()
    sql(setup.db, "DROP TABLE audit_events", "DROP TABLE audit_head")
    code, out = anchored(setup, capsys)
    assert code == 1
    assert f"{Break.MISSING_TABLES}: table audit_events and audit_head dropped" in out
    assert "names seq 4 (4 events)" in out
    # Without an anchor too: verify opens the file read-only and creates nothing.
    code, out = verify(setup, capsys)
    assert code == 1
    assert str(Break.MISSING_TABLES) in out
    tables = sqlite3.connect(setup.db).execute("SELECT name FROM sqlite_master").fetchall()
    assert not {"audit_events", "audit_head"} & {t[0] for t in tables}


def test_an_edit_rehashed_onward_is_rechaining(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 3)
    setup.checkpointer.checkpoint()
    fill(setup.log, clock, 3)
    setup.checkpointer.checkpoint()
    rechain(setup.db, only=5, decision="deny", reason="nothing to see")
    assert "prev_hash" in CANONICAL_FIELDS
    assert verify(setup, capsys)[0] == 0  # the chain has no key
    code, out = anchored(setup, capsys)
    assert code == 1
    assert "BROKEN at seq 6" in out
    assert str(Break.RECHAINED) in out
    # The older checkpoint still matches: the edit is narrowed to seqs 4..6.
    assert "after seq 3 (which matches)" in out


def test_an_intact_log_verifies_against_its_checkpoints(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 3)
    setup.checkpointer.checkpoint()
    fill(setup.log, clock, 2)  # events after the newest checkpoint are fine
    code, out = anchored(setup, capsys)
    assert code == 0, out
    assert "audit chain OK: 5 events" in out
    assert "matches the checkpoint of" in out
    head = setup.log.head()
    assert head is not None
    code, out = verify(setup, capsys, "--anchor", f"{head.seq}:{head.hash}")
    assert code == 0, out
    code, out = verify(setup, capsys, "--anchor", f"5:{'0' * 64}")
    assert (code, str(Break.RECHAINED) in out) == (1, True)


# -- the anchor itself ------------------------------------------------------------------------


def test_an_edited_checkpoint_line_is_a_bad_anchor(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 5)
    setup.checkpointer.checkpoint()
    data = json.loads(setup.checkpoints.read_text())
    data["seq"] = data["count"] = 3  # as if the checkpoint had named less
    setup.checkpoints.write_text(json.dumps(data) + "\n")
    code, out = anchored(setup, capsys)
    assert code == 1
    assert f"{Break.BAD_ANCHOR}: " in out
    assert "line 1: signature does not verify" in out


def test_a_file_signed_by_another_key_fails_against_the_pinned_key(
    setup: Setup, tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 5)
    setup.checkpointer.checkpoint()
    pinned = tmp_path / "shipped.pub.pem"
    pinned.write_bytes((setup.data_dir / PUBLIC_KEY_FILE).read_bytes())
    # Someone who rewrote the log signs a fresh file with a key of their own.
    sql(setup.db, "DELETE FROM audit_events WHERE seq > 2")
    forger = CheckpointSigner.load_or_create(tmp_path / "forger")
    head2 = sqlite3.connect(setup.db).execute("SELECT hash FROM audit_events WHERE seq = 2")
    digest = head2.fetchone()[0]
    sql(setup.db, f"UPDATE audit_head SET seq = 2, hash = '{digest}'")
    setup.checkpoints.write_text(forger.sign(2, digest, 2, clock.now()).to_line() + "\n")
    code, out = anchored(setup, capsys)
    assert code == 0  # unpinned, the file vouches for itself
    assert "not pinned" in out
    code, out = verify(
        setup, capsys, "--anchor", str(setup.checkpoints), "--anchor-key", str(pinned)
    )
    assert code == 1
    assert f"{Break.BAD_ANCHOR}: " in out
    assert "no checkpoint is signed by key" in out


def test_checkpoints_going_back_are_a_bad_anchor(setup: Setup, clock: FakeClock) -> None:
    signer = CheckpointSigner.load_or_create(setup.data_dir)
    file = CheckpointFile(setup.checkpoints)
    file.append(signer.sign(5, "a" * 64, 5, clock.now()))
    file.append(signer.sign(3, "b" * 64, 3, clock.now()))
    with pytest.raises(CheckpointError, match=r"line 2: seq 3 .* after seq 5"):
        file.anchors()
    setup.checkpoints.write_text("")
    file.append(signer.sign(5, "a" * 64, 5, clock.now()))
    file.append(signer.sign(5, "c" * 64, 5, clock.now()))
    with pytest.raises(CheckpointError, match="two different hashes"):
        file.anchors()


def test_a_torn_last_line_is_not_a_checkpoint_yet(setup: Setup, clock: FakeClock) -> None:
    fill(setup.log, clock, 2)
    setup.checkpointer.checkpoint()
    with setup.checkpoints.open("a") as f:
        f.write('{"count":3,"hash":"ab')  # a crash in the middle of the next write
    anchors, _ = CheckpointFile(setup.checkpoints).anchors()
    assert [(a.seq, a.count) for a in anchors] == [(2, 2)]


def test_the_next_checkpoint_after_a_torn_line_is_a_line_of_its_own(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 2)
    setup.checkpointer.checkpoint()
    with setup.checkpoints.open("a") as f:
        f.write('{"count":3,"hash":"ab')  # a crash (or a full disk) in the middle of a write
    fill(setup.log, clock, 2)
    assert setup.checkpointer.checkpoint().seq == 4
    # Not glued to the torn line: the file stays an anchor, its newest checkpoint readable.
    anchors, _ = CheckpointFile(setup.checkpoints).anchors()
    assert [(a.seq, a.count) for a in anchors] == [(2, 2), (4, 4)]
    last = CheckpointFile(setup.checkpoints).last()
    assert last is not None
    assert last.seq == 4
    code, out = anchored(setup, capsys)
    assert code == 0, out
    # A prune record (the other way lines are written) after a torn line too.
    with setup.checkpoints.open("a") as f:
        f.write('{"count":')
    setup.checkpointer.sign_prune(1, "a" * 64, 1, 0.0)
    assert CheckpointFile(setup.checkpoints).last(PRUNE) is not None


def test_a_pinned_key_file_on_an_unknown_curve_is_refused(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.checkpointer.checkpoint()
    der = base64.b64decode(b"".join(setup.pinned.read_bytes().splitlines()[1:-1]))
    p256 = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
    der = der.replace(p256, bytes.fromhex("06082a8648ce3d030163"))  # a curve no one knows
    pinned = tmp_path / "odd.pub.pem"
    body = base64.encodebytes(der).decode("ascii")
    pinned.write_text(f"-----BEGIN PUBLIC KEY-----\n{body}-----END PUBLIC KEY-----\n")
    with pytest.raises(CheckpointError, match="holds no ECDSA P-256 public key"):
        load_public_key(pinned)
    code, out = verify(
        setup, capsys, "--anchor", str(setup.checkpoints), "--anchor-key", str(pinned)
    )
    assert code == 1
    assert "holds no ECDSA P-256 public key" in out


def test_a_pinned_key_file_past_any_key_is_refused_unread(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--anchor-key /dev/zero` read until memory ran out: a file past the bound is not read on.
    setup.checkpointer.checkpoint()
    pinned = tmp_path / "huge.pub.pem"
    pinned.write_bytes(setup.pinned.read_bytes() + b"#" * MAX_PUBLIC_KEY_BYTES)
    with pytest.raises(CheckpointError, match=f"more than {MAX_PUBLIC_KEY_BYTES} bytes"):
        load_public_key(pinned)
    code, out = verify(
        setup, capsys, "--anchor", str(setup.checkpoints), "--anchor-key", str(pinned)
    )
    assert code == 1
    assert f"{pinned} holds no PEM public key (more than" in out


def test_a_bad_anchor_argument_is_named(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = verify(setup, capsys, "--anchor", "7:nothex")
    assert code == 1
    assert "is not SEQ:HASH" in out


@pytest.mark.parametrize("seq", ["\u00b2", "\u0663", "+7", " 7"])
def test_an_anchor_seq_of_other_digits_is_a_bad_anchor(
    setup: Setup, capsys: pytest.CaptureFixture[str], seq: str
) -> None:
    """str.isdigit takes a superscript two or an Arabic-Indic three, int() refuses them: the
    seq must be ASCII digits, refused as a bad anchor, not a traceback."""
    code, out = verify(setup, capsys, "--anchor", f"{seq}:{'a' * 64}")
    assert code == 1
    assert f"{Break.BAD_ANCHOR}: " in out
    assert "is not SEQ:HASH" in out


@pytest.mark.parametrize("digest", [GENESIS_HASH, "ab" * 32])
def test_an_anchor_at_seq_0_is_a_bad_anchor(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str], digest: str
) -> None:
    """Seq 0 is no event but the genesis every chain starts from: `0:HASH` was dropped without
    a word and the log reported OK "with no anchor", whatever it held or HASH said."""
    fill(setup.log, clock, 3)
    sql(setup.db, "DELETE FROM audit_events", "DELETE FROM audit_head")  # even a wiped log
    code, out = verify(setup, capsys, "--anchor", f"0:{digest}")
    assert code == 1
    assert f"{Break.BAD_ANCHOR}: anchor '0:{digest}' names seq 0, which is no event" in out
    assert "give the head a verify printed" in out


def test_a_checkpoint_of_the_empty_log_anchors_at_the_genesis(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one seq-0 anchor there is: a checkpoint signed before the first event, at the
    genesis hash. It still verifies; a seq-0 anchor naming another hash contradicts itself."""
    setup.checkpointer.checkpoint()
    fill(setup.log, clock, 2)
    code, out = anchored(setup, capsys)
    assert code == 0, out
    result = setup.log.verify(anchor=Head(0, "ab" * 32))
    assert (result.ok, result.problem) == (False, Break.BAD_ANCHOR)
    assert "names seq 0 with hash abababababababab…, but seq 0 is no event" in result.detail
    assert setup.log.verify(anchor=Head(0, GENESIS_HASH)).ok


def test_verify_reads_one_snapshot_while_appends_go_on(setup: Setup, clock: FakeClock) -> None:
    fill(setup.log, clock, 3)
    store = SqliteAuditStore(setup.db)
    with store.audit_snapshot() as snap:
        fill(setup.log, clock, 3)  # committed while the snapshot is open
        rows = list(snap.rows())
        assert snap.head is not None
        assert (snap.head.seq, len(rows)) == (3, 3)
    store.close()
    assert setup.log.verify(anchor=Head(6, setup.log.head().hash)).ok  # type: ignore[union-attr]


def test_a_start_behind_the_last_checkpoint_is_logged(
    setup: Setup, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fill(setup.log, clock, 5)
    setup.checkpointer.checkpoint()
    setup.log.store.close()
    hash3 = sqlite3.connect(setup.db).execute("SELECT hash FROM audit_events WHERE seq = 3")
    sql(
        setup.db,
        "DELETE FROM audit_events WHERE seq > 3",
        f"UPDATE audit_head SET seq = 3, hash = '{hash3.fetchone()[0]}'",
    )
    reopened = AuditLog(SqliteDataStore(setup.db, clock), clock)
    with caplog.at_level("ERROR", logger="svid.server.audit"):
        Checkpointer(
            reopened,
            CheckpointSigner.load_or_create(setup.data_dir),
            CheckpointFile(setup.checkpoints),
            clock,
            interval=60.0,
        )
    (record,) = caplog.records
    assert "behind its last checkpoint" in record.getMessage()
    assert (record.head_seq, record.checkpoint_seq) == (3, 5)  # type: ignore[attr-defined]


def test_a_line_with_a_key_on_an_unknown_curve_is_a_bad_anchor(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, clock, 2)
    setup.checkpointer.checkpoint()
    signer = CheckpointSigner.load_or_create(setup.data_dir)
    der = signer.sign(2, "a" * 64, 2, clock.now()).public_key_der()
    p256 = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
    der = der.replace(p256, bytes.fromhex("06082a8648ce3d030163"))  # a curve no one knows
    forged = dataclasses.replace(
        signer.sign(9, "a" * 64, 9, clock.now()),
        key_id=key_id_of(der),
        public_key=base64.b64encode(der).decode("ascii"),
    )
    with setup.checkpoints.open("a") as f:
        f.write(forged.to_line() + "\n")
    code, out = anchored(setup, capsys)
    assert code == 1
    assert f"{Break.BAD_ANCHOR}: " in out
    assert "line 2: public_key is not an ECDSA P-256 key" in out


def test_the_checkpoint_file_is_bounded_its_newest_lines_carried_into_the_next(
    setup: Setup, clock: FakeClock
) -> None:
    """A checkpoint a minute while the head moves: unbounded, the file grows by ~500,000 lines a
    year and every append and last() read it whole. Past its bound it is rotated to `<file>.1`
    (the older one dropped, as the agent's copy drops its oldest lines), the new file starting
    with the newest checkpoint and prune record: each file is an anchor file on its own, and
    the writer continues from the newest lines."""
    signer = CheckpointSigner.load_or_create(setup.data_dir)
    line = len(signer.sign(100, "a" * 64, 100, clock.now()).to_line()) + 1
    bound = 20 * line
    file = CheckpointFile(setup.checkpoints, max_bytes=bound)
    file.append(signer.sign(1, "f" * 64, 1, clock.now(), PRUNE, last_ts=clock.now()))
    for seq in range(2, 200):
        file.append_unless_behind(signer.sign(seq, f"{seq:064x}", seq, clock.now()))
    rotated = setup.checkpoints.with_name(CHECKPOINT_FILE + ".1")
    assert setup.checkpoints.stat().st_size <= bound
    assert rotated.stat().st_size <= bound
    assert stat.S_IMODE(setup.checkpoints.stat().st_mode) == 0o644
    newest, prune = file.last(), file.last(PRUNE)
    assert newest is not None
    assert newest.seq == 199
    assert prune is not None
    assert prune.seq == 1
    anchors, _ = file.anchors(signer.key_id)
    assert anchors[0].pruned
    assert anchors[0].seq == 1
    assert [a.seq for a in anchors[1:]] == list(range(anchors[1].seq, 200))
    older, _ = CheckpointFile(rotated).anchors(signer.key_id)
    assert older[0].pruned  # carried into every file
    assert older[-1].seq == anchors[1].seq  # the newest of the full file, carried over


def test_the_newest_lines_are_read_from_the_end_of_a_long_file(
    setup: Setup, clock: FakeClock
) -> None:
    """Lines longer than a read from the end, lines across reads, a torn line longer than one:
    the writer still finds the newest complete line of each kind, and the one a prune chains
    from deep in the file."""
    signer = CheckpointSigner.load_or_create(setup.data_dir)
    file = CheckpointFile(setup.checkpoints)
    file.append(signer.sign(1, "f" * 64, 1, clock.now(), PRUNE, last_ts=clock.now()))
    for seq in range(2, 400):  # ~160 KB: several reads from the end
        file.append(signer.sign(seq, f"{seq:064x}", seq, clock.now()))
    torn = signer.sign(400, f"{400:064x}", 400, clock.now()).to_line()
    with setup.checkpoints.open("a") as f:
        f.write(" " * 200_000 + torn)  # a whole line but for its newline, longer than a read
    assert Checkpoint.parse(" " * 200_000 + torn).seq == 400  # only its newline is missing
    newest, prune = file.last(), file.last(PRUNE)
    assert newest is not None
    assert newest.seq == 399
    assert prune is not None
    assert prune.seq == 1
    deep = file.newest_signed_through(signer.key_id, 17)
    assert deep is not None
    assert (deep.seq, deep.hash) == (17, f"{17:064x}")


# -- a schema this release does not know --------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "export"])
def test_audit_verify_and_export_refuse_a_schema_a_newer_server_migrated(
    setup: Setup, clock: FakeClock, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Read on in its old meaning, a newer schema's log could be judged intact (or exported)
    wrongly: both commands refuse it, naming the version found and the one this release knows,
    as the server does at start."""
    fill(setup.log, clock, 3)
    setup.store.close()
    sql(setup.db, "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'n', 1)")
    latest = MIGRATIONS[-1].version
    code = main(["audit", command, "--data-dir", str(setup.data_dir)])
    out = capsys.readouterr()
    assert code != 0
    said = out.out + out.err
    assert f"version 999, newer than this server's ({latest})" in said
    assert "exported" not in said
    assert "OK" not in said
