"""Every admin list call pages (keyset tokens bound to their filters, byte-bounded pages) and
filters by parent, SPIFFE ID, path-segment prefix and selectors."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from server import listing
from server.listing import MAX_PAGE_BYTES
from svid._proto import admin_pb2, common_pb2
from tests.server.fixtures import TRUST_DOMAIN, RunningServer, running_server

TD = f"spiffe://{TRUST_DOMAIN}"


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def _agent(name: str) -> str:
    return f"{TD}/svid/agent/join_token/{name}"


def _sel(text: str) -> common_pb2.Selector:
    kind, _, value = text.partition(":")
    return common_pb2.Selector(type=kind, value=value)


def _create(srv: RunningServer, parent: str, paths: list[str], *selectors: str) -> list[str]:
    entries = [
        common_pb2.Entry(
            spiffe_id=f"{TD}{path}",
            parent_id=parent,
            selectors=[_sel(s) for s in (selectors or ("unix:uid:1",))],
        )
        for path in paths
    ]
    results = (
        srv.admin()
        .BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=entries), timeout=30)
        .results
    )
    assert [r.status.message for r in results if r.status.code] == []
    return [r.id for r in results]


def _pages(
    srv: RunningServer,
    between: Callable[[int], None] | None = None,
    **query: object,
) -> list[list[str]]:
    """The ids of every page, following tokens; `between(n)` runs after page n."""
    admin = srv.admin()
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = admin.ListEntries(admin_pb2.ListEntriesRequest(page_token=token, **query))  # type: ignore[arg-type]
        pages.append([e.id for e in reply.entries])
        token = reply.next_page_token
        if not token:
            return pages
        if between is not None:
            between(len(pages))


def _invalid(call: Callable[[], object], message: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert message in exc.value.details()  # type: ignore[attr-defined]


def test_entries_page_in_id_order_until_an_empty_token(srv: RunningServer) -> None:
    parent = _agent("p1")
    ids = _create(srv, parent, [f"/p1/{n}" for n in range(25)])
    pages = _pages(srv, parent_id=parent, page_size=10)
    assert [len(p) for p in pages] == [10, 10, 5]
    flat = [i for p in pages for i in p]
    assert flat == sorted(ids)
    assert flat == ids  # server-assigned ids sort in creation order


def test_a_page_size_that_divides_the_total_leaves_no_empty_last_page(srv: RunningServer) -> None:
    parent = _agent("p2")
    _create(srv, parent, [f"/p2/{n}" for n in range(20)])
    assert [len(p) for p in _pages(srv, parent_id=parent, page_size=10)] == [10, 10]


def test_paging_while_others_write_neither_repeats_nor_skips(srv: RunningServer) -> None:
    parent = _agent("p3")
    first = _create(srv, parent, [f"/p3/{n}" for n in range(25)])
    added: list[str] = []

    def write(page: int) -> None:
        if page == 1:
            added.extend(_create(srv, parent, [f"/p3/new/{n}" for n in range(5)]))
            # The cursor's own entry and one not yet served go away meanwhile.
            gone = admin_pb2.BatchDeleteEntryRequest(ids=[first[9], first[20]])
            srv.admin().BatchDeleteEntry(gone)

    flat = [i for p in _pages(srv, write, parent_id=parent, page_size=10) for i in p]
    assert len(flat) == len(set(flat))
    assert flat == [i for i in first if i != first[20]] + added


def test_spiffe_id_prefix_is_path_segment_aware(srv: RunningServer) -> None:
    parent = _agent("p4")
    a, a_b, ab, a_b_c = _create(srv, parent, ["/p4/a", "/p4/a/b", "/p4/ab", "/p4/a/b/c"])
    for prefix, expected in [
        (f"{TD}/p4/a", [a, a_b, a_b_c]),
        (f"{TD}/p4/a/", [a, a_b, a_b_c]),
        (f"{TD}/p4/a/b", [a_b, a_b_c]),
        (f"{TD}/p4/ab", [ab]),
        (f"{TD}/p4", [a, a_b, ab, a_b_c]),
        (f"{TD}/p4/a/b/c/d", []),
    ]:
        pages = _pages(srv, parent_id=parent, spiffe_id_prefix=prefix, page_size=1)
        assert [i for p in pages for i in p] == expected, prefix
    everything = _pages(srv, spiffe_id_prefix=TD, page_size=5000)
    assert {a, a_b, ab, a_b_c} <= {i for p in everything for i in p}
    assert _pages(srv, spiffe_id_prefix="spiffe://other.org", page_size=5000) == [[]]


def test_selector_filters_all_exact_any(srv: RunningServer) -> None:
    parent = _agent("p5")
    (one,) = _create(srv, parent, ["/p5/one"], "unix:uid:1")
    (both,) = _create(srv, parent, ["/p5/both"], "unix:uid:1", "unix:gid:2")
    (other,) = _create(srv, parent, ["/p5/other"], "unix:gid:2")
    for selectors, match, expected in [
        (["unix:uid:1"], admin_pb2.SELECTOR_MATCH_ALL, [one, both]),
        (["unix:uid:1", "unix:gid:2"], admin_pb2.SELECTOR_MATCH_ALL, [both]),
        (["unix:uid:1"], admin_pb2.SELECTOR_MATCH_EXACT, [one]),
        (["unix:gid:2", "unix:uid:1"], admin_pb2.SELECTOR_MATCH_EXACT, [both]),
        (["unix:uid:1", "unix:gid:2"], admin_pb2.SELECTOR_MATCH_ANY, [one, both, other]),
        (["unix:uid:9"], admin_pb2.SELECTOR_MATCH_ANY, []),
        (["unix:uid"], admin_pb2.SELECTOR_MATCH_ALL, []),  # exact values, not prefixes
    ]:
        pages = _pages(
            srv,
            parent_id=parent,
            selectors=[_sel(s) for s in selectors],
            selector_match=match,
            page_size=1,
        )
        assert [i for p in pages for i in p] == expected, (selectors, match)


def test_exact_spiffe_id_filter(srv: RunningServer) -> None:
    parent = _agent("p6")
    a, _ = _create(srv, parent, ["/p6/a", "/p6/a/b"])
    assert _pages(srv, spiffe_id=f"{TD}/p6/a") == [[a]]


def test_exact_spiffe_id_and_parent_together_page_through_either_group(srv: RunningServer) -> None:
    # Two entries share a SPIFFE ID under two parents: the smaller index group is walked and
    # the other filter still applies.
    a, b = _agent("both-a"), _agent("both-b")
    (first,) = _create(srv, a, ["/both/same"])
    (second,) = _create(srv, b, ["/both/same"])
    _create(srv, a, [f"/both/other{n}" for n in range(5)])
    same = f"{TD}/both/same"
    assert _pages(srv, spiffe_id=same) == [sorted([first, second])]
    assert _pages(srv, spiffe_id=same, parent_id=a) == [[first]]
    assert _pages(srv, spiffe_id=same, parent_id=b, page_size=1) == [[second]]
    assert _pages(srv, spiffe_id=f"{TD}/both/none", parent_id=a) == [[]]


def test_a_filtered_listing_walks_the_entries_off_the_event_loop(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A prefix or selector filter may test every entry before a page fills: 120-230 ms at
    # 200k entries, during which the node API (renewals, Sync streams) waited.
    _create(srv, _agent("offloop"), [f"/offloop/{n}" for n in range(3)])
    walked_in: list[int] = []
    paginate = listing.paginate

    def recorded(*args: Any, **kwargs: Any) -> Any:
        walked_in.append(threading.get_ident())
        return paginate(*args, **kwargs)

    async def loop_thread() -> int:
        return threading.get_ident()

    monkeypatch.setattr(listing, "paginate", recorded)
    assert _pages(srv, spiffe_id_prefix=f"{TD}/offloop") != [[]]
    assert walked_in
    assert srv.call(loop_thread()) not in walked_in


def test_bad_paging_and_filters_are_invalid_argument(srv: RunningServer) -> None:
    parent = _agent("p7")
    _create(srv, parent, [f"/p7/{n}" for n in range(3)])
    admin = srv.admin()
    token = admin.ListEntries(
        admin_pb2.ListEntriesRequest(parent_id=parent, page_size=1)
    ).next_page_token
    assert token
    _invalid(
        lambda: admin.ListEntries(
            admin_pb2.ListEntriesRequest(parent_id=_agent("other"), page_token=token)
        ),
        "page_token: issued for a listing with different filters",
    )
    _invalid(
        lambda: admin.ListEntries(admin_pb2.ListEntriesRequest(page_token="not-a-token")),
        "page_token: not a token this server issued",
    )
    _invalid(
        lambda: admin.ListEntries(admin_pb2.ListEntriesRequest(page_size=5001)),
        "page_size: 5001 is out of range",
    )
    _invalid(
        lambda: admin.ListEntries(admin_pb2.ListEntriesRequest(page_size=-1)),
        "page_size: -1 is out of range",
    )
    _invalid(
        lambda: admin.ListEntries(admin_pb2.ListEntriesRequest(spiffe_id_prefix="spiffe://x/../y")),
        "spiffe_id_prefix:",
    )
    _invalid(
        lambda: admin.ListEntries(admin_pb2.ListEntriesRequest(selectors=[_sel("unix:")])),
        "selectors:",
    )
    _invalid(
        lambda: admin.ListAgents(admin_pb2.ListAgentsRequest(page_token=token)),
        "page_token: issued for a listing with different filters",
    )
    # The same filters page on with the token.
    reply = admin.ListEntries(
        admin_pb2.ListEntriesRequest(parent_id=parent, page_size=1, page_token=token)
    )
    assert len(reply.entries) == 1


def test_a_deeply_nested_page_token_is_invalid_argument(srv: RunningServer) -> None:
    """JSON nested past the recursion limit: the caller's bad input, not a server fault."""
    token = base64.urlsafe_b64encode(b"[" * 100_000).decode()
    admin = srv.admin()
    _invalid(
        lambda: admin.ListEntries(admin_pb2.ListEntriesRequest(page_token=token)),
        "page_token: not a token this server issued",
    )
    _invalid(
        lambda: admin.ListAgents(admin_pb2.ListAgentsRequest(page_token=token)),
        "page_token: not a token this server issued",
    )


def test_pages_of_big_entries_stay_far_below_the_4_mib_limit(srv: RunningServer) -> None:
    parent = _agent("p8")
    # ~60 KiB each: 50 of them are ~3 MiB, more than a page may carry.
    selectors = [f"k{n}:{'v' * 1000}" for n in range(60)]
    ids: list[str] = []
    for start in range(0, 50, 25):
        ids += _create(srv, parent, [f"/p8/{n}" for n in range(start, start + 25)], *selectors)
    admin = srv.admin()
    token = ""
    seen: list[str] = []
    sizes: list[int] = []
    while True:
        reply = admin.ListEntries(
            admin_pb2.ListEntriesRequest(parent_id=parent, page_size=5000, page_token=token)
        )
        sizes.append(reply.ByteSize())
        seen += [e.id for e in reply.entries]
        token = reply.next_page_token
        if not token:
            break
    assert seen == ids
    assert len(sizes) >= 2
    assert max(sizes) <= MAX_PAGE_BYTES + 4096


def test_agents_page_and_filter_by_prefix() -> None:
    with_agents = running_server()
    srv = next(with_agents)
    try:
        agents = sorted(srv.attest().spiffe_id for _ in range(3))
        admin = srv.admin()
        seen: list[str] = []
        token = ""
        while True:
            reply = admin.ListAgents(admin_pb2.ListAgentsRequest(page_size=1, page_token=token))
            assert len(reply.agents) == 1
            seen += [a.spiffe_id for a in reply.agents]
            token = reply.next_page_token
            if not token:
                break
        assert seen == agents
        reply = admin.ListAgents(admin_pb2.ListAgentsRequest(spiffe_id_prefix=agents[1]))
        assert [a.spiffe_id for a in reply.agents] == [agents[1]]
        assert reply.next_page_token == ""
        reply = admin.ListAgents(
            admin_pb2.ListAgentsRequest(spiffe_id_prefix=f"{TD}/svid/agent/join_token")
        )
        assert [a.spiffe_id for a in reply.agents] == agents
    finally:
        with_agents.close()


def test_an_agent_listing_walks_the_agents_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A prefix or selector filter may test every agent before a page fills (100k of them),
    # while the node API (attestations, renewals) waited on the loop.
    with_agents = running_server()
    srv = next(with_agents)
    try:
        agents = sorted(srv.attest().spiffe_id for _ in range(3))
        walked_in: list[int] = []
        take_page = listing.take_page

        def recorded(*args: Any, **kwargs: Any) -> Any:
            walked_in.append(threading.get_ident())
            return take_page(*args, **kwargs)

        async def loop_thread() -> int:
            return threading.get_ident()

        monkeypatch.setattr(listing, "take_page", recorded)
        reply = srv.admin().ListAgents(
            admin_pb2.ListAgentsRequest(spiffe_id_prefix=f"{TD}/svid/agent")
        )
        assert [a.spiffe_id for a in reply.agents] == agents
        assert walked_in
        assert srv.call(loop_thread()) not in walked_in
        # The listing follows each change without sorting again: the snapshot's ids in order.
        evicted = agents[1]
        srv.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=evicted))
        assert list(srv.server.state.agents.sorted_ids) == [agents[0], agents[2]]
        reply = srv.admin().ListAgents(admin_pb2.ListAgentsRequest(page_size=1))
        assert [a.spiffe_id for a in reply.agents] == [agents[0]]
    finally:
        with_agents.close()
