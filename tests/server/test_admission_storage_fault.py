"""An agent's admission whose record the datastore refuses to save (a disk I/O error, a disk full)
after its allowed attestation is on the audit log: the node is refused, its join token still
works, and the log says the admission did not take."""

from __future__ import annotations

import sqlite3
from typing import Any

import grpc
import pytest

from tests.server.fixtures import managed_server


def test_an_admission_the_disk_refuses_to_save_is_denied_on_the_log_after_its_allow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with managed_server() as running:
        store = running.server.datastore
        token = running.join_token()
        real_admit = store.admit_agent
        failed: list[str] = []

        def disk_fails_once(*args: Any, **kwargs: Any) -> bool:
            if not failed:
                failed.append(args[0].spiffe_id)
                # What SQLite raises when the write of the agent's row hits a bad disk.
                raise sqlite3.OperationalError("disk I/O error")
            return bool(real_admit(*args, **kwargs))

        monkeypatch.setattr(store, "admit_agent", disk_fails_once)
        with pytest.raises(grpc.RpcError) as refused:
            running.attest(token)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        (agent_id,) = failed
        said = [
            (r["decision"], r["credential_id"])
            for r in store.audit_rows()
            if r["kind"] == "node_attestation" and r["agent_id"] == agent_id
        ]
        assert said, f"no node_attestation event of {agent_id}"
        assert said[0][0] == "allow"
        # The allow went on the log before the save failed: a deny of the same serial must
        # follow it, or the log says the node was admitted with an SVID that never left.
        assert said[-1] == ("deny", said[0][1]), f"the log says {said} of a refused admission"
        # Nothing was spent: the node attests with the same token once the disk takes writes.
        assert running.attest(token).spiffe_id == agent_id
