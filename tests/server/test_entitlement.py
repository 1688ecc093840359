"""Which entries an agent may serve: its own children plus node-alias children."""

from __future__ import annotations

from server.datastore.records import Entry, Selector
from server.entitlement import EntryIndex, entitled_entries, entitled_entry, node_aliases

TD = "spiffe://example.org"
SERVER = f"{TD}/svid/server"
AGENT = f"{TD}/svid/agent/join_token/a1"
OTHER = f"{TD}/svid/agent/join_token/a2"
NOW = 1_700_000_000


def _entry(eid: str, spiffe_id: str, parent: str, *selectors: str, expires_at: int = 0) -> Entry:
    return Entry(
        id=eid,
        spiffe_id=f"{TD}{spiffe_id}",
        parent_id=parent,
        selectors=tuple(Selector.parse(s) for s in selectors) or (Selector("unix", "uid:1"),),
        expires_at=expires_at,
    )


ENTRIES = [
    _entry("e1", "/web", AGENT),
    _entry("e2", "/db", OTHER),
    _entry("alias", "/nodes/rack1", SERVER, "x509pop:subject:cn:node1"),
    _entry("alias2", "/nodes/strict", SERVER, "x509pop:subject:cn:node1", "x509pop:ca:fp:x"),
    _entry("e3", "/cache", f"{TD}/nodes/rack1"),
    _entry("e4", "/secret", f"{TD}/nodes/strict"),
    _entry("old", "/old", AGENT, expires_at=NOW - 1),
    _entry("later", "/later", AGENT, expires_at=NOW + 1),
]
INDEX = EntryIndex.build(ENTRIES)


def _ids(entries: tuple[Entry, ...]) -> set[str]:
    return {e.id for e in entries}


def test_own_children_only_without_selectors() -> None:
    assert _ids(entitled_entries(INDEX, AGENT, (), SERVER, NOW)) == {"e1", "later"}
    assert _ids(entitled_entries(INDEX, OTHER, (), SERVER, NOW)) == {"e2"}


def test_alias_children_need_every_alias_selector() -> None:
    one = (Selector.parse("x509pop:subject:cn:node1"),)
    assert _ids(entitled_entries(INDEX, OTHER, one, SERVER, NOW)) == {"e2", "e3"}
    both = (*one, Selector.parse("x509pop:ca:fp:x"))
    assert _ids(entitled_entries(INDEX, OTHER, both, SERVER, NOW)) == {"e2", "e3", "e4"}
    assert _ids(node_aliases(INDEX, SERVER, both, NOW)) == {"alias", "alias2"}


def test_expired_entries_and_aliases_are_excluded() -> None:
    assert "old" not in _ids(entitled_entries(INDEX, AGENT, (), SERVER, NOW))
    assert "later" not in _ids(entitled_entries(INDEX, AGENT, (), SERVER, NOW + 1))
    expired_alias = EntryIndex.build(
        [
            _entry("a", "/n", SERVER, "x:y", expires_at=NOW),
            _entry("c", "/child", f"{TD}/n"),
        ]
    )
    assert entitled_entries(expired_alias, OTHER, (Selector("x", "y"),), SERVER, NOW) == ()


def test_index_updates_are_copies() -> None:
    extra = _entry("e9", "/new", AGENT)
    bigger = INDEX.with_entry(extra)
    assert "e9" in bigger.by_id
    assert "e9" not in INDEX.by_id
    assert "e9" not in bigger.without("e9").by_id
    assert f"{TD}/new" in bigger.spiffe_ids()


def test_entitled_entry_is_the_first_entitled_entry_with_that_id() -> None:
    """The indexed lookup (beginning a task) against the full entitlement as the oracle, with
    few and with many entries carrying the ID (each side of the lookup's choice)."""
    twins = [
        _entry("f-twin", "/web", AGENT),  # sorts after e1: e1 is the one served
        _entry("a-old", "/web", AGENT, expires_at=NOW - 1),  # lowest id, but expired
        _entry("e0", "/cache", OTHER),  # the same ID under another agent
    ]
    few = INDEX.with_changes(twins)
    # The ID given on a dozen other nodes: more entries carry it than any agent here holds.
    many = few.with_changes(_entry(f"w{n}", "/web", f"{AGENT}-{n}") for n in range(12))
    alias = (Selector.parse("x509pop:subject:cn:node1"), Selector.parse("x509pop:ca:fp:x"))
    for index in (few, many):
        for agent, selectors in ((AGENT, ()), (OTHER, ()), (OTHER, alias[:1]), (OTHER, alias)):
            for at in (NOW - 2, NOW, NOW + 1):
                entitled = entitled_entries(index, agent, selectors, SERVER, at)
                for path in ("/web", "/db", "/cache", "/secret", "/later", "/old", "/none"):
                    spiffe_id = f"{TD}{path}"
                    first = next((e for e in entitled if e.spiffe_id == spiffe_id), None)
                    found = entitled_entry(index, agent, selectors, SERVER, at, spiffe_id=spiffe_id)
                    assert found == first, (agent, selectors, at, path)
        assert entitled_entry(index, AGENT, (), SERVER, NOW, spiffe_id=f"{TD}/web") == ENTRIES[0]
        cache = entitled_entry(index, OTHER, alias, SERVER, NOW, spiffe_id=f"{TD}/cache")
        assert cache == twins[2]
