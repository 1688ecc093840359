"""Fuzz targets: SPIFFE ID and trust domain parsing, against the grammar of SPIFFE.md §5.

Property: for any text, SpiffeId.parse and TrustDomain.parse return a value or raise SpiffeIdError,
accept exactly what the grammar (written here as a regular expression) accepts, and what they
accept prints back as the same text.

Lone surrogates are in the text too: the parsers once raised UnicodeEncodeError for them.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from svid import SpiffeId, SpiffeIdError, TrustDomain
from tests.fuzz._mutate import mutated_text
from tests.fuzz._profile import fuzz_settings

_TD = r"[a-z0-9._-]+"
_SEGMENT = r"(?!\.\.?(?:/|$))[a-zA-Z0-9._-]+"
GRAMMAR = re.compile(rf"spiffe://(?P<td>{_TD})(?P<path>(?:/{_SEGMENT})*)")

SEEDS = [
    "spiffe://example.org",
    "spiffe://example.org/ns/default/sa/web",
    "spiffe://a.b-c_d/x/.y/..z/...",
    "spiffe://" + "t" * 255 + "/p",
    "spiffe://example.org/" + "/".join(["s" * 60] * 33),
]
_ALPHABET = "azAZ09._-/:%@?#=+ \t\n\u00e9\u0130\u212a\uff0e\x00s"
_TEXT = st.text(max_size=40)
ids = st.one_of(
    mutated_text(SEEDS, _ALPHABET, max_edits=4), _TEXT, st.text("spife:/.a", max_size=20)
)


def _grammar_accepts(text: str) -> bool:
    m = GRAMMAR.fullmatch(text)
    # A match is all ASCII, so characters are bytes.
    return m is not None and len(m["td"]) <= 255 and len(text) <= 2048


@fuzz_settings()
@given(ids)
def test_spiffe_id_parse_follows_the_grammar(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError:
        assert not _grammar_accepts(text), text
        return
    assert _grammar_accepts(text), text
    assert str(sid) == text
    assert SpiffeId.from_segments(sid.trust_domain, *sid.segments) == sid


@fuzz_settings()
@given(st.one_of(ids, ids.map(lambda t: t.removeprefix("spiffe://"))))
def test_trust_domain_parse_follows_the_grammar(text: str) -> None:
    try:
        td = TrustDomain.parse(text)
    except SpiffeIdError:
        accepted = False
    else:
        accepted = True
        assert td.name == text.removeprefix("spiffe://")
    bare = text.removeprefix("spiffe://") if text.startswith("spiffe://") else text
    expected = (
        re.fullmatch(_TD, bare) is not None
        and len(bare.encode()) <= 255
        and (text == bare or _grammar_accepts(text))
    )
    assert accepted == expected, text


@fuzz_settings()
@given(st.lists(_TEXT, max_size=4))
def test_from_segments(segments: list[str]) -> None:
    try:
        sid = SpiffeId.from_segments("example.org", *segments)
    except SpiffeIdError:
        return
    assert SpiffeId.parse(str(sid)) == sid
