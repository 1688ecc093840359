"""Another party's JSON document read one way only: an object naming a member twice is
refused. RFC 8259 leaves such a document's meaning to the reader (Python's json and Go's
encoding/json keep the last value, others the first or refuse it), so a bundle holding
{"use": "jwt-svid", "use": "x509-svid"}, or spiffe_sequence twice, is one thing here and
another to the party's other readers and to whoever reviewed it.

Names are compared as read (escapes undone: "\\u0075se" is "use") and regardless of letter
case: Go's encoding/json, which go-spiffe reads a bundle's top level with, matches a member
to its field ignoring case, so {"keys": [A], "KEYS": [B]} is B's keys to a SPIRE server and
A's here. Members an honest document holds (JWK, SPIFFE bundle, OIDC discovery) are
lowercase names that differ in more than case."""

from __future__ import annotations

import json
from typing import Any


class MemberTwiceError(Exception):
    """An object of the document names a member twice; `said` says which ("names 'use'
    twice"). Not a ValueError: a caller telling it from a document that is no JSON."""

    def __init__(self, said: str) -> None:
        super().__init__(said)
        self.said = said


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    folded: dict[str, str] = {}  # casefold covers what Go folds too (the Kelvin sign as k)
    for name, value in pairs:
        if name in found:
            raise MemberTwiceError(f"names {name[:100]!r} twice")
        earlier = folded.setdefault(name.casefold(), name)
        if earlier != name:
            raise MemberTwiceError(
                f"names {earlier[:100]!r} and {name[:100]!r}, one member to a reader "
                "ignoring letter case (Go's encoding/json)"
            )
        found[name] = value
    return found


def loads(document: bytes | str) -> Any:
    """`document` parsed as json.loads parses it, once; MemberTwiceError when some object in
    it names a member twice, json.loads' own errors when it is no JSON."""
    return json.loads(document, object_pairs_hook=_members)


def member_twice(document: bytes | str) -> str | None:
    """What names a member twice in some object of `document` ("names 'use' twice"), or
    None: also when the document is no JSON at all, which the reader that follows reports
    in its own words."""
    try:
        loads(document)
    except MemberTwiceError as twice:
        return twice.said
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return None
