"""Which roots the agent attests with once its saved bundle failed to verify the server."""

from __future__ import annotations

from agent_attestor.sync import rebootstrap_roots

SAVED, GIVEN = b"saved roots PEM", b"operator's roots PEM"


def test_the_operators_bundle_stands_in_for_a_saved_bundle_that_failed() -> None:
    assert rebootstrap_roots(SAVED, GIVEN, given_by_operator=True) == GIVEN


def test_roots_fetched_unverified_never_stand_in() -> None:
    # insecure_bootstrap: what the server presented is no reason to trust the server.
    assert rebootstrap_roots(SAVED, GIVEN, given_by_operator=False) is None


def test_nothing_stands_in_without_a_bundle_or_when_the_bundle_itself_failed() -> None:
    assert rebootstrap_roots(SAVED, b"", given_by_operator=True) is None
    assert rebootstrap_roots(GIVEN, GIVEN, given_by_operator=True) is None
