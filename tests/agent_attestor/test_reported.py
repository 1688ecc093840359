"""The agent's memory of the successful validations it reported: per token, until it expires,
and bounded."""

from __future__ import annotations

from agent_attestor.tasks.reported import ReportedValidations, report_key
from svid._clock import FakeClock

SUB = "spiffe://example.org/w"


def test_a_validation_is_first_once_until_its_token_expires() -> None:
    clock = FakeClock(1000)
    memory = ReportedValidations(clock)
    key = report_key(SUB, ["svc"], "j1", "", "spiffe://example.org/caller")
    assert memory.first(key, 1060)
    assert not memory.first(key, 1060)
    clock.set(1060)
    assert not memory.first(key, 1060)
    clock.advance(1)
    assert memory.first(key, 1120)  # a token of the same claims, later: reported again
    assert not memory.first(key, 1120)


def test_each_field_a_report_carries_tells_validations_apart() -> None:
    memory = ReportedValidations(FakeClock(1000))
    fields = [
        (SUB, ["svc"], "j1", "", "c"),
        (SUB + "2", ["svc"], "j1", "", "c"),
        (SUB, ["db"], "j1", "", "c"),
        (SUB, ["svc"], "j2", "", "c"),
        (SUB, ["svc"], "j1", "t1", "c"),
        (SUB, ["svc"], "j1", "", "c2"),
        # Fields joined by a separator would make these two the same.
        (SUB, ["svc"], "j1|", "", "c"),
        (SUB, ["svc"], "j1", "|", "c"),
    ]
    assert all(memory.first(report_key(*f), 2000) for f in fields)
    assert not any(memory.first(report_key(*f), 2000) for f in fields)


def test_a_token_already_expired_is_not_remembered() -> None:
    memory = ReportedValidations(FakeClock(1000))
    key = report_key(SUB, ["svc"], "j1", "", "")
    assert memory.first(key, 999)
    assert memory.first(key, 999)
    assert len(memory) == 0


def test_a_full_memory_forgets_what_expired_then_its_oldest() -> None:
    clock = FakeClock(1000)
    memory = ReportedValidations(clock, max_size=16)
    keys = [report_key(SUB, ["svc"], f"j{i}", "", "") for i in range(40)]
    for key in keys[:8]:
        memory.first(key, 1010)
    for key in keys[8:16]:
        memory.first(key, 2000)
    clock.advance(20)  # the first eight expired
    for key in keys[16:24]:
        assert memory.first(key, 2000)
    assert len(memory) == 16
    assert not any(memory.first(k, 2000) for k in keys[8:24])
    # Full of live entries: the oldest go (reported again if seen again), never the new one.
    assert memory.first(keys[24], 2000)
    assert len(memory) <= 16
    assert not memory.first(keys[24], 2000)
    assert memory.first(keys[8], 2000)
    for key in keys[25:40]:
        memory.first(key, 2000)
    assert len(memory) <= 16
