"""The per-key counter the connection and stream caps share."""

from __future__ import annotations

import pytest

from svid._key_counts import KeyCounts


def test_counts_per_key_and_in_all_and_forgets_keys_holding_none() -> None:
    counts: KeyCounts[str] = KeyCounts("open stream")
    for key in ("a", "a", "b"):
        counts.add(key)
    assert (counts.held_by("a"), counts.held_by("b"), counts.total) == (2, 1, 3)
    counts.remove("b")
    counts.remove("a")
    assert (counts.held_by("a"), counts.held_by("b"), counts.total) == (1, 0, 1)
    assert counts._held == {"a": 1}  # a key holding none takes no room


def test_a_release_of_what_a_key_does_not_hold_is_an_error_naming_it() -> None:
    counts: KeyCounts[int] = KeyCounts("open stream")
    with pytest.raises(ValueError, match="1000 holds no open stream"):
        counts.remove(1000)
    assert counts.total == 0
