"""Entry validation: every rule rejects with a message naming the field."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.datastore.errors import ConflictError
from server.datastore.records import Entry, Selector
from server.entitlement import EntryIndex
from server.errors import AlreadyExistsError, InvalidRequestError, NotFoundError
from server.ids import ServerIds
from server.registration import (
    MAX_DNS_NAMES,
    check_creates,
    check_deletes,
    check_updates,
    validate_entry,
)
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


def test_dns_names_up_to_the_limit_are_kept() -> None:
    names = tuple(f"n{i}.example.org" for i in range(MAX_DNS_NAMES))
    assert validate_entry(replace(GOOD, dns_names=names), IDS, INDEX).dns_names == names
    with pytest.raises(InvalidRequestError, match=f"dns_names: {MAX_DNS_NAMES + 1} names"):
        validate_entry(replace(GOOD, dns_names=(*names, "one-more.example.org")), IDS, INDEX)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        # What a SAN takes is ASCII: the refusal says which spelling of the same name it wants.
        ("b\u00fccher.example.org", "'xn--bcher-kva.example.org'"),
        ("web.example.org.", "'web.example.org'"),
    ],
)
def test_a_dns_name_refused_for_its_spelling_names_the_one_taken(name: str, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"dns_names: {name!r} .*{says}"):
        validate_entry(replace(GOOD, dns_names=(name,)), IDS, INDEX)
    taken = says.strip("'")
    assert validate_entry(replace(GOOD, dns_names=(taken,)), IDS, INDEX).dns_names == (taken,)


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


# -- batches: the same rules per item, each item seeing what the items before it did ----------


def test_check_creates_gives_one_result_per_item_in_order() -> None:
    node = replace(NODE, id="", spiffe_id="spiffe://example.org/nodes/b")
    child = replace(GOOD, parent_id="spiffe://example.org/nodes/b")
    results = check_creates(
        [
            child,  # its parent is created only later in the batch: refused
            node,
            child,  # now the parent is known
            replace(GOOD, spiffe_id=""),
            replace(GOOD, id="n1"),  # the stored node's id
            replace(GOOD, id="fresh"),
            replace(GOOD, id="fresh"),  # the same id twice in one batch
            replace(GOOD, id="bad id"),
        ],
        IDS,
        INDEX,
    )
    assert isinstance(results[0], InvalidRequestError)
    assert "unknown parent spiffe://example.org/nodes/b" in str(results[0])
    assert isinstance(results[1], Entry)
    assert isinstance(results[2], Entry)
    assert results[2].selectors == (Selector("unix", "uid:1000"),)  # normalised as one create
    assert isinstance(results[3], InvalidRequestError)
    assert "spiffe_id: required" in str(results[3])
    assert isinstance(results[4], AlreadyExistsError)
    assert "entry id n1 already exists" in str(results[4])
    assert isinstance(results[5], Entry)
    assert isinstance(results[6], AlreadyExistsError)
    assert isinstance(results[7], InvalidRequestError)
    assert "id: 'bad id'" in str(results[7])


def test_check_updates_sees_earlier_items_and_checks_revisions() -> None:
    child = Entry(
        id="c1",
        spiffe_id="spiffe://example.org/child",
        parent_id=NODE.spiffe_id,
        selectors=(Selector("unix", "uid:1"),),
        revision=3,
    )
    index = EntryIndex.build([replace(NODE, revision=1), child])
    renamed = replace(NODE, spiffe_id="spiffe://example.org/nodes/renamed", revision=0)
    results = check_updates(
        [
            replace(child, revision=2),  # stale revision
            renamed,  # the node moves away from the child's parent ID
            replace(child, hint="x", revision=0),  # its parent no longer exists
            replace(child, parent_id=renamed.spiffe_id, revision=3),
            # The revision the item before stores:
            replace(child, parent_id=renamed.spiffe_id, hint="again", revision=4),
            replace(child, id="nope"),
        ],
        IDS,
        index,
    )
    assert isinstance(results[0], ConflictError)
    assert "revision 3, update was based on 2" in str(results[0])
    assert isinstance(results[1], Entry)
    assert results[1].revision == 1
    assert isinstance(results[2], InvalidRequestError)
    assert "unknown parent" in str(results[2])
    assert isinstance(results[3], Entry)
    assert isinstance(results[4], Entry)
    assert results[4].revision == 4
    assert isinstance(results[5], NotFoundError)


def test_check_deletes_refuses_unknown_repeated_and_malformed_ids() -> None:
    results = check_deletes(["n1", "n1", "missing", ""], INDEX)
    assert results[0] == "n1"
    assert isinstance(results[1], NotFoundError)
    assert isinstance(results[2], NotFoundError)
    assert isinstance(results[3], InvalidRequestError)
