"""The checkpointer on a datastore other writers share (unit level, two logs on one SQLite
file): which head it signs and when it reads the chain back, the trust domain's shared key,
and records stored by others taken in only when signed by that key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from server.audit.checkpoint import (
    CHECKPOINT_FILE,
    KEY_DIR,
    PUBLIC_KEY_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointFile,
    CheckpointSigner,
)
from server.audit.checkpointer import Checkpointer
from server.audit.log import AuditLog
from server.audit.retention import Pruner, RetentionPolicy
from server.ca.errors import CaConfigError
from server.ca.keys import KeyStore
from server.ca.sealing import KeyEncryptionKey
from server.datastore.records import AuditRecord, Head
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock

AGENT = "spiffe://example.org/agents/bot"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@dataclasses.dataclass
class Shared:
    root: Path
    clock: FakeClock
    stores: list[SqliteDataStore]

    def store(self) -> SqliteDataStore:
        store = SqliteDataStore(self.root / "shared.sqlite3", self.clock)
        self.stores.append(store)
        return store

    def checkpointer(
        self, name: str, log: AuditLog, store: SqliteDataStore, **kw: Any
    ) -> Checkpointer:
        data_dir = self.root / name
        data_dir.mkdir(exist_ok=True)
        return Checkpointer.in_data_dir(
            log,
            data_dir,
            self.clock,
            60.0,
            records=store,
            **kw,
        )


@pytest.fixture
def shared(tmp_path: Path, clock: FakeClock) -> Any:
    made = Shared(tmp_path, clock, [])
    yield made
    for store in made.stores:
        store.close()


def fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append("jwt_minted", agent_id=AGENT, credential_id=f"jti-{i}", decision="allow")


def counting(store: SqliteDataStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of the read-back (rows after a seq), by their `after`."""
    calls: list[int] = []
    read = store.audit_rows_after

    def spy(after: int, limit: int) -> list[dict[str, Any]]:
        calls.append(after)
        return read(after, limit)

    monkeypatch.setattr(store, "audit_rows_after", spy)
    return calls


@pytest.mark.parametrize(
    ("before", "first_reads"),
    [
        (3, [0]),  # events of an earlier run: the first checkpoint since start reads them back
        # A new server signs its empty log at start, then writes: none of that is read back
        # (all of it was, and a busy first run's shutdown took seconds per 100k events).
        (0, []),
    ],
)
def test_one_writer_signs_its_own_head_without_reading_the_chain_back(
    shared: Shared, monkeypatch: pytest.MonkeyPatch, before: int, first_reads: list[int]
) -> None:
    store = shared.store()
    log = AuditLog(store, shared.clock)
    checkpointer = shared.checkpointer("a", log, store)
    fill(log, before)
    calls = counting(store, monkeypatch)
    first = checkpointer.checkpoint()
    assert calls == first_reads
    fill(log, 5)
    second = checkpointer.checkpoint()
    assert calls == first_reads  # nothing read back: only this process wrote since
    assert (second.seq, second.hash) == (before + 5, store.audit_head().hash)  # type: ignore[union-attr]
    assert second.seq > first.seq


def test_a_commit_landing_while_the_heads_are_read_is_all_that_is_read_back(
    shared: Shared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy server commits every few milliseconds, so one of its own commits often lands
    after the checkpointer took the log's committed head and before it reads the stored one.
    Only that commit's events are read back, and the next checkpoint still reads nothing: it
    read every event since the last checkpoint back, and so did each checkpoint after it
    (~0.5 M events a minute under the JWT bench: seconds of CPU taken from issuance)."""
    store = shared.store()
    log = AuditLog(store, shared.clock)
    checkpointer = shared.checkpointer("a", log, store)
    fill(log, 40)
    checkpointer.checkpoint()
    fill(log, 10)
    calls = counting(store, monkeypatch)
    stored_head = store.audit_head

    def commit_meanwhile() -> Head | None:
        fill(log, 3)
        return stored_head()

    monkeypatch.setattr(store, "audit_head", commit_meanwhile)
    made = checkpointer.checkpoint()
    assert calls == [50]  # from the log's committed head, not from the checkpoint at 40
    assert (made.seq, made.hash) == (53, stored_head().hash)  # type: ignore[union-attr]
    monkeypatch.setattr(store, "audit_head", stored_head)
    fill(log, 5)
    assert checkpointer.checkpoint().seq == 58
    assert calls == [50]


@pytest.mark.parametrize("before", [2, 0])  # 0: the empty log a new server signs at start
def test_after_another_writers_events_the_chain_is_read_back_from_the_last_checkpoint(
    shared: Shared, monkeypatch: pytest.MonkeyPatch, before: int
) -> None:
    store_a, store_b = shared.store(), shared.store()
    log_a, log_b = AuditLog(store_a, shared.clock), AuditLog(store_b, shared.clock)
    checkpointer = shared.checkpointer("a", log_a, store_a)
    fill(log_a, before)
    signed = checkpointer.checkpoint()
    calls = counting(store_a, monkeypatch)
    fill(log_b, 3)
    fill(log_a, 1)  # sealed again on B's head: A's log adopted it
    assert log_a.adopted == 1
    made = checkpointer.checkpoint()
    assert calls == [signed.seq]  # from the last checkpoint, not from genesis
    assert made.seq == before + 4 == store_a.audit_head().seq  # type: ignore[union-attr]


def test_without_a_write_of_its_own_the_holder_still_signs_the_stored_head(
    shared: Shared,
) -> None:
    store_a, store_b = shared.store(), shared.store()
    log_a, log_b = AuditLog(store_a, shared.clock), AuditLog(store_b, shared.clock)
    checkpointer = shared.checkpointer("a", log_a, store_a)
    fill(log_b, 4)
    assert log_a.committed_head() is None
    assert checkpointer.checkpoint().seq == 4


def test_the_shared_key_is_the_first_servers_and_every_other_adopts_it(
    shared: Shared,
) -> None:
    store = shared.store()
    kek = KeyEncryptionKey.generate()
    (shared.root / "b").mkdir()
    own_b = CheckpointSigner.load_or_create(shared.root / "b")  # B signed alone before
    a = CheckpointSigner.load_shared(shared.root / "a", store, kek, 0)
    b = CheckpointSigner.load_shared(shared.root / "b", store, kek, 0)
    assert a.key_id == b.key_id != own_b.key_id
    pub = [(shared.root / n / PUBLIC_KEY_FILE).read_bytes() for n in ("a", "b")]
    assert pub[0] == pub[1]
    # B's data dir now holds the shared key (a restart without the datastore row re-offers
    # it), its own kept aside.
    keys = KeyStore(shared.root / "b" / KEY_DIR)
    assert CheckpointSigner.load_or_create(shared.root / "b").key_id == a.key_id
    assert f"checkpoint-replaced-{own_b.key_id[:16]}" in keys.slot_ids()
    # Nothing but the sealed key in the datastore: another KEK cannot open it.
    with pytest.raises(CaConfigError, match="not the key-encryption key"):
        CheckpointSigner.load_shared(shared.root / "c", store, KeyEncryptionKey.generate(), 0)


def test_records_stored_by_others_are_filed_only_when_signed_by_the_shared_key(
    shared: Shared,
) -> None:
    store = shared.store()
    log = AuditLog(store, shared.clock)
    fill(log, 2)
    kek = KeyEncryptionKey.generate()
    signer = CheckpointSigner.load_shared(shared.root / "a", store, kek, 0)
    stranger = CheckpointSigner.load_or_create(shared.root / "x")
    pushed: list[Checkpoint] = []
    (shared.root / "b").mkdir()
    follower = Checkpointer(
        log,
        CheckpointSigner.load_shared(shared.root / "b", store, kek, 0),
        CheckpointFile(shared.root / "b" / CHECKPOINT_FILE),
        shared.clock,
        60.0,
        records=store,
        on_checkpoint=pushed.append,
    )
    good = signer.sign(2, log.committed_head().hash, 2, shared.clock.now())  # type: ignore[union-attr]
    forged = stranger.sign(2, "f" * 64, 2, shared.clock.now() + 1)
    follower.adopt([AuditRecord(c.kind, c.seq, c.time, c.to_line()) for c in (good, forged)])
    assert pushed == [good]
    assert CheckpointFile(shared.root / "b" / CHECKPOINT_FILE).last() == good
    follower.adopt([AuditRecord(good.kind, good.seq, good.time, good.to_line())])
    assert pushed == [good]  # not newer: not filed or pushed again


def test_after_a_signed_prune_past_the_checkpoint_the_chain_is_read_from_the_prune(
    shared: Shared, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_a, store_b = shared.store(), shared.store()
    log_a, log_b = AuditLog(store_a, shared.clock), AuditLog(store_b, shared.clock)
    checkpointer = shared.checkpointer("a", log_a, store_a)
    fill(log_a, 2)
    checkpointer.checkpoint()
    fill(log_b, 4)
    marks = store_a.audit_marks(0, 10)
    record = checkpointer.sign_prune(5, marks[4].hash, 5, marks[4].ts)
    assert store_a.audit_records()[-1].line == record.to_line()  # shared before any delete
    store_a.prune_audit(Head(5, marks[4].hash), shared.clock.now())
    fill(log_b, 2)
    calls = counting(store_a, monkeypatch)
    assert checkpointer.checkpoint().seq == 8
    # After its own head first (no write of A's since moved it: a commit may have landed
    # meanwhile), which does not chain: B's events there are pruned in part. Then from the prune.
    assert calls == [2, 5]


def test_events_pruned_past_the_checkpoint_without_a_signed_record_are_refused(
    shared: Shared,
) -> None:
    store_a, store_b = shared.store(), shared.store()
    log_a, log_b = AuditLog(store_a, shared.clock), AuditLog(store_b, shared.clock)
    reasons: list[str] = []
    checkpointer = shared.checkpointer("a", log_a, store_a, on_refused=reasons.append)
    fill(log_a, 2)
    signed = checkpointer.checkpoint()
    fill(log_b, 4)
    marks = store_a.audit_marks(0, 10)
    store_b.prune_audit(Head(5, marks[4].hash), shared.clock.now())  # no prune record
    with pytest.raises(CheckpointError, match="without a signed prune record"):
        checkpointer.checkpoint()
    assert reasons == ["pruned_unsigned"]
    assert checkpointer.last == signed


def test_a_prune_signed_beside_the_server_into_its_file_is_a_start_too(shared: Shared) -> None:
    store_a, store_b = shared.store(), shared.store()
    log_a, log_b = AuditLog(store_a, shared.clock), AuditLog(store_b, shared.clock)
    checkpointer = shared.checkpointer("a", log_a, store_a)
    fill(log_a, 2)
    checkpointer.checkpoint()
    fill(log_b, 4)
    # `svid-server audit prune`: the data dir's key and file, no datastore sharing.
    data_dir = shared.root / "a"
    beside = Checkpointer.in_data_dir(
        AuditLog(store_b, shared.clock),
        data_dir,
        shared.clock,
        60.0,
    )
    marks = store_b.audit_marks(0, 10)
    beside.sign_prune(5, marks[4].hash, 5, marks[4].ts)
    store_b.prune_audit(Head(5, marks[4].hash), shared.clock.now())
    fill(log_b, 1)
    assert checkpointer.checkpoint().seq == 7


def test_retention_prunes_up_to_the_head_last_signed_not_only_its_own_writes(
    shared: Shared,
) -> None:
    store_a, store_b = shared.store(), shared.store()
    log_a, log_b = AuditLog(store_a, shared.clock), AuditLog(store_b, shared.clock)
    checkpointer = shared.checkpointer("a", log_a, store_a)
    pruner = Pruner(store_a, log_a, checkpointer, shared.clock, RetentionPolicy(0, 2), pause=0)
    fill(log_b, 6)  # all through the other writer
    checkpointer.checkpoint()
    report = pruner.prune()
    assert report.base is not None
    assert report.base.seq == 4
