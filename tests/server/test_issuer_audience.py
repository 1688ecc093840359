"""The JWT audience check's fast path against the checks it stands in for."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.errors import InvalidRequestError
from server.issuance.issuer import _check_audience, _check_audience_values, _plain_audience

# Pieces that meet every check: commas, NUL, non-ASCII, and the starts of a JWT or PEM block.
_PIECES = st.sampled_from(
    ["a", "bench-1", ",", "\x00", "é", "eyJ", "eyJhbGciOi.eyJzdWIiOi.", "-----BEGIN ", "X-----"]
)
_VALUES = st.one_of(
    st.lists(_PIECES, max_size=6).map("".join),
    st.text(max_size=8),
    st.integers(1, 1100).map(lambda n: "x" * n),
)


def _refused(check: Callable[[list[str]], None], audience: list[str]) -> str | None:
    try:
        check(audience)
    except InvalidRequestError as exc:
        return str(exc)
    return None


@settings(max_examples=500, deadline=None)
@given(st.lists(_VALUES, max_size=34))
@example(["x" * 1024])
@example(["x" * 1024] * 4)
@example(["x" * 1024] * 4 + ["y"])
@example(["a"] * 32)
@example(["a"] * 33)
def test_the_fast_path_passes_only_what_every_check_passes(audience: list[str]) -> None:
    if _plain_audience(audience):
        assert _refused(_check_audience_values, audience) is None
    # Either way the outcome is the checks' own.
    assert _refused(_check_audience, audience) == _refused(_check_audience_values, audience)


@pytest.mark.parametrize("audience", [["bench-1"], ["https://api.example.com", "b"], ["a"] * 32])
def test_an_everyday_audience_takes_the_fast_path(audience: list[str]) -> None:
    assert _plain_audience(audience)


@pytest.mark.parametrize(
    ("audience", "message"),
    [
        (["café"], None),  # non-ASCII: checked one by one, and let through
        (["a,b"], r"audience\[0\]: holds a comma"),
        (["ok", "eyJhbGciOi.eyJzdWIiOi.x"], r"audience\[1\]: looks like a JWT"),
        (["a\x00"], r"audience\[0\]: may not contain NUL"),
        ([], "at least one non-empty audience"),
    ],
)
def test_what_the_fast_path_leaves_is_checked_one_by_one(
    audience: list[str], message: str | None
) -> None:
    assert not _plain_audience(audience)
    if message is None:
        _check_audience(audience)
    else:
        with pytest.raises(InvalidRequestError, match=message):
            _check_audience(audience)
