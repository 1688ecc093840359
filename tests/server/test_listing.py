"""Paging and filter rules as pure functions: where a page ends, what a token carries."""

from __future__ import annotations

import pytest

from server.datastore.records import Selector
from server.errors import InvalidRequestError
from server.listing import (
    MAX_PAGE_BYTES,
    SelectorFilter,
    decode_token,
    encode_token,
    page_size,
    paginate,
    spiffe_id_prefix,
    under_prefix,
)
from svid._proto import admin_pb2, common_pb2

KEYS = [f"k{n:02d}" for n in range(10)]


def _page(
    after: str, limit: int, keep: set[str] | None = None, hint: int = 0
) -> tuple[list[str], str]:
    page, last = paginate(
        KEYS,
        after,
        limit,
        load=lambda k: k,
        keep=lambda k: keep is None or k in keep,
        encode=lambda k: common_pb2.Entry(id=k, hint="x" * hint),
    )
    return [m.id for m in page], last


def test_a_page_ends_at_the_limit_and_the_last_one_has_no_token() -> None:
    assert _page("", 4) == (KEYS[:4], "k03")
    assert _page("k03", 4) == (KEYS[4:8], "k07")
    assert _page("k07", 4) == (KEYS[8:], "")


def test_no_token_when_nothing_after_the_page_passes_the_filter() -> None:
    assert _page("", 2, keep={"k01", "k05"}) == (["k01", "k05"], "")
    assert _page("", 1, keep={"k01", "k05"}) == (["k01"], "k01")


def test_a_cursor_key_that_is_gone_still_resumes_after_it() -> None:
    assert _page("k035", 2) == (["k04", "k05"], "k05")


def test_a_page_ends_early_on_bytes_but_never_empty() -> None:
    big = MAX_PAGE_BYTES // 3
    ids, last = _page("", 100, hint=big)
    assert ids == KEYS[:2]
    assert last == "k01"
    ids, _ = _page("", 100, hint=MAX_PAGE_BYTES * 2)
    assert ids == ["k00"]  # one item larger than a page still travels alone


def test_tokens_are_bound_to_their_query() -> None:
    token = encode_token("k03", ["entries", "a"])
    assert decode_token(token, ["entries", "a"]) == "k03"
    assert decode_token("", ["entries", "b"]) == ""
    with pytest.raises(InvalidRequestError, match="different filters"):
        decode_token(token, ["entries", "b"])
    with pytest.raises(InvalidRequestError, match="not a token this server issued"):
        decode_token(token[:-3], ["entries", "a"])


@pytest.mark.parametrize(("size", "expected"), [(0, 500), (1, 1), (5000, 5000)])
def test_page_size(size: int, expected: int) -> None:
    assert page_size(size) == expected


@pytest.mark.parametrize("size", [-1, 5001])
def test_page_size_out_of_range(size: int) -> None:
    with pytest.raises(InvalidRequestError, match=f"page_size: {size} is out of range"):
        page_size(size)


def test_prefix_is_by_path_segment() -> None:
    prefix = spiffe_id_prefix("spiffe://td/a/")
    assert prefix == "spiffe://td/a"
    assert under_prefix("spiffe://td/a", prefix)
    assert under_prefix("spiffe://td/a/b", prefix)
    assert not under_prefix("spiffe://td/ab", prefix)
    assert not under_prefix("spiffe://td", prefix)
    assert under_prefix("spiffe://td/x", spiffe_id_prefix("spiffe://td"))
    assert not under_prefix("spiffe://tdx/x", spiffe_id_prefix("spiffe://td"))
    with pytest.raises(InvalidRequestError, match="spiffe_id_prefix:"):
        spiffe_id_prefix("https://td/a")


def test_selector_match_modes() -> None:
    a, b, c = Selector("u", "1"), Selector("g", "2"), Selector("u", "3")
    every = SelectorFilter.of([a, b], admin_pb2.SELECTOR_MATCH_ALL)
    exact = SelectorFilter.of([a, b], admin_pb2.SELECTOR_MATCH_EXACT)
    some = SelectorFilter.of([a, b], admin_pb2.SELECTOR_MATCH_ANY)
    assert every.matches([a, b, c])
    assert not every.matches([a])
    assert exact.matches([b, a])
    assert not exact.matches([a, b, c])
    assert some.matches([c, b])
    assert not some.matches([c])
    assert SelectorFilter.of([], admin_pb2.SELECTOR_MATCH_EXACT).matches([c])
    with pytest.raises(InvalidRequestError, match="selector_match: unknown value 9"):
        SelectorFilter.of([a], 9)
