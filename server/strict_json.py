"""Another party's JSON document read one way only: an object naming a member twice is
refused. RFC 8259 leaves such a document's meaning to the reader (Python's json and Go's
encoding/json keep the last value, others the first or refuse it), so a bundle holding
{"use": "jwt-svid", "use": "x509-svid"}, or spiffe_sequence twice, is one thing here and
another to the party's other readers and to whoever reviewed it."""

from __future__ import annotations

import json
from typing import Any


class _TwiceError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, value in pairs:
        if name in found:
            raise _TwiceError(name)
        found[name] = value
    return found


def member_twice(document: bytes | str) -> str | None:
    """The first member name some object of `document` holds twice, or None: also when the
    document is no JSON at all, which the reader that follows reports in its own words."""
    try:
        json.loads(document, object_pairs_hook=_members)
    except _TwiceError as twice:
        return twice.name
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return None
