"""The agent's copy of the server's audit checkpoints: every one kept stays, it never goes back,
only a checkpoint that verifies under the key it came with is kept, and the file only grows (but
for its cap).

Checkpoints are signed by the server's own CheckpointSigner: the agent must read exactly what
the server writes."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor import checkpoint_store
from agent_attestor.checkpoint_store import (
    BACKWARDS,
    FILE_NAME,
    FORKED,
    INVALID,
    KEY_CHANGED,
    UNWRITABLE,
    YOUNG_PRUNE,
    CheckpointStore,
    PushedCheckpoint,
    read_records,
)
from agent_attestor.errors import CheckpointUnreadableError
from server.audit import AuditLog, Break, EventKind
from server.audit.checkpoint import PRUNE, CheckpointFile, CheckpointSigner
from server.audit.event import GENESIS_HASH, canonical_json, event_from_row
from server.datastore.records import AUDIT_COLUMNS
from server.datastore.sqlite import SqliteDataStore
from svid import AuditCheckpoint, AuditCheckpointError
from svid._audit_checkpoint import key_id_of
from svid._clock import FakeClock

T0 = 1_700_000_000.0
HASHES = [f"{n:064x}" for n in range(100)]


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture
def refused() -> list[str]:
    return []


@pytest.fixture
def store(tmp_path: Path, refused: list[str]) -> CheckpointStore:
    return CheckpointStore(tmp_path / FILE_NAME, on_refused=refused.append)


def push(
    signer: CheckpointSigner, count: int, time: float = T0, digest: str = ""
) -> PushedCheckpoint:
    checkpoint = signer.sign(count, digest or HASHES[count], count, time)
    return PushedCheckpoint(checkpoint.to_line(), checkpoint.public_key_der())


def test_the_first_checkpoint_is_kept_in_the_servers_file_format(
    store: CheckpointStore, signer: CheckpointSigner
) -> None:
    pushed = push(signer, 5)
    assert store.offer(pushed)
    assert store.held == AuditCheckpoint.parse(pushed.line)
    assert store.path.read_text() == pushed.line + "\n"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    # The stored file is an anchor file as `svid-server audit verify --anchor` reads it.
    anchors, _ = CheckpointFile(store.path).anchors()
    assert [(a.seq, a.hash) for a in anchors] == [(5, HASHES[5])]


def test_a_newer_checkpoint_is_held_and_kept_beside_the_older_ones(
    store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    assert store.offer(push(signer, 5))
    assert store.offer(push(signer, 9, T0 + 60))
    assert store.held is not None
    assert store.held.count == 9
    # The same head signed again later (an on-demand checkpoint) is newer too.
    assert store.offer(push(signer, 9, T0 + 120))
    assert store.held.time == T0 + 120
    # ...but the very same one again is nothing new.
    assert not store.offer(push(signer, 9, T0 + 120))
    assert not store.offer(push(signer, 9, T0 + 90))
    assert refused == []
    assert [(r.seq, r.time) for r in read_records(store.path)] == [
        (5, T0),
        (9, T0 + 60),
        (9, T0 + 120),
    ]
    assert read_records(store.path)[-1] == store.held


def test_a_checkpoint_naming_fewer_events_is_refused_and_the_held_one_kept(
    store: CheckpointStore,
    signer: CheckpointSigner,
    refused: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert store.offer(push(signer, 9))
    before = store.path.read_bytes()
    caplog.set_level(logging.WARNING, logger="agent_attestor.checkpoint_store")
    # Signed later and validly: a log cut back and checkpointed again.
    assert not store.offer(push(signer, 4, T0 + 600))
    assert refused == [BACKWARDS]
    assert store.held is not None
    assert store.held.count == 9
    assert store.path.read_bytes() == before
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "names event 4, before event 9" in record.getMessage()
    assert record.__dict__["reason"] == BACKWARDS


def test_another_hash_for_the_same_head_is_refused(
    store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    assert store.offer(push(signer, 9))
    assert not store.offer(push(signer, 9, T0 + 60, digest=HASHES[1]))
    assert refused == [FORKED]
    assert store.held is not None
    assert store.held.hash == HASHES[9]


def test_a_checkpoint_that_does_not_verify_is_refused(
    store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    good = push(signer, 5)
    assert store.offer(good)
    # The count raised after signing.
    edited = dataclasses.replace(AuditCheckpoint.parse(push(signer, 6).line), count=60, seq=60)
    assert not store.offer(PushedCheckpoint(edited.to_line(), good.public_key))
    # Signed by one key, sent with another.
    other = CheckpointSigner(ec.generate_private_key(ec.SECP256R1()))
    line = push(signer, 7).line
    assert not store.offer(PushedCheckpoint(line, push(other, 7).public_key))
    assert not store.offer(PushedCheckpoint("not json", good.public_key))
    assert refused == [INVALID] * 3
    assert store.held == AuditCheckpoint.parse(good.line)


def test_a_checkpoint_by_another_key_than_the_pinned_one_is_refused(
    store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    assert store.offer(push(signer, 5))
    other = CheckpointSigner(ec.generate_private_key(ec.SECP256R1()))
    assert not store.offer(push(other, 50, T0 + 60))
    assert refused == [KEY_CHANGED]
    assert store.held is not None
    assert store.held.key_id == signer.key_id


def test_the_held_checkpoint_and_its_key_survive_a_restart(
    tmp_path: Path, store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    assert store.offer(push(signer, 9))
    again = CheckpointStore(tmp_path / FILE_NAME, on_refused=refused.append)
    assert again.held == store.held
    assert not again.offer(push(signer, 3, T0 + 60))
    # The pinned key came back with the file.
    assert not again.offer(push(CheckpointSigner(ec.generate_private_key(ec.SECP256R1())), 20))
    assert refused == [BACKWARDS, KEY_CHANGED]


def test_a_write_that_fails_leaves_the_previous_file_whole(
    store: CheckpointStore,
    signer: CheckpointSigner,
    refused: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full disk between writing the new line and fsyncing it: the line is cut off again, so
    the file never holds one the store did not keep (a later, lower one would follow it)."""
    assert store.offer(push(signer, 5))
    before = store.path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_store.os, "fsync", disk_full)
    assert not store.offer(push(signer, 9))
    monkeypatch.undo()
    assert refused == [UNWRITABLE]
    assert store.path.read_bytes() == before
    assert store.held is not None
    assert store.held.count == 5
    # The next one is stored, whatever the failed attempt left behind.
    assert store.offer(push(signer, 7))
    assert [r.count for r in read_records(store.path)] == [5, 7]


def test_a_line_cut_short_by_a_crash_is_not_read_and_is_cut_off_before_the_next(
    tmp_path: Path, store: CheckpointStore, signer: CheckpointSigner
) -> None:
    assert store.offer(push(signer, 5))
    with store.path.open("a") as f:
        f.write(push(signer, 9).line[:50])
    again = CheckpointStore(store.path)
    assert again.held is not None
    assert again.held.count == 5
    assert again.offer(push(signer, 7))
    assert [r.count for r in read_records(store.path)] == [5, 7]
    CheckpointFile(store.path).anchors()


def test_an_agents_one_line_file_is_read_and_grown(
    tmp_path: Path, signer: CheckpointSigner
) -> None:
    """An agent before every checkpoint was kept wrote the newest checkpoint and prune record,
    oldest first, replaced whole: the upgraded agent holds them and appends after them."""
    path = tmp_path / FILE_NAME
    held = AuditCheckpoint.parse(push(signer, 9, T0 + 10).line)
    path.write_text(prune(signer, 4, T0).line + "\n" + held.to_line() + "\n")
    store = CheckpointStore(path)
    assert store.held == held
    assert store.offer(push(signer, 12, T0 + 20))
    assert not store.offer(push(signer, 8, T0 + 30))
    assert [(r.kind, r.seq) for r in read_records(path)] == [
        ("prune", 4),
        ("checkpoint", 9),
        ("checkpoint", 12),
    ]
    CheckpointFile(path).anchors()


def test_beyond_the_cap_the_oldest_are_dropped_but_the_newest_prune_record(
    tmp_path: Path, signer: CheckpointSigner, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path / FILE_NAME, max_lines=10)
    assert store.offer(prune(signer, 2, T0))
    for n in range(3, 12):
        assert store.offer(push(signer, n, T0 + n))
    assert len(read_records(store.path)) == 10
    caplog.set_level(logging.WARNING, logger="agent_attestor.checkpoint_store")
    assert store.offer(push(signer, 12, T0 + 12))
    # Down to nine tenths of the cap, the prune record kept ahead of the newest.
    assert [r.seq for r in read_records(store.path)] == [2, *range(5, 13)]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "cap" in warning.getMessage()
    # Then lines append again up to the cap...
    assert store.offer(push(signer, 13, T0 + 13))
    assert [r.seq for r in read_records(store.path)] == [2, *range(5, 14)]
    assert len(caplog.records) == 1
    # ...counted across a restart.
    again = CheckpointStore(store.path, max_lines=10)
    assert again.offer(push(signer, 14, T0 + 14))
    assert [r.seq for r in read_records(store.path)] == [2, *range(7, 15)]
    CheckpointFile(store.path).anchors()


def test_an_unreadable_stored_checkpoint_is_moved_aside_not_trusted(
    tmp_path: Path, signer: CheckpointSigner
) -> None:
    path = tmp_path / FILE_NAME
    line = AuditCheckpoint.parse(push(signer, 9).line)
    path.write_text(dataclasses.replace(line, count=90, seq=90).to_line() + "\n")
    with pytest.raises(AuditCheckpointError, match="signature"):
        read_records(path)
    store = CheckpointStore(path)
    assert store.held is None
    assert not path.exists()
    assert (tmp_path / (FILE_NAME + ".invalid")).exists()
    assert store.offer(push(signer, 4))


def test_a_stored_checkpoint_that_is_not_text_is_moved_aside_and_the_agent_starts(
    tmp_path: Path, signer: CheckpointSigner
) -> None:
    """A damaged file (bytes that are not UTF-8) raised UnicodeDecodeError from the store's
    constructor: the agent could not start at all."""
    path = tmp_path / FILE_NAME
    path.write_bytes(b"\xff\xfe" + push(signer, 9).line.encode()[:40])
    with pytest.raises(AuditCheckpointError, match="UTF-8"):
        read_records(path)
    store = CheckpointStore(path)
    assert store.held is None
    assert (tmp_path / (FILE_NAME + ".invalid")).exists()
    assert store.offer(push(signer, 4))


@pytest.mark.parametrize("fault", ["eio", "directory"])
def test_a_stored_copy_the_system_cannot_read_fails_the_start_and_stays_in_place(
    tmp_path: Path, signer: CheckpointSigner, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Any read error at start set the copy aside, a transient EIO included: the anchor that
    makes the server's audit log tamper-evident against a rewrite was dropped, and the copy
    started again from whatever the server pushed next. Only a file read and found damaged is
    set aside; one the system cannot read stops the start, naming the file."""
    path = tmp_path / FILE_NAME
    if fault == "directory":
        path.mkdir()  # not a file at all: IsADirectoryError
    else:
        path.write_text(push(signer, 9).line + "\n")
        real, inode = os.read, path.stat().st_ino

        def read(fd: int, size: int) -> bytes:
            if os.fstat(fd).st_ino == inode:  # the disk fails this file's reads
                raise OSError(5, "Input/output error")
            return real(fd, size)

        monkeypatch.setattr(os, "read", read)
    with pytest.raises(CheckpointUnreadableError) as caught:
        CheckpointStore(path)
    assert str(path) in str(caught.value)
    assert path.exists()
    assert not (tmp_path / (FILE_NAME + ".invalid")).exists()
    if fault == "eio":
        monkeypatch.undo()  # the disk answers again: the copy is all there
        held = CheckpointStore(path).held
        assert held is not None
        assert held.count == 9


def prune(signer: CheckpointSigner, seq: int, time: float, removed: int = 0) -> PushedCheckpoint:
    record = signer.sign(seq, HASHES[seq], removed or seq, time, PRUNE)
    return PushedCheckpoint(record.to_line(), record.public_key_der())


def test_prune_records_are_kept_beside_the_checkpoints(
    store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    """A pruned log's start is vouched for only by a prune record: the copy keeps them, and the
    file, oldest line first, is an anchor file audit verify accepts as such."""
    assert store.offer(push(signer, 9))
    assert store.offer(prune(signer, 4, T0 + 10))
    assert store.offer(push(signer, 12, T0 + 20))
    assert store.offer(prune(signer, 8, T0 + 30, removed=4))
    kinds = [(r.kind, r.seq) for r in read_records(store.path)]
    assert kinds == [("checkpoint", 9), ("prune", 4), ("checkpoint", 12), ("prune", 8)]
    assert store.held is not None
    assert store.held.count == 12
    anchors, _ = CheckpointFile(store.path).anchors()
    assert [(a.seq, a.pruned) for a in anchors] == [(9, False), (4, True), (12, False), (8, True)]
    # An older prune record, or one forking a pruned event, is refused.
    assert not store.offer(prune(signer, 6, T0 + 40))
    forked = signer.sign(8, HASHES[1], 4, T0 + 50, PRUNE)
    assert not store.offer(PushedCheckpoint(forked.to_line(), forked.public_key_der()))
    assert refused == [BACKWARDS, FORKED]
    assert [r.seq for r in store.records] == [12, 8]
    assert len(read_records(store.path)) == 4


def test_a_checkpoint_after_a_prune_naming_less_than_it_removed_is_refused(
    store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    assert store.offer(prune(signer, 20, T0))
    # Signed after the prune, naming fewer events than it removed: the log was cut back.
    assert not store.offer(push(signer, 15, T0 + 10))
    assert refused == [BACKWARDS]
    assert [r.kind for r in store.records] == ["prune"]
    # Signed before the prune, it may name less: the head grew, then the prune came.
    assert store.offer(push(signer, 15, T0 - 10))
    assert [(r.kind, r.seq) for r in read_records(store.path)] == [
        ("checkpoint", 15),
        ("prune", 20),
    ]
    CheckpointFile(store.path).anchors()  # and audit verify reads it as consistent


def unknown_curve_line(signer: CheckpointSigner, count: int) -> PushedCheckpoint:
    """A checkpoint line carrying, with its matching key id, a P-256 key whose curve OID was
    changed to one no library knows: what a damaged or hostile line holds."""
    der = signer.sign(count, HASHES[count], count, T0).public_key_der()
    p256 = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
    der = der.replace(p256, bytes.fromhex("06082a8648ce3d030163"))
    forged = dataclasses.replace(
        signer.sign(count, HASHES[count], count, T0),
        key_id=key_id_of(der),
        public_key=base64.b64encode(der).decode("ascii"),
    )
    return PushedCheckpoint(forged.to_line(), der)


def test_a_checkpoint_with_a_key_on_an_unknown_curve_is_refused(
    store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    assert not store.offer(unknown_curve_line(signer, 5))
    assert refused == [INVALID]
    assert store.offer(push(signer, 6))


AGENT = "spiffe://example.org/agents/research-bot"


def test_a_head_that_does_not_extend_the_held_one_leaves_the_held_one_for_verify_to_check(
    tmp_path: Path,
) -> None:
    """Threat: one server of several is taken over; it holds the trust domain's shared
    checkpoint key (CheckpointSigner.load_shared) and SQL access. It rewrites event 2, re-hashes
    the chain after it, signs the new head (one seq further) and pushes it. The agent cannot
    tell (it holds no events), but it keeps the honest head beside the new one, so verify
    --anchor on its copy finds the rewrite as it does on the server's own file."""
    db = tmp_path / "datastore.sqlite3"
    clock = FakeClock(1_800_000_000.0)
    audit = AuditLog(SqliteDataStore(db, clock), clock)
    for i in range(4):
        audit.append(
            EventKind.JWT_MINTED,
            agent_id=AGENT,
            credential_id=f"jti-{i}",
            decision="allow",
            policy_ids=("default.cedar:permit_docs",),
            extra={"aud": "docs"},
        )
        clock.advance(10)
    signer = CheckpointSigner(ec.generate_private_key(ec.SECP256R1()))
    agent = CheckpointStore(tmp_path / FILE_NAME)
    head = audit.head()
    assert head is not None
    honest = signer.sign(head.seq, head.hash, head.seq, clock.now())
    assert agent.offer(PushedCheckpoint(honest.to_line(), honest.public_key_der()))

    # The rogue server: event 2 rewritten, every later one re-hashed, one event appended.
    con = sqlite3.connect(db)
    found = con.execute(f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events ORDER BY seq")
    events = [event_from_row(dict(zip(AUDIT_COLUMNS, r, strict=True))) for r in found]
    events.append(dataclasses.replace(events[-1], seq=5, event_id=events[-1].event_id + "x"))
    prev = GENESIS_HASH
    for original in events:
        event = original
        if event.seq == 2:
            event = dataclasses.replace(event, decision="deny", reason="no such token")
        event = dataclasses.replace(event, prev_hash=prev)
        event = dataclasses.replace(event, hash=event.compute_hash())
        con.execute("DELETE FROM audit_events WHERE seq = ?", (event.seq,))
        con.execute(
            f"INSERT INTO audit_events ({', '.join(AUDIT_COLUMNS)}) VALUES "
            f"({', '.join('?' for _ in AUDIT_COLUMNS)})",
            [
                canonical_json(list(event.policy_ids)).decode()
                if name == "policy_ids"
                else canonical_json(dict(event.extra)).decode()
                if name == "extra"
                else getattr(event, name)
                for name in AUDIT_COLUMNS
            ],
        )
        prev = event.hash
    con.execute("UPDATE audit_head SET seq = 5, hash = ?", (prev,))
    con.commit()
    con.close()
    forged = signer.sign(5, prev, 5, clock.now() + 60)
    assert agent.offer(PushedCheckpoint(forged.to_line(), forged.public_key_der()))

    # The server's own file (every line kept) shows the rewrite:
    server_file = CheckpointFile(tmp_path / "server-checkpoints.jsonl")
    server_file.append(honest)
    server_file.append(forged)
    assert audit.verify(anchors=server_file.anchors()[0]).problem is Break.RECHAINED
    # ...and so does the agent's copy, which still holds the honest head:
    assert [r.seq for r in read_records(agent.path)] == [4, 5]
    result = audit.verify(anchors=CheckpointFile(agent.path).anchors()[0])
    assert result.problem is Break.RECHAINED
    assert result.broken_seq == 4  # the honest head no longer matches


DAY = 86400.0


def young_store(tmp_path: Path, refused: list[str], now: float) -> CheckpointStore:
    """A store told the servers keep 30 days of audit events, its clock at `now`."""
    return CheckpointStore(
        tmp_path / FILE_NAME, refused.append, clock=FakeClock(now), min_prune_age=30 * DAY
    )


def signed_prune(
    signer: CheckpointSigner, seq: int, time: float, last_ts: float | None
) -> PushedCheckpoint:
    record = signer.sign(seq, HASHES[seq], seq, time, PRUNE, last_ts=last_ts)
    return PushedCheckpoint(record.to_line(), record.public_key_der())


def test_a_prune_record_removing_events_younger_than_the_retention_is_refused(
    tmp_path: Path,
    signer: CheckpointSigner,
    refused: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A holder of the key prunes through the head: the agent keeps what it holds."""
    now = T0 + 100 * DAY
    store = young_store(tmp_path, refused, now)
    assert store.offer(push(signer, 9, T0))
    before = store.path.read_bytes()
    caplog.set_level(logging.ERROR, logger="agent_attestor.checkpoint_store")
    assert not store.offer(signed_prune(signer, 9, now, last_ts=now - DAY))
    assert refused == [YOUNG_PRUNE]
    assert store.path.read_bytes() == before
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert "removes events written less than 30 days" in record.getMessage()
    # Events older than the retention go as they should; a record without last_ts (an older
    # server's) is judged by the checkpoints held.
    assert store.offer(signed_prune(signer, 5, now, last_ts=now - 40 * DAY))
    assert store.offer(signed_prune(signer, 7, now + 60, last_ts=None))
    assert refused == [YOUNG_PRUNE]


def test_a_prune_record_signing_a_false_time_is_refused_by_a_checkpoint_held(
    tmp_path: Path, signer: CheckpointSigner, refused: list[str]
) -> None:
    """Its last_ts says a year ago, but a checkpoint signed two days ago named fewer events:
    the events it removes were written since. Dating the record itself back does not help."""
    now = T0 + 100 * DAY
    store = young_store(tmp_path, refused, now)
    assert store.offer(push(signer, 3, now - 2 * DAY))
    assert store.offer(push(signer, 9, now - DAY))
    assert not store.offer(signed_prune(signer, 5, now, last_ts=now - 365 * DAY))
    assert not store.offer(signed_prune(signer, 5, now - 300 * DAY, last_ts=None))
    # ...and a restart remembers the checkpoints it is judged by.
    again = young_store(tmp_path, refused, now)
    assert not again.offer(signed_prune(signer, 5, now, last_ts=None))
    assert refused == [YOUNG_PRUNE] * 3
    assert [r.kind for r in read_records(store.path)] == ["checkpoint", "checkpoint"]
    # Through seq 3, which the old checkpoint named, it says nothing against a prune.
    assert again.offer(signed_prune(signer, 3, now, last_ts=now - 40 * DAY))


# -- a copy damaged after start -----------------------------------------------------------------


def test_a_line_damaged_after_start_is_moved_aside_at_the_cap_and_the_copy_starts_again(
    tmp_path: Path,
    signer: CheckpointSigner,
    refused: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a rewrite (the cap, or a checkpoint going before a prune) reads the file whole: one
    unparsable line raised AuditCheckpointError out of offer, which ended the agent's Sync
    stream, and the server pushed the same checkpoint on each reconnect."""
    store = CheckpointStore(tmp_path / FILE_NAME, on_refused=refused.append, max_lines=5)
    for n in range(1, 6):
        assert store.offer(push(signer, n, T0 + n))
    lines = store.path.read_text().split("\n")
    lines[1] = lines[1][:-10]  # one byte range lost in the middle of the file
    damaged = "\n".join(lines)
    store.path.write_text(damaged)
    caplog.set_level(logging.WARNING, logger="agent_attestor.checkpoint_store")
    pushed = push(signer, 6, T0 + 6)
    assert store.offer(pushed)
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    aside = tmp_path / (FILE_NAME + ".invalid")
    assert error.__dict__["moved_to"] == str(aside)
    assert aside.read_text() == damaged  # the evidence, as it was
    assert store.path.read_text() == pushed.line + "\n"
    assert [r.seq for r in read_records(store.path)] == [6]
    assert refused == []
    # The copy goes on from there: it appends, and a restart reads it.
    assert store.offer(push(signer, 7, T0 + 7))
    assert [r.seq for r in read_records(store.path)] == [6, 7]
    assert CheckpointStore(store.path).held == store.held


def test_a_copy_no_longer_utf8_before_a_prune_is_moved_aside_and_the_checkpoint_kept(
    store: CheckpointStore, signer: CheckpointSigner, refused: list[str]
) -> None:
    """A checkpoint signed before a held prune that removed more is written before it, by a
    rewrite: a non-UTF-8 byte there raised out of offer too."""
    assert store.offer(prune(signer, 20, T0))
    store.path.write_bytes(b"\xff" + store.path.read_bytes())
    assert store.offer(push(signer, 15, T0 - 10))
    assert (store.path.parent / (FILE_NAME + ".invalid")).read_bytes()[:1] == b"\xff"
    assert [(r.kind, r.seq) for r in read_records(store.path)] == [("checkpoint", 15)]
    assert refused == []


def test_a_copy_removed_after_start_starts_again_at_the_cap(
    tmp_path: Path, signer: CheckpointSigner, refused: list[str]
) -> None:
    """Without the file the lines counted were gone: every offer at the cap was unwritable
    until the agent restarted."""
    store = CheckpointStore(tmp_path / FILE_NAME, on_refused=refused.append, max_lines=3)
    for n in range(1, 4):
        assert store.offer(push(signer, n, T0 + n))
    store.path.unlink()
    assert store.offer(push(signer, 4, T0 + 4))
    assert [r.seq for r in read_records(store.path)] == [4]
    assert refused == []


def test_a_damaged_copy_that_cannot_be_moved_aside_is_unwritable_not_raised(
    tmp_path: Path, signer: CheckpointSigner, refused: list[str]
) -> None:
    store = CheckpointStore(tmp_path / FILE_NAME, on_refused=refused.append, max_lines=2)
    for n in range(1, 3):
        assert store.offer(push(signer, n, T0 + n))
    store.path.write_bytes(b"\xff\n")
    (tmp_path / (FILE_NAME + ".invalid")).mkdir()  # the rename over it fails
    (tmp_path / (FILE_NAME + ".invalid") / "x").touch()
    assert not store.offer(push(signer, 3, T0 + 3))
    assert refused == [UNWRITABLE]
