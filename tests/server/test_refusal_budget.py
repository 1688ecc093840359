"""Which refusals go on the audit record, on a fake clock: each caller's first ones, then its
rate; the rest counted, and logged once per window."""

from __future__ import annotations

import logging

import pytest

from server.peer import address_key
from server.refusal_budget import RefusalBudget
from svid._clock import FakeClock


def _budget(clock: FakeClock, dropped: list[int], **kw: float) -> RefusalBudget:
    return RefusalBudget(
        "test",
        rate=kw.get("rate", 1.0),
        burst=int(kw.get("burst", 3)),
        clock=clock,
        dropped=lambda: dropped.append(1),
        window=kw.get("window", 60.0),
    )


def test_each_caller_has_its_first_refusals_on_record_then_its_rate() -> None:
    clock, dropped = FakeClock(), []
    budget = _budget(clock, dropped)
    assert [budget.on_record("a") for _ in range(5)] == [True, True, True, False, False]
    assert budget.on_record("b")  # another caller's budget is its own
    assert len(dropped) == 2
    clock.advance(1)
    assert budget.on_record("a")
    assert not budget.on_record("a")
    assert len(dropped) == 3


def test_a_rate_of_zero_records_every_refusal() -> None:
    dropped: list[int] = []
    budget = _budget(FakeClock(), dropped, rate=0, burst=1)
    assert all(budget.on_record("a") for _ in range(100))
    assert dropped == []


def test_dropped_refusals_are_logged_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    clock, dropped = FakeClock(), []
    budget = _budget(clock, dropped, rate=0.001, burst=1, window=60)
    with caplog.at_level(logging.WARNING, "svid.server.audit"):
        for _ in range(11):
            budget.on_record("10.0.0.9")
        assert len(caplog.records) == 1
        first = caplog.records[0]
        assert first.source == "test"  # type: ignore[attr-defined]
        assert first.caller == "10.0.0.9"  # type: ignore[attr-defined]
        assert first.dropped == 1  # type: ignore[attr-defined]
        clock.advance(59)
        budget.on_record("10.0.0.9")
        assert len(caplog.records) == 1
        clock.advance(1)
        budget.on_record("10.0.0.9")
    assert len(caplog.records) == 2
    assert caplog.records[1].dropped == 11  # type: ignore[attr-defined]  # every one since
    assert len(dropped) == 12


def _accepted_reports() -> RefusalBudget:
    return RefusalBudget(
        "validation_accepted",
        rate=0.001,
        burst=1,
        clock=FakeClock(),
        kind="reports of accepted tokens",
    )


def test_the_log_line_names_what_was_left_off(caplog: pytest.LogCaptureFixture) -> None:
    budget = _accepted_reports()
    with caplog.at_level(logging.WARNING, "svid.server.audit"):
        budget.on_record("a")
        budget.on_record("a")
    (line,) = caplog.records
    assert line.getMessage().startswith("reports of accepted tokens past their caller's budget")


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2::/64"),
        ("[2001:db8:1:3::1]", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("", ""),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
    ],
)
def test_a_client_is_known_by_its_address_an_ipv6_one_by_its_64(host: str, key: str) -> None:
    assert address_key(host) == key


def test_the_tally_counts_what_was_left_off_by_caller_and_starts_anew() -> None:
    clock, dropped = FakeClock(start=1000.0), []
    budget = _budget(clock, dropped, rate=0.001, burst=1)
    assert budget.take_unrecorded() is None  # nothing left off yet
    for key, times in (("a", 4), ("b", 2), ("c", 7)):
        for _ in range(times):
            budget.on_record(key)
    clock.advance(30)
    tally = budget.take_unrecorded()
    assert tally is not None
    assert (tally.source, tally.count, tally.callers) == ("test", 3 + 1 + 6, 3)
    assert tally.top == (("c", 6), ("a", 3), ("b", 1))  # the first of each was on record
    assert (tally.since, tally.until) == (1000.0, 1030.0)
    assert not tally.more_callers
    assert budget.take_unrecorded() is None  # taken: the next tally starts from nothing
    budget.on_record("a")
    again = budget.take_unrecorded()
    assert again is not None
    assert (again.count, again.top) == (1, (("a", 1),))
    assert len(dropped) == 11  # the metric counts every one, tallied or not


def test_the_tally_holds_a_bounded_number_of_callers_and_counts_the_rest() -> None:
    from server.refusal_budget import MAX_TALLIED_CALLERS, TOP_CALLERS

    budget = _budget(FakeClock(), [], rate=0.001, burst=1)
    callers = MAX_TALLIED_CALLERS + 50
    for i in range(callers):
        budget.on_record(f"10.0.{i // 256}.{i % 256}")
        budget.on_record(f"10.0.{i // 256}.{i % 256}")
    tally = budget.take_unrecorded()
    assert tally is not None
    assert tally.count == callers  # every caller's second refusal, named or not
    assert tally.callers == MAX_TALLIED_CALLERS
    assert tally.more_callers
    assert len(tally.top) == TOP_CALLERS


def test_the_tally_event_names_the_source_and_counts_never_a_request() -> None:
    budget = _accepted_reports()
    for _ in range(3):
        budget.on_record("spiffe://example.org/svid/agent/join_token/x")
    tally = budget.take_unrecorded()
    assert tally is not None
    draft = tally.draft()
    assert draft.kind == "refusals_unrecorded"
    assert draft.decision == "not_recorded"
    assert draft.reason is not None
    assert draft.reason.startswith("reports of accepted tokens")
    assert draft.extra["source"] == "validation_accepted"
    assert draft.extra["count"] == 2
    assert draft.extra["top"] == [
        {"caller": "spiffe://example.org/svid/agent/join_token/x", "count": 2}
    ]
