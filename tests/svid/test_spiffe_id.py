from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svid import SpiffeId, SpiffeIdError, TrustDomain

TD_255 = "a" * 251 + ".org"
TD_256 = "a" * 252 + ".org"


@pytest.mark.parametrize(
    ("text", "td", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/a", "example.org", "/a"),
        ("spiffe://example.org/a/b-c_d.e/F9", "example.org", "/a/b-c_d.e/F9"),
        ("spiffe://a_b-c.9", "a_b-c.9", ""),
        ("spiffe://example.org/...", "example.org", "/..."),
        ("spiffe://example.org/.a", "example.org", "/.a"),
        (f"spiffe://{TD_255}", TD_255, ""),
    ],
)
def test_valid_ids_parse(text: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == path
    assert str(sid) == text


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("", "empty"),
        ("http://example.org/a", "scheme"),
        ("SPIFFE://example.org/a", "scheme"),
        ("spiffe:/example.org", "scheme"),
        ("spiffe://", "trust domain is missing"),
        ("spiffe:///a", "trust domain is missing"),
        ("spiffe://Example.org", "trust domain character"),
        ("spiffe://user@example.org", "trust domain character"),
        ("spiffe://example.org:8080/a", "trust domain character"),
        ("spiffe://ex%41mple.org", "trust domain character"),
        ("spiffe://example.org/a b", "path character"),
        ("spiffe://example.org/a%20b", "path character"),
        ("spiffe://example.org/a?q=1", "path character"),
        ("spiffe://example.org/a#frag", "path character"),
        ("spiffe://example.org/./a", "dot segment"),
        ("spiffe://example.org/a/..", "dot segment"),
        ("spiffe://example.org//a", "empty segment"),
        ("spiffe://example.org/", "trailing slash"),
        ("spiffe://example.org/a/", "trailing slash"),
        (f"spiffe://{TD_256}", "too long"),
    ],
)
def test_invalid_ids_name_their_cause(text: str, cause: str) -> None:
    with pytest.raises(SpiffeIdError, match=cause):
        SpiffeId.parse(text)


def test_spiffe_id_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="scheme"):
        SpiffeId.parse("x")


def _id_of_size(n: int) -> str:
    prefix = "spiffe://example.org"
    # segments of 100 chars keep every segment legal
    rest = n - len(prefix)
    path = ""
    while rest > 0:
        seg = min(rest - 1, 100)
        if seg <= 0:
            # cannot end on a lone "/": widen the previous segment instead
            path = path + "b"
            rest -= 1
            continue
        path += "/" + "a" * seg
        rest -= seg + 1
    return prefix + path


def test_whole_id_limit_boundary() -> None:
    ok, too_long = _id_of_size(2048), _id_of_size(2049)
    assert len(ok) == 2048
    assert len(too_long) == 2049
    assert str(SpiffeId.parse(ok)) == ok
    with pytest.raises(SpiffeIdError, match="too long"):
        SpiffeId.parse(too_long)


def test_trust_domain_parse_accepts_both_forms() -> None:
    assert TrustDomain.parse("example.org") == TrustDomain.parse("spiffe://example.org")
    assert TrustDomain.parse("example.org").id == SpiffeId.parse("spiffe://example.org")
    with pytest.raises(SpiffeIdError, match="no path"):
        TrustDomain.parse("spiffe://example.org/a")
    with pytest.raises(SpiffeIdError, match="empty"):
        TrustDomain.parse("")


def test_from_segments_and_child() -> None:
    sid = SpiffeId.from_segments("example.org", "ns", "prod")
    assert str(sid) == "spiffe://example.org/ns/prod"
    assert str(sid.child("task", "t1")) == "spiffe://example.org/ns/prod/task/t1"
    assert sid.segments == ("ns", "prod")
    with pytest.raises(SpiffeIdError, match="may not contain"):
        SpiffeId.from_segments("example.org", "a/b")
    with pytest.raises(SpiffeIdError, match="dot segment"):
        SpiffeId.from_segments("example.org", "..")


def test_ids_are_hashable_values() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")
    assert {a, SpiffeId.parse("spiffe://example.org/a")} == {a}
    assert a.is_member_of(TrustDomain("example.org"))
    assert not a.is_member_of(TrustDomain("other.org"))


_td = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=60)
_seg = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_",
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))


@given(_td, st.lists(_seg, max_size=6))
def test_parse_format_round_trip(td: str, segments: list[str]) -> None:
    text = "spiffe://" + td + "".join("/" + s for s in segments)
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid
    assert SpiffeId.from_segments(td, *segments) == sid


@given(st.text(max_size=40))
def test_parse_never_raises_anything_but_spiffe_id_error(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(sid) == text


# -- several rules broken at once: the first one met reading left to right wins, as in go-spiffe
# (spiffeid.FromString: empty, scheme, then one pass over the trust domain and the path; a
# segment's empty/dot rule is met at the '/' that ends it, a bad character where it stands).

LONG = "a" * 3000


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("http://Example.org/./a", "scheme"),
        ("spiffe:/Example.org//", "scheme"),
        (f"http://{LONG}", "scheme"),
        ("spiffe:///./", "trust domain is missing"),
        ("spiffe://Example.org//a/", "trust domain character"),
        ("spiffe://exa%mple.org/./", "trust domain character"),
        (f"spiffe://A{LONG}", "trust domain character"),
        ("spiffe://exämple.org", "trust domain character"),
        (f"spiffe://{LONG}%/a", "trust domain is too long"),
        ("spiffe://example.org//a%/", "empty segment"),
        ("spiffe://example.org//./x", "empty segment"),
        ("spiffe://example.org/a%/", "path character"),
        ("spiffe://example.org/a b/./", "path character"),
        ("spiffe://example.org/é//", "path character"),
        (f"spiffe://example.org/a%/{LONG}", "path character"),
        ("spiffe://example.org/./", "dot segment"),
        ("spiffe://example.org/..//", "dot segment"),
        ("spiffe://example.org/./a%", "dot segment"),
        ("spiffe://example.org/a/.", "dot segment"),
        (f"spiffe://example.org/a//{LONG}", "empty segment"),
        (f"spiffe://example.org/{LONG}//./%", "SPIFFE ID is too long"),
    ],
)
def test_the_first_rule_broken_left_to_right_is_reported(text: str, cause: str) -> None:
    with pytest.raises(SpiffeIdError, match=cause):
        SpiffeId.parse(text)


def test_trust_domain_parse_reads_a_scheme_like_input_as_an_id() -> None:
    # go-spiffe treats anything with ":/" as an ID, so a one-slash typo names the scheme.
    with pytest.raises(SpiffeIdError, match="scheme"):
        TrustDomain.parse("spiffe:/example.org")


def test_built_ids_report_the_first_rule_broken_too() -> None:
    td = TrustDomain("example.org")
    with pytest.raises(SpiffeIdError, match="must start with '/'"):
        SpiffeId(td, "a//")
    with pytest.raises(SpiffeIdError, match="empty segment"):
        SpiffeId(td, "//a%/")
    with pytest.raises(SpiffeIdError, match="empty segment"):
        SpiffeId.from_segments(td, "", "a/b")
    with pytest.raises(SpiffeIdError, match="dot segment"):
        SpiffeId.from_segments(td, "..", "a%")
    with pytest.raises(SpiffeIdError, match="path character"):
        SpiffeId.from_segments(td, "a%", "")
    with pytest.raises(SpiffeIdError, match="may not contain '/'"):
        SpiffeId.from_segments(td, "a/b", "")


_GO_TD = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_GO_PATH = _GO_TD | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _go_spiffe_cause(text: str) -> str | None:
    """go-spiffe v2's spiffeid.FromString, re-done from its source as an oracle: the cause (in
    our words) of the first rule broken, or None for a valid ID."""
    if not text:
        return "empty"
    if not text.startswith("spiffe://"):
        return "scheme"
    i = len("spiffe://")
    while i < len(text) and text[i] != "/":
        if text[i] not in _GO_TD:
            return "trust domain character"
        i += 1
    if i == len("spiffe://"):
        return "trust domain is missing"
    path, start = text[i:], 0
    for end, ch in enumerate(path):
        if ch == "/":
            if path[start:end] == "/":
                return "empty segment"
            if path[start:end] in ("/.", "/.."):
                return "dot segment"
            start = end
        elif ch not in _GO_PATH:
            return "path character"
    if path and path[start:] == "/":
        return "trailing slash"
    if path[start:] in ("/.", "/.."):
        return "dot segment"
    return None


@settings(max_examples=1000)
@given(
    st.text(alphabet="/.aA%é", max_size=10).map(lambda t: "spiffe://" + t)
    | st.text(alphabet="sSpife:/.aA%", max_size=14)
)
def test_causes_match_go_spiffe(text: str) -> None:
    want = _go_spiffe_cause(text)
    if want is None:
        assert str(SpiffeId.parse(text)) == text
        return
    with pytest.raises(SpiffeIdError, match=want):
        SpiffeId.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "\ud800",
        "spiffe://a/\ud800",
        "spiffe://\ud800",
        "spiffe://" + "a" * 300 + "\ud800",
        "spiffe://a/" + "b" * 2100 + "\ud800",
    ],
)
def test_a_lone_surrogate_is_a_spiffe_id_error(text: str) -> None:
    # Found by fuzzing: measuring the UTF-8 size raised UnicodeEncodeError first.
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(text)
    with pytest.raises(SpiffeIdError):
        TrustDomain.parse(text)


def test_a_trust_domain_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(SpiffeIdError):
        TrustDomain("a\ud800")
    with pytest.raises(SpiffeIdError):
        TrustDomain("a" * 300 + "\ud800")
