"""The tally of refusals left off the audit record, on a real server: one whose audit write
failed is not lost, the next tally counts it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest

from server.audit.event import EventDraft
from server.datastore.errors import StorageError
from server.datastore.records import EventFilter
from server.refusal_budget import UNRECORDED_KIND
from tests.server.fixtures import RunningServer, running_server

AGENT = "spiffe://example.org/agent/a"


@pytest.fixture
def server() -> Iterator[RunningServer]:
    # One task denial of an agent on the record, then hardly any more.
    yield from running_server(task_denial_burst_per_agent=1, task_denial_rate_per_agent=0.001)


def test_a_tally_whose_audit_write_failed_is_counted_by_the_next(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = server.server
    assert app.tasks is not None
    audit = app.tasks.audit
    denials = app.tasks.service._denials
    assert denials.on_record(AGENT)
    for _ in range(3):
        assert not denials.on_record(AGENT)

    def unreachable(drafts: Sequence[EventDraft]) -> None:
        raise StorageError("the datastore is unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(audit, "append_many", unreachable)
        with pytest.raises(StorageError):
            server.call(app._record_unrecorded())
    assert not denials.on_record(AGENT)  # one more, meanwhile
    server.call(app._record_unrecorded())

    [row] = audit.store.audit_rows(EventFilter(kind=UNRECORDED_KIND))
    extra = row["extra"] if isinstance(row["extra"], dict) else json.loads(row["extra"])
    assert extra["source"] == "task"
    assert extra["count"] == 4
    assert extra["top"] == [{"caller": AGENT, "count": 4}]
