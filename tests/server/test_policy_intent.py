"""Pure intent rules: sub-tasks only narrow, depth is capped, mints stay inside the intent."""

from __future__ import annotations

import pytest

from server.policy import Flag, Intent, RequestError, check_depth, check_in_intent, narrow

PARENT = Intent(
    actions=frozenset({"read", "write"}),
    resources=frozenset({"docs", "search"}),
    classification="confidential",
    environment="prod",
    on_behalf_of="alice",
    delegation_depth=0,
)


def child(**overrides: object) -> Intent:
    fields: dict[str, object] = {
        "actions": frozenset({"read"}),
        "resources": frozenset({"docs"}),
        "classification": "internal",
        "environment": "prod",
        "on_behalf_of": "alice",
        "delegation_depth": 1,
        "parent_task": "t-1",
    }
    fields.update(overrides)
    return Intent(**fields)  # type: ignore[arg-type]


def test_a_narrower_sub_task_is_accepted() -> None:
    v = narrow(PARENT, child())
    assert v.ok
    assert v.flag is None


def test_the_same_scope_is_not_a_widening() -> None:
    same = child(actions=PARENT.actions, resources=PARENT.resources, classification="confidential")
    assert narrow(PARENT, same).ok


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"actions": frozenset({"read", "export_data"})}, "adds actions export_data"),
        ({"resources": frozenset({"docs", "payroll"})}, "adds resources payroll"),
        ({"classification": "restricted"}, "more sensitive"),
        ({"environment": "staging"}, "environment"),
        ({"on_behalf_of": "mallory"}, "on behalf of"),
        ({"delegation_depth": 3}, "plus one"),
    ],
)
def test_any_widening_is_privilege_chaining(overrides: dict[str, object], needle: str) -> None:
    v = narrow(PARENT, child(**overrides))
    assert not v.ok
    assert v.flag is Flag.PRIVILEGE_CHAINING
    assert v.reason.startswith("privilege chaining: ")
    assert needle in v.reason


def test_depth_beyond_the_cap_is_refused_even_when_narrow() -> None:
    deep_parent = Intent(**{**PARENT.__dict__, "delegation_depth": 3})
    v = narrow(deep_parent, child(delegation_depth=4), max_depth=3)
    assert not v.ok
    assert "depth 4 exceeds the cap of 3" in v.reason
    assert check_depth(3, 3).ok
    assert not check_depth(4, 3).ok


def test_ttl_beyond_the_parent_is_clamped_not_refused() -> None:
    v = narrow(PARENT, child(), parent_remaining_ttl=120, requested_ttl=600)
    assert v.ok
    assert v.max_ttl == 120
    assert narrow(PARENT, child(), parent_remaining_ttl=120, requested_ttl=60).max_ttl is None


def test_sub_task_of_an_expired_parent_is_refused() -> None:
    v = narrow(PARENT, child(), parent_remaining_ttl=0, requested_ttl=60)
    assert not v.ok
    assert "expired" in v.reason


def test_mint_inside_intent_passes() -> None:
    assert check_in_intent(PARENT.actions, PARENT.resources, "read", "docs").ok
    assert check_in_intent(PARENT.actions, PARENT.resources, "read", ["docs", "search"]).ok


@pytest.mark.parametrize(
    ("action", "audience", "needle"),
    [
        ("read", "payroll", "audience payroll is not among"),
        ("read", ["docs", "payroll"], "audience payroll"),
        ("export_data", "docs", "action 'export_data' is not in the task's scope"),
        ("read", [], "no audience"),
    ],
)
def test_mint_outside_intent_is_lateral_movement(
    action: str, audience: str | list[str], needle: str
) -> None:
    v = check_in_intent(PARENT.actions, PARENT.resources, action, audience)
    assert not v.ok
    assert v.flag is Flag.LATERAL_MOVEMENT
    assert v.reason.startswith("lateral movement: ")
    assert needle in v.reason


@pytest.mark.parametrize(
    "overrides",
    [
        {"actions": frozenset()},
        {"resources": frozenset()},
        {"classification": "top-secret"},
        {"delegation_depth": -1},
        {"actions": frozenset({""})},
    ],
)
def test_malformed_intent_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(RequestError):
        child(**overrides)
