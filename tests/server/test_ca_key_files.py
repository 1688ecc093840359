"""The CA's key files against the datastore's journal of them, across restarts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests.server.fixtures import RunningServer, bundle_pem, short_tmpdir, start_server


def _started(root: Path, **overrides: Any) -> RunningServer | None:
    try:
        return start_server(root, **overrides)
    except Exception:  # refused to start: what the test wants of a wrong data_dir
        return None


def test_a_server_started_with_another_data_dir_on_the_same_datastore_keeps_the_ca() -> None:
    """The datastore journals the trust domain's CA; its key files are in data_dir/keys. A
    server given the right datastore and a wrong (empty) data_dir must refuse to start
    rather than drop the journal's slots and make a new CA: that replaced the trust
    domain's root, and the next start with the right data_dir deleted the old key files as
    orphans, so the CA every agent trusts is gone for good."""
    home, wrong = short_tmpdir(), short_tmpdir()
    store = home / "datastore.sqlite3"
    try:
        first = start_server(home, datastore=str(store))
        roots = bundle_pem(first.bundle())
        first.stop()
        keys = home / "data" / "keys"
        key_files = {p.name for p in keys.glob("*.pem")}
        mistaken = _started(wrong, datastore=str(store))
        if mistaken is not None:
            mistaken.stop()
        again = start_server(home, datastore=str(store))
        try:
            seen = {
                "refused with the wrong data_dir": mistaken is None,
                "the CA kept": bundle_pem(again.bundle()) == roots,
                "its key files kept": key_files <= {p.name for p in keys.glob("*.pem")},
            }
        finally:
            again.stop()
        assert seen == dict.fromkeys(seen, True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(wrong, ignore_errors=True)
