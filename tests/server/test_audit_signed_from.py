"""Where the chain through a prune's target is pinned next (Checkpointer.signed_from): the
oldest line this key signed at or after it, read back from the end of the checkpoint file.

Read newest first, each line names a lower seq than the one before, and each was verified as
it came: every hourly prune verified a signature per checkpoint back to its target (a month
of minutely checkpoints, seconds of CPU under the checkpointer's lock)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.audit.checkpoint import CheckpointFile, CheckpointSigner
from server.audit.checkpointer import Checkpointer
from svid import AuditCheckpoint
from svid._clock import FakeClock
from tests.server.audit_setup import START, Setup, make_setup

CHECKPOINTS = 30


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    made = make_setup(tmp_path, FakeClock(START))
    made.checkpointer = Checkpointer.in_data_dir(
        made.log, made.data_dir, made.clock, interval=60.0, records=made.store
    )
    for _ in range(CHECKPOINTS):
        made.log.append("probe")
        made.checkpointer.checkpoint(force=True)
    return made


def oldest_from(setup: Setup, seq: int) -> AuditCheckpoint | None:
    return CheckpointFile(setup.checkpoints).oldest_signed_from(setup.checkpointer.key_id, seq)


def count_verifications(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = AuditCheckpoint.verify_signature

    def counted(self: AuditCheckpoint, key: object) -> None:
        calls.append(self.seq)
        real(self, key)  # type: ignore[arg-type]

    monkeypatch.setattr(AuditCheckpoint, "verify_signature", counted)
    return calls


def test_only_the_line_returned_is_verified(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_verifications(monkeypatch)
    found = oldest_from(setup, 3)
    assert found is not None
    assert found.seq == 3
    assert calls == [3], f"verified {len(calls)} lines for one"
    # And as the pruner asks, the datastore's stored record (the newest) checked too.
    pinned = setup.checkpointer.signed_from(3)
    assert pinned is not None
    assert pinned.seq == 3


def test_a_line_whose_signature_fails_is_passed_over(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oldest candidate's signature does not verify: the next one up is the pin."""
    lines = setup.checkpoints.read_text().splitlines()
    forged = json.loads(lines[2])  # seq 3
    forged["hash"] = "f" * 64
    lines[2] = json.dumps(forged, separators=(",", ":"), sort_keys=True)
    setup.checkpoints.write_text("\n".join(lines) + "\n")
    calls = count_verifications(monkeypatch)
    found = oldest_from(setup, 3)
    assert found is not None
    assert found.seq == 4
    assert calls == [3, 4]
    pinned = setup.checkpointer.signed_from(3)
    assert pinned is not None
    assert pinned.seq == 4


def test_the_pin_is_found_in_the_file_moved_aside(tmp_path: Path) -> None:
    """A file rotated after the target was signed starts with the checkpoint newest at the
    rotation: pinned there, every prune until the next rotation read back and hashed every
    event from its target on (up to the retention window, at every hourly prune)."""
    made = make_setup(tmp_path, FakeClock(START))
    signer = CheckpointSigner.load_or_create(made.data_dir)
    checkpoints = CheckpointFile(made.checkpoints, max_bytes=8000)
    made.checkpointer = Checkpointer(
        made.log, signer, checkpoints, made.clock, 60.0, records=made.store
    )
    for _ in range(CHECKPOINTS):
        made.log.append("probe")
        made.checkpointer.checkpoint(force=True)
    aside = [json.loads(line) for line in checkpoints.rotated.read_text().splitlines()]
    assert len(aside) > 4  # rotated at least once, with lines past the target
    target = aside[-3]["seq"]
    current = [json.loads(line)["seq"] for line in made.checkpoints.read_text().splitlines()]
    assert target not in current
    pinned = made.checkpointer.signed_from(target)
    assert pinned is not None
    assert pinned.seq == target
    assert pinned.hash == aside[-3]["hash"]
