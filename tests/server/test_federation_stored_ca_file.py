"""A relationship stored with a relative ca_file (by a server from before the admin API refused
one: it read the file from its own working directory at each fetch) is read, after the upgrade,
as the absolute path of that same file: kept relative, `federation update` of any of its other
fields was refused ("ca_file must be an absolute path"), the CLI sending back what it got."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from server.audit.log import AuditLog
from server.datastore.records import FederationRelationship
from server.datastore.sqlite import SqliteDataStore
from server.federation.service import FederationService
from svid._bundle import SpiffeBundle
from svid._clock import FakeClock
from svid._spiffe_id import TrustDomain

OWN = TrustDomain("example.org")


def _no_fetch(rel: FederationRelationship, known: SpiffeBundle | None) -> SpiffeBundle:
    raise AssertionError("no fetch runs in this test")


def test_a_stored_relative_ca_file_is_read_absolute_and_the_relationship_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    clock = FakeClock(1_700_000_000)
    store = SqliteDataStore(tmp_path / "db", clock)
    old = FederationRelationship(
        "partner.org", "https://127.0.0.1:1/", "https_web", ca_file="certs/ca.pem"
    )
    store.create_relationship(old)  # as a server from before wrote it
    published: list[Mapping[str, SpiffeBundle]] = []
    service = FederationService(
        own=OWN,
        datastore=store,
        audit=AuditLog(store, clock),
        clock=clock,
        publish=published.append,
        fetch=_no_fetch,
    )
    try:
        service.load()
        rel, _ = service.relationship("partner.org")
        # The file each fetch read: the server's working directory's.
        assert rel.ca_file == str(tmp_path / "certs" / "ca.pem")
        due = service.next_fetch("partner.org")
        # Another server's store read the same way: nothing differs, nothing is rescheduled.
        assert not service.apply_stored(service.read_stored(), service.follow_mark())
        assert service.next_fetch("partner.org") == due
        # What `federation update --bundle-endpoint-url` sends: the relationship as shown.
        changed = asyncio.run(service.update(replace(rel, endpoint_url="https://127.0.0.1:2/")))
        assert changed.ca_file == str(tmp_path / "certs" / "ca.pem")
        assert store.get_relationship("partner.org").ca_file == str(tmp_path / "certs" / "ca.pem")
    finally:
        service.close()
        store.close()
