"""Entry validation: every rule rejects with a message naming the field."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.datastore.records import Entry, Selector
from server.entitlement import EntryIndex
from server.errors import InvalidRequestError
from server.ids import ServerIds
from server.registration import validate_entry
from svid._spiffe_id import TrustDomain

IDS = ServerIds(TrustDomain("example.org"))
NODE = Entry(
    id="n1",
    spiffe_id="spiffe://example.org/nodes/a",
    parent_id="spiffe://example.org/svid/server",
    selectors=(Selector("x509pop", "subject:cn:a"),),
)
INDEX = EntryIndex.build([NODE])
GOOD = Entry(
    id="",
    spiffe_id="spiffe://example.org/web",
    parent_id="spiffe://example.org/svid/agent/join_token/t1",
    selectors=(Selector("unix", "uid:1000"), Selector("unix", "uid:1000")),
    dns_names=("Web.Example.org", "web.example.org"),
)


def test_good_entry_is_normalised() -> None:
    clean = validate_entry(GOOD, IDS, INDEX)
    assert clean.selectors == (Selector("unix", "uid:1000"),)
    assert clean.dns_names == ("web.example.org",)


@pytest.mark.parametrize(
    "parent",
    [
        "spiffe://example.org/svid/server",
        "spiffe://example.org/svid/agent/x509pop/abc",
        "spiffe://example.org/nodes/a",
    ],
)
def test_allowed_parents(parent: str) -> None:
    validate_entry(replace(GOOD, parent_id=parent), IDS, INDEX)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"spiffe_id": ""}, "spiffe_id: required"),
        ({"spiffe_id": "http://example.org/web"}, "spiffe_id: scheme"),
        ({"spiffe_id": "spiffe://example.org/a//b"}, "spiffe_id: path has an empty segment"),
        ({"spiffe_id": "spiffe://other.org/web"}, "spiffe_id: .* not in trust domain"),
        ({"spiffe_id": "spiffe://example.org"}, "spiffe_id: .* has no path"),
        ({"spiffe_id": "spiffe://example.org/svid/server"}, "spiffe_id: .* reserved"),
        ({"spiffe_id": "spiffe://example.org/svid/agent/x/y"}, "spiffe_id: .* reserved"),
        ({"parent_id": "spiffe://example.org/unknown"}, "parent_id: unknown parent"),
        ({"parent_id": "spiffe://other.org/svid/server"}, "parent_id: .* not in trust domain"),
        ({"parent_id": "not an id"}, "parent_id: scheme"),
        (
            {
                "parent_id": "spiffe://example.org/nodes/a",
                "spiffe_id": "spiffe://example.org/nodes/a",
            },
            "parent_id: an entry cannot be its own parent",
        ),
        ({"selectors": ()}, "selectors: at least one"),
        ({"selectors": (Selector("unix", ""),)}, "selectors: .*needs a type and a value"),
        ({"selectors": (Selector("un:ix", "a"),)}, "selectors: type"),
        ({"x509_svid_ttl": -1}, "x509_svid_ttl"),
        ({"jwt_svid_ttl": 2**31}, "jwt_svid_ttl"),
        ({"expires_at": -5}, "expires_at"),
        ({"hint": "h" * 1025}, "hint"),
        ({"dns_names": ("svid-server",)}, "dns_names: .*reserved"),
        ({"dns_names": ("SVID-Server",)}, "dns_names: .*reserved"),
        ({"dns_names": ("bad_name.example",)}, "dns_names: .*not a valid DNS name"),
        ({"dns_names": ("",)}, "dns_names"),
    ],
)
def test_bad_entries(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        validate_entry(replace(GOOD, **change), IDS, INDEX)  # type: ignore[arg-type]
