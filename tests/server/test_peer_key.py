"""The key a caller's attestation budget is kept under: what the caller cannot change by
moving to another address of its own."""

from __future__ import annotations

import pytest

from server.peer import peer_key


class _Context:
    """The one call peer_key makes of a gRPC servicer context."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:10.1.2.3:51000", "10.1.2.3"),
        # One IPv6 host holds a whole /64: a join-token guesser picking a fresh address of it
        # for each try must still spend one budget.
        ("ipv6:[2001:db8:1:2::5]:51000", "2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:ffff:eeee:dddd:cccc]:4", "2001:db8:1:2::/64"),
        ("ipv6:[::1]:51000", "::/64"),
        ("ipv6:[::ffff:10.1.2.3]:51000", "10.1.2.3"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
        ("", ""),
    ],
)
def test_a_callers_budget_key(peer: str, key: str) -> None:
    assert peer_key(_Context(peer)) == key  # type: ignore[arg-type]


def test_two_addresses_of_one_ipv6_host_share_a_key_and_other_hosts_do_not() -> None:
    one = peer_key(_Context("ipv6:[2001:db8:0:1::a]:1"))  # type: ignore[arg-type]
    same = peer_key(_Context("ipv6:[2001:db8:0:1::b]:2"))  # type: ignore[arg-type]
    other = peer_key(_Context("ipv6:[2001:db8:0:2::a]:1"))  # type: ignore[arg-type]
    assert one == same != other
